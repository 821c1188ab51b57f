"""make_loader: the one entry point (store path + LoaderConfig -> resumable DataLoader)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os

import numpy as np
from torchdata.stateful_dataloader import StatefulDataLoader

from .config import LoaderConfig
from .dataset import CellStream
from .state import LOADER_FORMAT, STATE_FORMAT_VERSION, check_state
from .vocab import N_SPECIAL, Vocab


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
    ctx.set_forkserver_preload(["atlasflow.loader"])
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
    """
    cfg = cfg or LoaderConfig()
    if overrides:
        cfg = LoaderConfig(**{**cfg.to_dict(), **overrides})
    if vocab is None:
        if gene_medians is not None:
            raise ValueError("make_loader: gene_medians belong to a vocabulary; pass vocab as well")
        ds = CellStream(store, cfg)
    else:
        ds = _stream_with_vocab(store, cfg, vocab, gene_medians)
    kw = {}
    if cfg.num_workers > 0:
        kw = {"prefetch_factor": 2, "persistent_workers": False, "multiprocessing_context": _worker_context()}
    return AtlasLoader(ds, batch_size=None, num_workers=cfg.num_workers, **kw)


def _stream_with_vocab(store, cfg: LoaderConfig, vocab: Vocab, gene_medians) -> CellStream:
    """A CellStream whose token lookup (and rank medians) come from ``vocab``, not the store's var.

    CellStream has no constructor argument for this yet (loader/dataset.py derives vocabulary and
    medians from the store), so the stream is built with a median-free tokenizer, which keeps it
    from requiring the store's gene stats, and its lookup table, medians and tokenizer are then
    replaced before anything is read.
    """
    from atlasflow.store import Store, open_store

    if cfg.tokenizer == "rank":
        if gene_medians is None:
            raise ValueError("make_loader: gene_medians: the rank tokenizer over a foreign vocabulary needs the "
                             "medians the vocabulary was trained with")
        gene_medians = np.asarray(gene_medians, dtype=np.float64)
        if len(gene_medians) != len(vocab.gene_feature_ids):
            raise ValueError(f"make_loader: gene_medians: {len(gene_medians)} values for "
                             f"{len(vocab.gene_feature_ids)} vocabulary genes")
    store = store if isinstance(store, Store) else open_store(os.fspath(store), cfg.timestamp_ms)
    ds = CellStream(store, dataclasses.replace(cfg, tokenizer="value"))
    lut = vocab.lookup_table_for_var(store.var())
    ds.vocab, ds._lut, ds.cfg = vocab, lut, cfg
    if cfg.tokenizer == "rank":
        med = np.full(len(lut), np.nan)
        known = lut >= 0
        med[known] = gene_medians[lut[known] - N_SPECIAL]
        ds._medians = med
    else:
        ds._medians = None
    return ds
