"""``atlasflow embed``: cell embeddings from a pretrained checkpoint, for a store, a query or an .h5ad.

New data is tokenized with the checkpoint's own vocabulary (genes matched by Ensembl id; genes
outside it are counted, reported and dropped) and, for the ``rank`` tokenizer, with the gene
medians of the store the model was pretrained on (read from ``data.store`` of the checkpoint's
config at its pinned snapshot): a gene's rank must mean the same thing it meant in pretraining.
Inputs stream in blocks of cells; each block's embeddings are appended (``embed_write``) to
``obsm["X_atlasflow"]`` of an .h5ad and/or a parquet file keyed by ``soma_joinid`` (the row number for
.h5ad inputs) before the next block is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..model import check_pooling
from .embed_write import EMBED_FORMAT_VERSION, OBSM_KEY  # noqa: F401  (re-exported)
from .pretrained import PretrainedModel, iter_input, tokenize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    pooling: str = "mean"  # cls | mean | rank_mean (model.POOLINGS); the cls state had the weakest rows of every eval
    batch_size: int = 64
    block_cells: int = 4096
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        check_pooling(self.pooling, "EmbedConfig.pooling")
        for name in ("batch_size", "block_cells"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EmbedConfig.{name}: must be an int >= 1, got {v!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"EmbedConfig.device: auto|cpu|cuda|cuda:N, got {self.device!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def embed(checkpoint: str, source, out_h5ad: str | None = None, out_parquet: str | None = None,
          cfg: EmbedConfig | None = None, medians_store: str | None = None, obs_columns=()) -> dict:
    """Embed every cell of ``source``; returns {n_cells, dim, genes_dropped, outputs, ...}.

    Each block's embeddings (and obs) are appended to the outputs before the next block is read.
    """
    from .embed_write import H5adEmbeddingWriter, ParquetEmbeddingWriter

    cfg = cfg or EmbedConfig()
    if not (out_h5ad or out_parquet):
        raise ValueError("embed: give out_h5ad and/or out_parquet")
    model = PretrainedModel(checkpoint, medians_store, cfg.torch_device())
    meta = {"format_version": EMBED_FORMAT_VERSION, "checkpoint": str(checkpoint), "pooling": cfg.pooling}
    pq_w = ParquetEmbeddingWriter(out_parquet, {k: v for k, v in meta.items() if k != "format_version"}) \
        if out_parquet else None
    h5_w = H5adEmbeddingWriter(out_h5ad, model.encoder.cfg.d_model, {"atlasflow_embed": meta}) if out_h5ad else None
    n = dropped = n_genes = 0
    tok = fids_seen = None
    try:
        for ids, obs, X, fids in iter_input(source, cfg.block_cells, obs_columns):
            if fids is not fids_seen:
                tok, dropped = model.tokenizer_for(fids)
                fids_seen, n_genes = fids, len(fids)
            e = model.embed_block(tokenize(tok, X, ids), cfg)
            if pq_w:
                pq_w.write(ids, e)
            if h5_w:
                h5_w.write(obs, e)
            n += len(ids)
    finally:
        for w in (pq_w, h5_w):
            if w:
                w.close()
    if n == 0:
        raise ValueError(f"embed: input {source!r} has no cells")
    log.info("%d of %d input genes are not in the checkpoint vocabulary (%d genes) and were dropped", dropped,
             n_genes, len(model.vocab.gene_feature_ids))
    return {"n_cells": n, "dim": int(model.encoder.cfg.d_model), "genes_in_input": n_genes,
            "genes_dropped": dropped, "pooling": cfg.pooling, "h5ad": out_h5ad, "parquet": out_parquet}
