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


def collate(block: TokenBlock, idx: np.ndarray, label_columns=()) -> dict[str, torch.Tensor]:
    lens = block.lengths[idx]
    B, L = len(idx), int(lens.max()) if len(idx) else 0
    out_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    src = np.repeat(block.offsets[idx] - out_offsets[:-1], lens) + np.arange(int(out_offsets[-1]), dtype=np.int64)
    dst = np.repeat(np.arange(B, dtype=np.int64) * L - out_offsets[:-1], lens) + np.arange(int(out_offsets[-1]),
                                                                                            dtype=np.int64)
    ids = np.zeros(B * L, dtype=np.int64)
    ids[dst] = block.ids[src]
    batch = {
        "soma_joinid": torch.from_numpy(block.joinids[idx].copy()),
        "input_ids": torch.from_numpy(ids.reshape(B, L)),
        "attention_mask": torch.from_numpy(np.arange(L)[None, :] < lens[:, None]),
        "lengths": torch.from_numpy(lens.astype(np.int64)),
    }
    if block.values is not None:
        v = np.zeros(B * L, dtype=np.float32)
        v[dst] = block.values[src]
        batch["values"] = torch.from_numpy(v.reshape(B, L))
    if block.bins is not None:
        b = np.zeros(B * L, dtype=np.int64)
        b[dst] = block.bins[src]
        batch["bins"] = torch.from_numpy(b.reshape(B, L))
    for c in label_columns:
        batch[f"obs.{c}"] = torch.from_numpy(block.labels[c][idx].astype(np.int64))
    return batch


def pad_fraction(lengths: list[np.ndarray]) -> float:
    """Share of padding positions over batches given each batch's token counts."""
    real = sum(int(x.sum()) for x in lengths)
    total = sum(int(x.max()) * len(x) for x in lengths if len(x))
    return 0.0 if total == 0 else 1.0 - real / total
