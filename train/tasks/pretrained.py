"""A checkpoint as a model for data it never saw: ``PretrainedModel`` (the encoder, its vocabulary, its
gene medians, its metadata vocabulary, the tokenizer for any gene list) and the inputs every task reads
(``iter_input``: blocks of a store, a query or an .h5ad, as (joinids, obs, CSR counts, feature ids)).

embed, finetune and evaluate all go through here, so a cell is tokenized for a downstream task exactly as
the loader tokenized it in pretraining: genes matched by Ensembl id through the checkpoint's vocabulary
(genes outside it dropped and counted), ``rank`` against the pretraining store's medians.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from ..model import N_SPECIAL

if TYPE_CHECKING:
    from .embed import EmbedConfig

log = logging.getLogger(__name__)


class PretrainedModel:
    """A checkpoint's encoder with everything needed to tokenize data it has never seen."""

    def __init__(self, checkpoint: str, medians_store: str | None = None, device: str | torch.device = "cpu",
                 meta_tokens: str = "keep"):
        """``meta_tokens`` (a checkpoint trained with metadata tokens): "keep" gives every cell its
        columns' tokens (``<unk:column>`` where the value is not known to the model, always so for
        in-memory counts, which carry no store obs), "drop" leaves them out (does the model lean on them?)."""
        from atlasflow.loader import MetaVocab

        from ..checkpoint import load_checkpoint, read_part

        self.checkpoint = str(checkpoint)
        self.encoder, self.config, self.vocab = load_checkpoint(checkpoint, map_location=str(device))
        self.meta = read_part(checkpoint, "model.json")
        self.device = torch.device(device)
        self.token_of = self.vocab.token_of_feature()
        if meta_tokens not in ("keep", "drop"):
            raise ValueError(f"meta_tokens: must be 'keep' or 'drop', got {meta_tokens!r}")
        mv = self.meta.get("meta_vocab")
        self.meta_vocab = MetaVocab.from_dict(mv) if mv else None
        self.meta_tokens = meta_tokens
        from atlasflow.loader.encodings import get_encoding

        self.encoding = get_encoding(self.meta["tokenizer"])
        self.medians = self._medians(medians_store) if self.encoding.needs_medians else None

    def _medians(self, medians_store: str | None) -> dict[str, float]:
        from atlasflow.store import open_store

        uri = medians_store or self.config.data.store
        ts = None if medians_store else (self.config.data.timestamp_ms or None)
        try:
            stats = open_store(uri, ts).gene_stats()
        except Exception as exc:
            raise ValueError(f"checkpoint {self.checkpoint}: the {self.meta['tokenizer']} tokenizer needs the gene medians of the "
                             f"pretraining store {uri!r}, which could not be read ({type(exc).__name__}: {exc}); "
                             f"pass medians_store / --medians-store") from exc
        joinids = self.vocab.gene_joinids
        med = stats["nonzero_median"].reindex(joinids).to_numpy(np.float64)
        return dict(zip(self.vocab.gene_feature_ids, med))

    def tokenizer_for(self, feature_ids, genes: set | None = None) -> tuple:
        """(Tokenizer over these input columns, number of input columns it drops).

        A column is dropped when its gene is not in the vocabulary or, with ``genes``, not among
        them (e.g. the genes a training and a test set share).
        """
        from atlasflow.loader import Tokenizer

        feature_ids = [str(f) for f in feature_ids]
        lut = np.array([self.token_of.get(f, -1) if genes is None or f in genes else -1 for f in feature_ids],
                       dtype=np.int32)
        med = None
        if self.medians is not None:
            med = np.array([self.medians.get(f, 1.0) for f in feature_ids], dtype=np.float64)
        m = self.meta
        coords = None
        if self.encoding.needs_coordinates:
            import pandas as pd

            from atlasflow.loader.encodings.uce import column_coordinates

            coords = column_coordinates(pd.DataFrame({"feature_id": feature_ids}))
        tok = Tokenizer(m["tokenizer"], m["max_len"], m["n_bins"], lut, med, self.config.data.seed,
                        coordinates=coords, n_vocab=m.get("gene_end", N_SPECIAL + len(self.vocab.gene_joinids)),
                        bin_width=m.get("bin_width", 1.0), prefix_tokens=self.prefix_tokens)
        return tok, int((lut < 0).sum())

    @property
    def prefix_tokens(self) -> np.ndarray | None:
        """The metadata tokens of a cell whose values are unknown (None: none, or dropped)."""
        if self.meta_vocab is None or self.meta_tokens == "drop":
            return None
        return self.meta_vocab.unknown(1)[0]

    def embed_block(self, block, cfg: EmbedConfig, encoder: torch.nn.Module | None = None) -> np.ndarray:
        """Embeddings [n, d] for a TokenBlock, in block order."""
        from atlasflow.loader.batching import collate

        enc = encoder or self.encoder
        enc.eval()
        out = []
        for a in range(0, len(block), cfg.batch_size):
            idx = np.arange(a, min(len(block), a + cfg.batch_size))
            out.append(enc.embed(collate(block, idx), pooling=cfg.pooling).cpu().numpy())
        d = self.encoder.cfg.d_model
        return np.concatenate(out) if out else np.zeros((0, d), np.float32)


    @torch.no_grad()
    def embed_poolings(self, block, poolings, batch_size: int = 64) -> dict:
        """{pooling: embeddings [n, d]} from one forward pass per batch (``CellEncoder.pool`` each)."""
        from atlasflow.loader.batching import collate

        from ..pack import model_inputs

        enc = self.encoder.eval()
        dev = next(enc.parameters()).device
        out = {p: [] for p in poolings}
        for a in range(0, len(block), batch_size):
            b = collate(block, np.arange(a, min(len(block), a + batch_size)))
            inputs = model_inputs({k: v.to(dev) for k, v in b.items()}, pack=False)
            h = enc(inputs)
            for p in poolings:
                out[p].append(enc.pool(h, inputs, p).float().cpu().numpy())
        d = enc.cfg.d_model
        return {p: np.concatenate(v) if v else np.zeros((0, d), np.float32) for p, v in out.items()}


def tokenize(tok, X: sp.csr_matrix, joinids: np.ndarray):
    X = sp.csr_matrix(X)
    X.sort_indices()
    return tok(X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data, np.asarray(joinids, np.int64), 0)


# -- inputs: (joinids, obs, CSR counts, feature ids) in blocks -----------------------------------
def iter_h5ad(path: str, block_cells: int, organism: str = "homo_sapiens"):
    """Blocks of an .h5ad's raw counts (raw.X, layers/counts or X), genes mapped to Ensembl ids."""
    from atlasflow.ingest.h5ad import open_counts, probe_h5ad, read_obs, read_rows

    p = probe_h5ad(path, organism)
    if p.error:
        raise ValueError(p.error)
    obs = read_obs(path)
    f, node = open_counts(path, p.counts_field)
    try:
        for a in range(0, p.n_cells, block_cells):
            b = min(p.n_cells, a + block_cells)
            X = p.project(read_rows(node, a, b))  # mapped genes, duplicates summed
            yield np.arange(a, b, dtype=np.int64), obs.iloc[a:b], sp.csr_matrix(X), p.feature_ids
    finally:
        f.close()


def iter_input(source, block_cells: int, obs_columns: tuple[str, ...] = ()):
    """``source``: a store path, an .h5ad path, or a ``QueryConfig``."""
    from atlasflow.store.query import QueryConfig, iter_blocks, select

    if isinstance(source, (str, os.PathLike)) and str(source).rstrip("/").endswith((".h5ad", ".h5", ".zarr")):
        yield from iter_h5ad(str(source), block_cells)
        return
    cfg = source if isinstance(source, QueryConfig) else QueryConfig(source="store", uri=str(source))
    cfg = QueryConfig(**{**cfg.__dict__, "block_cells": block_cells})
    sel = select(cfg)
    fids = list(sel.var["feature_id"].astype(str))
    for ids, obs, X in iter_blocks(cfg, sel, obs_columns=tuple(obs_columns) or cfg.obs_columns):
        yield ids, obs, X, fids
