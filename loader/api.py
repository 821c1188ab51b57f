"""make_loader: the one entry point (a store, a StoreView or a QueryConfig + LoaderConfig -> resumable DataLoader)."""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch
from torch.utils.data import DataLoader

from atlasflow.store.query import QueryConfig, select
from atlasflow.store.view import open_view

from .config import LoaderConfig
from .dataset import CellStream
from .state import LOADER_FORMAT
from .vocab import Vocab


class AtlasLoader(DataLoader):
    """A torch DataLoader over a CellStream with a small, versioned, world-size-free state.

    The state is the epoch's phase plus the number of batches this rank has handed out (to the
    training loop: batches the workers prefetched but nobody took are not consumed), so a resume
    on any number of ranks and workers continues the epoch exactly (see ``plan.py``)."""

    dataset: CellStream

    def __init__(self, dataset: CellStream, **kw):
        super().__init__(dataset, batch_size=None, **kw)

    def __iter__(self):
        ds = self.dataset
        ds.begin()  # before the workers copy the dataset
        for batch in super().__iter__():
            if self.num_workers:  # in-process, the dataset counts its own batches
                ds._position += 1
            yield batch

    def __len__(self) -> int:
        return self.dataset.batches_left

    def state_dict(self) -> dict:
        return self.dataset.state_dict(LOADER_FORMAT)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state, LOADER_FORMAT)


def _worker_context():
    """forkserver with the loader preloaded: workers start in ~0.1 s instead of re-importing torch and
    tiledbsoma (spawn), and never inherit TileDB thread pools from the parent (plain fork aborts
    with 'std::system_error: No such process'). Like spawn, scripts need an
    ``if __name__ == "__main__":`` guard."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["atlasflow.loader._worker_preload"])
    return ctx


def make_loader(store, cfg: LoaderConfig | None = None, *, vocab: Vocab | None = None,
                gene_medians: np.ndarray | None = None, meta_vocab=None, **overrides) -> AtlasLoader:
    """Build the loader: ``make_loader("atlas/", LoaderConfig(tokenizer="bin", batch_size=32))``.

    ``store``: a store path, a ``StoreView`` (an open store, or a Census mirror as ``CensusView``), or a
    ``QueryConfig`` (``atlasflow.store.query``): the query's cells are read in place, no copy.

    Keyword ``overrides`` replace config fields (``make_loader(uri, seed=1)``). Batches are dicts of
    torch tensors (see ``atlasflow.loader`` docs); ``loader.dataset`` is the CellStream.

    ``vocab``: tokenize with this vocabulary instead of the store's own (a checkpoint's, to fine-tune
    or embed on a store the model never saw): genes are matched by Ensembl id, store genes outside it
    are dropped. ``gene_medians`` (rank tokenizer, required with ``vocab``): the medians the model was
    trained with, aligned with ``vocab.gene_feature_ids``; the store's own gene stats are not used.
    ``thin_range`` / ``thin_prob`` (depth augmentation) apply the same way with or without ``vocab``:
    every store gene is thinned, then tokenized. ``meta_vocab`` (with ``meta_columns``): the metadata
    vocabulary a checkpoint was trained with (a ``MetaVocab`` or its dict); None builds it from the
    query's values (``loader.dataset.meta_vocab``).
    """
    cfg = cfg or LoaderConfig()
    if overrides:
        cfg = LoaderConfig(**{**cfg.to_dict(), **overrides})
    if isinstance(store, QueryConfig):
        store, cfg = _query_source(store, cfg)
    ds = CellStream(store, cfg, vocab=vocab, gene_medians=gene_medians, meta_vocab=meta_vocab)
    kw = {}
    if cfg.num_workers > 0:
        kw = {"prefetch_factor": 2, "persistent_workers": False, "multiprocessing_context": _worker_context()}
    # Its own generator: torch's DataLoader otherwise draws a worker base seed from the global RNG at
    # every iter(), which would shift the caller's dropout masks by where an epoch (or a resume) starts.
    gen = torch.Generator().manual_seed(cfg.seed)
    return AtlasLoader(ds, num_workers=cfg.num_workers, generator=gen, **kw)


def _query_source(q: QueryConfig, cfg: LoaderConfig):
    """The view a query reads and the loader config with the query's filter joined to its own.

    The loader selects by obs filter only (its plan is over joinid runs), so a per-label subsample or a
    gene subset is written out first (``atlasflow.ingest.export``). A Census query reads a local mirror
    in place with the tokenizers that need no gene medians (only a store has them).
    """
    from .encodings import get_encoding

    if q.per_label_cap or q.fraction < 1.0:
        raise ValueError("QueryConfig.per_label_cap: the loader selects cells by obs filter only; write the "
                         "subsample with to_store or to_h5ad")
    if q.genes:
        raise ValueError("QueryConfig.genes: the loader reads every gene; write a gene subset with to_store")
    if q.source == "census":
        if not q.uri:
            raise ValueError("QueryConfig.uri: a loader over Census reads a local mirror (uri=ROOT, as "
                             "cellxgene_census.open_soma(uri=...)); write remote Census queries with to_store")
        if get_encoding(cfg.tokenizer).needs_medians:
            raise ValueError(f"LoaderConfig.tokenizer: {cfg.tokenizer!r} needs per-gene medians, which a Census "
                             "experiment does not have; use 'bin', 'ebin', 'value' or 'uce', or write the query "
                             "with to_store (gene stats are computed there)")
    select(q)  # refuse an empty query with the query's own message
    parts = [f for f in (cfg.obs_filter, q.obs_filter) if f]  # the loader's own filter, then the query's
    obs_filter = parts[0] if len(parts) == 1 else " and ".join(f"({f})" for f in parts) or None
    view = open_view(q.uri, q.census_organism, cfg.timestamp_ms)
    return view, LoaderConfig(**{**cfg.to_dict(), "obs_filter": obs_filter})
