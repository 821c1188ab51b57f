"""Elastic exact resume: consume on one world (ranks x DataLoader workers), save, resume on another.

Ranks are simulated in one process (one loader per rank, as DDP builds them); the DataLoader
workers are real processes. Over the whole epoch every cell of the query is delivered exactly once,
but for the last phase's documented drop (< shards x (batch_size + 1) cells), and every rank of a
phase yields the same number of batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.store import open_store

from test_loader_fixtures import synth_store

BASE = dict(tokenizer="bin", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=21)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return synth_store(tmp_path_factory)


def run_phase(uri, world, workers, k, state=None, **kw):
    """Every rank delivers k batches (None: to the end); returns (joinids, batches per rank, state)."""
    ids, counts, states = [], [], []
    for rank in range(world):
        loader = make_loader(uri, LoaderConfig(**{**BASE, **kw}, num_workers=workers, rank=rank, world_size=world))
        loader.dataset.set_epoch(2)
        if state is not None:
            loader.load_state_dict(state)
        left = len(loader)
        it = iter(loader)
        n = left if k is None else k
        got = [next(it)["soma_joinid"].numpy() for _ in range(n)]
        states.append(loader.state_dict())
        del it
        assert all(len(b) == BASE["batch_size"] for b in got)
        ids.extend(got)
        counts.append(left)
    assert len(set(counts)) == 1, f"unequal batch counts per rank: {counts}"  # no DDP hang
    same = [{k: v for k, v in s.items() if k != "snapshot_ms"} for s in states]  # each rank opened its own
    assert all(s == same[0] for s in same), "ranks disagree on the loader state"
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), counts[0], states[0]


def elastic_epoch(uri, **kw):
    """4 ranks x 2 workers -> 3 ranks x 1 worker -> 1 rank x 2 workers (to the end)."""
    a, n_a, s = run_phase(uri, 4, 2, 7, **kw)
    b, n_b, s = run_phase(uri, 3, 0, 5, state=s, **kw)
    c, n_c, s = run_phase(uri, 1, 2, None, state=s, **kw)
    assert s["position"] == n_c and s["world_size"] == 1
    return np.concatenate([a, b, c]), (n_a, n_b, n_c)


def committed(uri, dataset=None):
    store = open_store(uri)
    ids = np.concatenate([np.arange(a, b) for a, b in store.complete_ranges()])
    if dataset is None:
        return ids
    obs = store.obs(["dataset_id"])
    keep = set(obs.index[obs["dataset_id"] == dataset].tolist())
    return np.array([i for i in ids if i in keep])


def check_exactly_once(got, expected, last_shards):
    assert len(np.unique(got)) == len(got), "a cell came back after it was consumed"
    assert set(got.tolist()) <= set(expected.tolist())
    assert len(expected) - len(got) < last_shards * (BASE["batch_size"] + 1)


def test_resize_4x2_to_3x1_to_1x2_delivers_every_cell_once(uri):
    got, counts = elastic_epoch(uri)
    # 1280 cells: 8 shards x 10 batches; 7 per rank taken -> 832 left = 3 x 17 batches + 16;
    # 5 taken -> 592 left = 2 shards x 18 batches + 16 dropped at the end of the epoch
    assert counts == (20, 17, 36)
    check_exactly_once(got, committed(uri), last_shards=2)
    assert len(got) == 1280 - 16


def test_same_world_resume_continues_batch_for_batch(uri):
    whole, _, _ = run_phase(uri, 2, 2, None)
    first, _, s = run_phase(uri, 2, 2, 3)
    rest, _, _ = run_phase(uri, 2, 2, None, state=s)
    # per rank: 3 batches then the rest, in the order of the uninterrupted epoch
    bs, per = BASE["batch_size"], len(whole) // 2
    for r in range(2):
        again = np.concatenate([first[r * 3 * bs:(r + 1) * 3 * bs], rest[r * (per - 3 * bs):(r + 1) * (per - 3 * bs)]])
        assert np.array_equal(again, whole[r * per:(r + 1) * per])


def test_resize_with_an_obs_filter(uri):
    expected = committed(uri, "ds1")  # 288 cells
    a, _, s = run_phase(uri, 2, 2, 2, obs_filter="dataset_id == 'ds1'")
    b, _, s = run_phase(uri, 3, 0, 1, state=s, obs_filter="dataset_id == 'ds1'")
    c, _, _ = run_phase(uri, 1, 0, None, state=s, obs_filter="dataset_id == 'ds1'")
    got = np.concatenate([a, b, c])
    check_exactly_once(got, expected, last_shards=1)
    assert len(got) == 288 - 288 % 16 - 0  # 288 - 64 - 48 = 176 = 11 batches on one shard: nothing dropped


def test_resize_with_balancing_keeps_the_epochs_multiset(uri):
    kw = dict(balance_by="dataset_id", balance_alpha=0.0)  # ds2's 32 cells repeat, ds0 is subsampled
    got, _ = elastic_epoch(uri, **kw)
    loader = make_loader(uri, LoaderConfig(**BASE, **kw, rank=0, world_size=1))
    order = loader.dataset.epoch_order(2)
    runs = loader.dataset.runs
    seq = np.concatenate([np.arange(a, b) for a, b in zip(order.starts, order.stops)])
    epoch_ids = np.concatenate([np.arange(a, b) for p in seq for a, b in runs.to_joinids(int(p), int(p) + 1)])
    ids, n_got = np.unique(got, return_counts=True)
    all_ids, n_all = np.unique(epoch_ids, return_counts=True)
    have = dict(zip(all_ids.tolist(), n_all.tolist()))
    assert all(have.get(i, 0) >= n for i, n in zip(ids.tolist(), n_got.tolist())), "more repeats than the epoch has"
    assert len(epoch_ids) - len(got) < 2 * 17
    ds = open_store(uri).obs(["dataset_id"]).loc[got, "dataset_id"].value_counts()
    assert abs(ds["ds2"] - ds["ds0"]) < 50  # alpha=0: every dataset about a third of the epoch


def test_the_epoch_after_a_resized_one_is_whole(uri):
    _, _, s = run_phase(uri, 4, 2, 7)
    loader = make_loader(uri, LoaderConfig(**BASE, rank=0, world_size=1))
    loader.load_state_dict(s)
    n_left = len(loader)
    assert n_left == (1280 - 4 * 7 * 16) // 16
    assert sum(1 for _ in loader) == n_left
    assert len(loader) == 80  # a finished resume leaves the next iteration a whole epoch
    loader.dataset.set_epoch(3)
    assert len(loader) == 80 and sum(1 for _ in loader) == 80
