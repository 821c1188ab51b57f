"""Balancing by an obs column with temperature alpha; leakage-safe splits."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader import LoaderConfig, make_loader, split_of
from atlasflow.store import open_store

from test_loader_fixtures import SYNTH_SIZES, synth_store

BASE = dict(tokenizer="value", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=5)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return synth_store(tmp_path_factory)


@pytest.fixture(scope="module")
def dataset_of(uri):
    obs = open_store(uri).obs(["dataset_id", "donor_id"])
    return obs


def epoch(uri, epoch_=0, **kw):
    loader = make_loader(uri, LoaderConfig(**{**BASE, **kw}))
    loader.dataset.set_epoch(epoch_)
    return np.concatenate([b["soma_joinid"].numpy() for b in loader])


def test_alpha_zero_gives_a_tiny_dataset_as_many_cells_as_a_huge_one(uri, dataset_of):
    ids = epoch(uri, balance_by="dataset_id", balance_alpha=0.0)
    assert len(ids) == sum(SYNTH_SIZES)  # an epoch keeps the query's size
    ds = dataset_of.loc[ids, "dataset_id"].to_numpy()
    counts = {d: int((ds == d).sum()) for d in ("ds0", "ds1", "ds2")}
    # 1280 / 3 = 426.67 each; largest remainder gives the two extra cells to the first groups
    assert counts == {"ds0": 427, "ds1": 427, "ds2": 426}
    # the 32-cell dataset is repeated (13 whole passes + 10 cells), the 960-cell one subsampled without repeats
    tiny = np.bincount(ids[ds == "ds2"] - ids[ds == "ds2"].min())
    assert tiny.min() >= 13 and tiny.max() <= 14
    assert len(np.unique(ids[ds == "ds0"])) == 427
    # spread over the epoch: the tiny dataset is about a third of every stretch of batches
    for part in np.array_split(ds, 4):
        assert 0.25 < np.mean(part == "ds2") < 0.42
    other = epoch(uri, 1, balance_by="dataset_id", balance_alpha=0.0)
    assert set(other[dataset_of.loc[other, "dataset_id"] == "ds0"]) != set(ids[ds == "ds0"])  # a fresh subset


def test_alpha_one_is_natural_frequency_each_cell_once(uri, dataset_of):
    ids = epoch(uri, balance_by="dataset_id", balance_alpha=1.0)
    assert np.array_equal(np.sort(ids), np.sort(dataset_of.index.to_numpy()))


def test_alpha_half_quotas(uri, dataset_of):
    ids = epoch(uri, balance_by="dataset_id", balance_alpha=0.5)
    ds = dataset_of.loc[ids, "dataset_id"].to_numpy()
    w = np.sqrt(np.array(SYNTH_SIZES, dtype=float))
    exact = w / w.sum() * 1280
    got = np.array([(ds == f"ds{d}").sum() for d in range(3)])
    assert np.all(np.abs(got - exact) < 1) and got.sum() == 1280


@pytest.mark.parametrize("by", ["dataset_id", "donor_id"])
def test_split_by_group_never_straddles(uri, dataset_of, by):
    fr = (0.5, 0.25, 0.25)
    seen = {}
    for split in ("train", "val", "test"):
        try:
            loader = make_loader(uri, LoaderConfig(**{**BASE, "batch_size": 1}, split=split, split_by=by,
                                                   split_fractions=fr, shuffle=False))
        except ValueError as exc:
            assert "no committed cells" in str(exc)
            seen[split] = np.zeros(0, dtype=np.int64)
            continue
        seen[split] = np.concatenate([b["soma_joinid"].numpy() for b in loader])
    groups = {s: set(dataset_of.loc[v, by]) for s, v in seen.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    everything = np.sort(np.concatenate(list(seen.values())))
    assert np.array_equal(everything, np.sort(dataset_of.index.to_numpy()))  # each cell in exactly one split
    for s, gs in groups.items():
        assert all(split_of(g, fr) == s for g in gs)
    if by == "donor_id":
        assert sum(1 for g in groups.values() if g) >= 2  # 9 donors: more than one split is used
