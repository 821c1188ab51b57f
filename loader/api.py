"""make_loader: the one entry point (store path + LoaderConfig -> resumable DataLoader)."""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch
from torch.utils.data import DataLoader

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
    ds = CellStream(store, cfg, vocab=vocab, gene_medians=gene_medians, meta_vocab=meta_vocab)
    kw = {}
    if cfg.num_workers > 0:
        kw = {"prefetch_factor": 2, "persistent_workers": False, "multiprocessing_context": _worker_context()}
    # Its own generator: torch's DataLoader otherwise draws a worker base seed from the global RNG at
    # every iter(), which would shift the caller's dropout masks by where an epoch (or a resume) starts.
    gen = torch.Generator().manual_seed(cfg.seed)
    return AtlasLoader(ds, num_workers=cfg.num_workers, generator=gen, **kw)
