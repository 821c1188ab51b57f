"""The epoch plan as a pure function: exact partitioning for many shapes, without a store."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader.plan import ShardPlan, plan_epoch, read_groups, stratified_order
from atlasflow.loader.runs import Labels, Runs


def cells_of(starts, stops):
    return np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(starts) else np.zeros(0, int)


@pytest.mark.parametrize("n,shards,bs,chunk", [(1000, 4, 7, 16), (997, 3, 10, 1), (5000, 8, 32, 100), (64, 2, 32, 8)])
def test_drop_plan_is_exact(n, shards, bs, chunk):
    labels = Labels(np.array([0, n // 2, n - n // 5, n]), np.array([0, 1, 2], dtype=np.int32), ["a", "b", "c"])
    plans, n_batches, window = plan_epoch(n, batch_size=bs, chunk_cells=chunk, window_cells=64, seed=1, epoch=0,
                                          shuffle=True, n_shards=shards, remainder="drop", strata=labels)
    assert n_batches == (n // shards) // bs
    all_cells = [cells_of(*p) for p in plans]
    assert all(len(c) == n_batches * bs for c in all_cells)  # equal work per shard
    cat = np.concatenate(all_cells)
    assert len(np.unique(cat)) == len(cat)  # no cell twice
    assert n - len(cat) < shards * (bs + 1)  # bounded drop
    again, _, _ = plan_epoch(n, batch_size=bs, chunk_cells=chunk, window_cells=64, seed=1, epoch=0, shuffle=True,
                             n_shards=shards, remainder="drop", strata=labels)
    assert all(np.array_equal(cells_of(*a), cells_of(*b)) for a, b in zip(plans, again))  # pure


def test_windows_and_reads_cover_the_shard_in_order():
    plans, nb, window = plan_epoch(3000, batch_size=16, chunk_cells=50, window_cells=200, seed=2, epoch=3,
                                   shuffle=True, n_shards=2, remainder="drop")
    sp = ShardPlan(*plans[1], nb, 16, window, 2, 3, 1, True)
    assert window == 192  # whole batches per window
    parts = []
    for w in range(sp.n_windows):
        s, e = sp.window(w)
        reads = read_groups(s, e, 70)
        assert all(sum(int(b - a) for a, b in zip(*r)) <= 70 for r in reads)
        parts.append(np.concatenate([cells_of(*r) for r in reads]))
        perm = sp.window_order(w, len(parts[-1]))
        assert np.array_equal(np.sort(perm), np.arange(len(parts[-1])))
    assert np.array_equal(np.concatenate(parts), cells_of(*plans[1]))


def test_stratified_order_spreads_every_group():
    codes = np.repeat(np.arange(4), [400, 100, 40, 10]).astype(np.int32)
    order = stratified_order(codes, np.random.default_rng(0))
    assert np.array_equal(np.sort(order), np.arange(len(codes)))
    for part in np.array_split(codes[order], 10):  # each tenth holds each group in proportion (+-1)
        assert abs((part == 3).sum() - 1) <= 1 and abs((part == 0).sum() - 40) <= 1


def test_runs_intersect_and_positions():
    a = Runs.from_ranges([(0, 10), (20, 30), (40, 50)])
    b = Runs.from_ranges([(5, 25), (45, 100)])
    c = a.intersect(b)
    assert list(zip(c.starts, c.stops)) == [(5, 10), (20, 25), (45, 50)]
    ids = np.array([5, 9, 20, 24, 45, 49])
    assert np.array_equal(c.positions_of(ids), [0, 4, 5, 9, 10, 14])
    assert c.to_joinids(3, 12) == [(8, 10), (20, 25), (45, 47)]
    assert Runs.from_sorted_ids(np.array([1, 2, 3, 7, 8, 10])).n_runs == 3


def test_first_window_is_a_quarter_and_locate_finds_every_batch():
    plans, nb, window = plan_epoch(3000, batch_size=16, chunk_cells=50, window_cells=200, seed=2, epoch=3,
                                   shuffle=True, n_shards=2, remainder="drop")
    sp = ShardPlan(*plans[0], nb, 16, window, 2, 3, 0, True)
    sizes = [hi - lo for lo, hi in map(sp.window_range, range(sp.n_windows))]
    assert sizes[0] == 48 and set(sizes[1:-1]) == {192} and 0 < sizes[-1] <= 192
    assert sum(sizes) == nb * 16  # windows tile the shard
    walked = [(w, k) for w, n in enumerate(sizes) for k in range(n // 16)]  # batch -> (window, index)
    assert len(walked) == nb
    assert [sp.locate(b) for b in range(nb)] == walked
