"""Batches from a shuffled window: optional length bucketing, dynamic padding, torch tensors.

Length bucketing: the window's permuted cells are taken in pools of ``bucket_batches`` batches;
a pool is sorted by token count and cut into batches, whose order within the pool is then
shuffled. Padding per batch drops to a few percent; cells still come from the whole window.
``bucket_batches`` <= 1 turns it off (batches are consecutive runs of the permutation).
"""

from __future__ import annotations

import numpy as np
import torch

from .tokenize import TokenBlock


def batch_indices(order: np.ndarray, lengths: np.ndarray, batch_size: int, bucket_batches: int,
                  rng: np.random.Generator | None) -> list[np.ndarray]:
    """Cut a window's permutation into batches (len(order) is a multiple of batch_size)."""
    n = len(order)
    if bucket_batches <= 1 or rng is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    pool = bucket_batches * batch_size
    out = []
    for p in range(0, n, pool):
        cells = order[p:p + pool]
        cells = cells[np.argsort(lengths[cells], kind="stable")]
        batches = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
        out.extend(batches[k] for k in rng.permutation(len(batches)))
    return out


class TokenWindow:
    """A shuffle window as the tokenized blocks it was read in, never concatenated: gluing a
    window's token arrays together would hold it twice at the peak. Per-cell fields (lengths,
    joinids, labels) are concatenated; tokens are gathered from their blocks batch by batch."""

    def __init__(self, blocks: list[TokenBlock]):
        self.blocks = blocks
        self.cum = np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)
        self.lengths = np.concatenate([b.lengths for b in blocks])
        self.joinids = np.concatenate([b.joinids for b in blocks])
        self.labels = {k: np.concatenate([b.labels[k] for b in blocks]) for k in blocks[0].labels}
        self.has_values = blocks[0].values is not None
        self.has_bins = blocks[0].bins is not None

    def __len__(self) -> int:
        return int(self.cum[-1])


def collate(window: TokenWindow | TokenBlock, idx: np.ndarray, label_columns=()) -> dict[str, torch.Tensor]:
    """Padded batch tensors for cells ``idx`` of a window (or of one block)."""
    if isinstance(window, TokenBlock):
        window = TokenWindow([window])
    idx = np.asarray(idx, dtype=np.int64)
    lens = window.lengths[idx]
    B, L = len(idx), int(lens.max()) if len(idx) else 0
    ids = np.zeros(B * L, dtype=np.int64)
    vals = np.zeros(B * L, dtype=np.float32) if window.has_values else None
    bins = np.zeros(B * L, dtype=np.int64) if window.has_bins else None
    blk = np.searchsorted(window.cum, idx, side="right") - 1
    for b in np.unique(blk):  # at most one pass per block of the window
        rows = np.flatnonzero(blk == b)
        block, n = window.blocks[b], lens[rows]
        out_off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        run = np.arange(int(n.sum()), dtype=np.int64)
        src = np.repeat(block.offsets[idx[rows] - window.cum[b]] - out_off, n) + run
        dst = np.repeat(rows * L - out_off, n) + run
        ids[dst] = block.ids[src]
        if vals is not None:
            vals[dst] = block.values[src]
        if bins is not None:
            bins[dst] = block.bins[src]
    batch = {
        "soma_joinid": torch.from_numpy(window.joinids[idx].copy()),
        "input_ids": torch.from_numpy(ids.reshape(B, L)),
        "attention_mask": torch.from_numpy(np.arange(L)[None, :] < lens[:, None]),
        "lengths": torch.from_numpy(lens.astype(np.int64)),
    }
    if vals is not None:
        batch["values"] = torch.from_numpy(vals.reshape(B, L))
    if bins is not None:
        batch["bins"] = torch.from_numpy(bins.reshape(B, L))
    for c in label_columns:
        batch[f"obs.{c}"] = torch.from_numpy(window.labels[c][idx].astype(np.int64))
    return batch


def pad_fraction(lengths: list[np.ndarray]) -> float:
    """Share of padding positions over batches given each batch's token counts."""
    real = sum(int(x.sum()) for x in lengths)
    total = sum(int(x.max()) * len(x) for x in lengths if len(x))
    return 0.0 if total == 0 else 1.0 - real / total
