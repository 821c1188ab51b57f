"""In-memory fine-tuning sets (.h5ad files, remote Census and subsampled queries): counts read once
on the driver and shared with the workers, tokenized batch by batch when drawn (so depth
augmentation thins every epoch afresh); the validation split of such a set."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def validation_split(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> dict:
    """Hold out ``fraction`` of the training cells for early stopping.

    By group when there are >= 2 groups (whole groups, in a seeded order, until the fraction is
    reached; at least one group stays in training): the validation loss then measures transfer to
    a group the head never saw, which is what the held-out test set asks of it. With a single group,
    a stratified split of the cells (sklearn) — an in-distribution proxy, said so in ``how``.
    """
    labels = np.asarray(labels).astype(str)
    n = len(labels)
    if fraction <= 0:
        return {"train": np.arange(n), "val": np.zeros(0, np.int64), "how": "none"}
    uniq = np.unique(np.asarray(groups).astype(str)) if groups is not None else np.zeros(0)
    if len(uniq) >= 2:
        g = np.asarray(groups).astype(str)
        order = np.random.default_rng(seed).permutation(uniq)
        val, size = [], 0
        for u in order[:-1]:
            if size >= fraction * n:
                break
            val.append(u)
            size += int((g == u).sum())
        is_val = np.isin(g, val)
        return {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val),
                "how": f"by group: {len(val)} of {len(uniq)} groups held out ({', '.join(map(str, val[:5]))})"}
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 else None
    tr, va = train_test_split(np.arange(n), test_size=fraction, random_state=seed, stratify=strat)
    return {"train": np.sort(tr), "val": np.sort(va),
            "how": "stratified cell split (a single group: no group to hold out)" if strat is not None
            else "random cell split (a single group; a label has < 2 cells, so not stratified)"}


def tokenizer_spec(model, feature_ids, genes: set | None = None) -> tuple[dict, int]:
    """A picklable recipe for the checkpoint's tokenizer over these columns (optionally only ``genes``)."""
    tok, dropped = model.tokenizer_for(feature_ids, genes)
    return {"kind": tok.kind, "max_len": tok.max_len, "n_bins": tok.n_bins, "lut": tok.lut,
            "medians": tok.medians, "seed": tok.seed, "coordinates": tok.coordinates, "n_vocab": tok.n_vocab,
            "bin_width": tok.bin_width, "prefix_tokens": tok.prefix_tokens}, dropped


def make_tokenizer(spec: dict, thin_range=None, thin_prob: float = 1.0):
    """The tokenizer of a ``tokenizer_spec``; with ``thin_range`` it thins counts first (the loader's
    seeded binomial depth augmentation; None when this loader cannot)."""
    from atlasflow.loader import Tokenizer

    args = (spec["kind"], spec["max_len"], spec["n_bins"], spec["lut"], spec["medians"], spec["seed"])
    kw = {k: spec[k] for k in ("coordinates", "n_vocab", "bin_width", "prefix_tokens") if k in spec}
    if thin_range is None:
        return Tokenizer(*args, **kw)
    return Tokenizer(*args, thin_range=tuple(thin_range), thin_prob=float(thin_prob), **kw)


def memory_set(counts, labels, tok_spec: dict, classes: list[str], split: dict) -> dict:
    """Arrays a worker trains from: CSR counts over the tokenizer's columns, class codes, the split."""
    import scipy.sparse as sp

    X = sp.csr_matrix(counts)
    X.sort_indices()
    code = {c: i for i, c in enumerate(classes)}
    return {"indptr": X.indptr.astype(np.int64), "indices": X.indices.astype(np.int64),
            "values": X.data.astype(np.float32), "joinids": np.arange(X.shape[0], dtype=np.int64),
            "y": np.array([code[v] for v in np.asarray(labels).astype(str)], dtype=np.int64),
            "tok": tok_spec, "train_idx": np.asarray(split["train"], np.int64),
            "val_idx": np.asarray(split["val"], np.int64), "split_how": split["how"]}


def tokenize_rows(tok, data: dict, rows: np.ndarray, epoch: int):
    """Tokenize cells ``rows`` of a memory set (the epoch seeds thinning and value noise)."""
    ip, ind, val = data["indptr"], data["indices"], data["values"]
    starts, ends = ip[rows], ip[rows + 1]
    sub_ip = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    take = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)
    return tok(sub_ip, ind[take], val[take], data["joinids"][rows], epoch)


class MemoryBatches:
    """Endless (batch, class index) pairs over this rank's training cells r, r + world, ...; each
    batch is tokenized when drawn (``tok`` may thin counts: a new depth per cell every epoch).

    The state is the number of batches drawn: a restart on the same world size replays the seeded
    order to that point (permutations only, nothing is tokenized); on another world size the rank's
    cells differ, so it starts a fresh order (logged)."""

    def __init__(self, data: dict, batch_size: int, seed: int, rank: int, world_size: int, tok):
        self.y_all = torch.tensor(np.asarray(data["y"]), dtype=torch.long)  # ray.get arrays are read-only
        self.mine = np.asarray(data["train_idx"])[rank::world_size]
        if len(self.mine) == 0:
            raise ValueError(f"finetune: {len(data['train_idx'])} training cells cannot feed {world_size} workers")
        self.data, self.tok, self.batch_size, self.world_size = data, tok, batch_size, world_size
        self.rng = np.random.default_rng([seed, rank])
        self.drawn, self._batches = 0, self._order()

    def _order(self):
        bs, epoch = self.batch_size, 0
        while True:
            order = self.rng.permutation(self.mine)
            for a in range(0, len(order) - bs + 1 if len(order) >= bs else 1, bs):
                yield epoch, order[a:a + bs]
            epoch += 1

    def __iter__(self):
        return self

    def __next__(self):
        from atlasflow.loader.batching import collate

        epoch, idx = next(self._batches)
        self.drawn += 1
        blk = tokenize_rows(self.tok, self.data, idx, epoch)
        return collate(blk, np.arange(len(idx))), self.y_all[idx]

    def state_dict(self) -> dict:
        return {"kind": "memory", "position": self.drawn, "drawn": self.drawn, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            log.warning("finetune: in-memory set resumed on %d workers (saved on %d): a fresh order",
                        self.world_size, state["world_size"])
            return
        for _ in range(int(state["drawn"])):
            next(self._batches)
        self.drawn = int(state["drawn"])


def memory_batches(data: dict, batch_size: int, seed: int, rank: int, world_size: int, tok) -> MemoryBatches:
    return MemoryBatches(data, batch_size, seed, rank, world_size, tok)


def validation_batches(data: dict, tok, batch_size: int = 128) -> list:
    """The validation cells as fixed batches (no thinning: the score must not move between evaluations)."""
    from atlasflow.loader.batching import collate

    val = np.asarray(data["val_idx"])
    if len(val) == 0:
        return []
    blk = tokenize_rows(tok, data, val, 0)
    y = torch.tensor(np.asarray(data["y"])[val], dtype=torch.long)
    return [(collate(blk, np.arange(a, min(len(val), a + batch_size))), y[a:a + batch_size])
            for a in range(0, len(val), batch_size)]
