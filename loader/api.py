"""make_loader: the one entry point (store path + LoaderConfig -> resumable DataLoader)."""

from __future__ import annotations

import multiprocessing

import numpy as np
from torchdata.stateful_dataloader import StatefulDataLoader

from .config import LoaderConfig
from .dataset import CellStream
from .state import LOADER_FORMAT, STATE_FORMAT_VERSION, check_state
from .vocab import Vocab


class AtlasLoader(StatefulDataLoader):
    """A torchdata StatefulDataLoader over a CellStream whose state is versioned and checked."""

    dataset: CellStream

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"format": LOADER_FORMAT, "version": STATE_FORMAT_VERSION, **ds._identity(),
                "epoch": ds.epoch, "dataloader": super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.dataset._identity(), LOADER_FORMAT)
        self.dataset.set_epoch(int(state["epoch"]))
        super().load_state_dict(state["dataloader"])


def _worker_context():
    """forkserver with the loader preloaded: workers start in ~0.1 s instead of re-importing torch and
    tiledbsoma (spawn), and never inherit TileDB thread pools from the parent (plain fork aborts
    with 'std::system_error: No such process'). Like spawn, scripts need an
    ``if __name__ == "__main__":`` guard."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["atlasflow.loader._worker_preload"])
    return ctx


def make_loader(store, cfg: LoaderConfig | None = None, *, vocab: Vocab | None = None,
                gene_medians: np.ndarray | None = None, **overrides) -> AtlasLoader:
    """Build the loader: ``make_loader("atlas/", LoaderConfig(tokenizer="bin", batch_size=32))``.

    Keyword ``overrides`` replace config fields (``make_loader(uri, seed=1)``). Batches are dicts of
    torch tensors (see ``atlasflow.loader`` docs); ``loader.dataset`` is the CellStream.

    ``vocab``: tokenize with this vocabulary instead of the store's own (a checkpoint's, to fine-tune
    or embed on a store the model never saw): genes are matched by Ensembl id, store genes outside it
    are dropped. ``gene_medians`` (rank tokenizer, required with ``vocab``): the medians the model was
    trained with, aligned with ``vocab.gene_feature_ids``; the store's own gene stats are not used.
    ``thin_range`` / ``thin_prob`` (depth augmentation) apply the same way with or without ``vocab``:
    every store gene is thinned, then tokenized.
    """
    cfg = cfg or LoaderConfig()
    if overrides:
        cfg = LoaderConfig(**{**cfg.to_dict(), **overrides})
    ds = CellStream(store, cfg, vocab=vocab, gene_medians=gene_medians)
    kw = {}
    if cfg.num_workers > 0:
        kw = {"prefetch_factor": 2, "persistent_workers": False, "multiprocessing_context": _worker_context()}
    return AtlasLoader(ds, batch_size=None, num_workers=cfg.num_workers, **kw)
