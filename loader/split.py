"""Leakage-safe train/val/test splits by a grouping column (dataset_id, donor_id, ...).

A group's split depends only on its value: u = blake2b("atlasflow-split-v1:" + value) / 2^64, and
the group goes to the first split whose cumulative fraction exceeds u. So a group never straddles
splits, the assignment does not depend on the training seed, on the other groups or on the store's
size: a dataset added later never moves an existing dataset between splits (checkpoints trained on
an older snapshot stay leakage-free). The price: with few groups the realized fractions are coarse.
"""

from __future__ import annotations

import hashlib

import numpy as np

from atlasflow.store.runs import Labels, Runs

SPLIT_NAMES = ("train", "val", "test")
_SALT = b"atlasflow-split-v1:"


def group_unit(value: str) -> float:
    h = hashlib.blake2b(_SALT + str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_of(value: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Which split a group value belongs to."""
    cum = np.cumsum(np.asarray(fractions, dtype=np.float64))
    u = group_unit(value)
    k = int(np.searchsorted(cum, u, side="right"))
    return SPLIT_NAMES[min(k, len(SPLIT_NAMES) - 1)]


def assign_splits(values, fractions=(0.8, 0.1, 0.1)) -> dict[str, str]:
    """{group value: split name} for every distinct value."""
    return {str(v): split_of(str(v), fractions) for v in dict.fromkeys(values)}


def restrict_to_split(runs: Runs, labels: Labels, split: str, fractions) -> Runs:
    """Keep the selected cells whose group (labels) falls in ``split``."""
    wanted = np.array([split_of(v, fractions) == split for v in labels.categories], dtype=bool)
    seg = np.flatnonzero(wanted[labels.codes])
    cum = runs.cum()
    ranges = []
    for k in seg:  # a loop over label segments (datasets), not cells
        ranges.extend(runs.to_joinids(int(labels.bounds[k]), int(labels.bounds[k + 1]), cum))
    return Runs.from_ranges(ranges)
