"""The epoch plan as a pure function: exact partitioning for many shapes, without a store."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader.plan import (Phase, epoch_order, read_groups, stratified_order, window_spans,
                                   worker_batches_done)
from atlasflow.store.runs import Runs


def cells_of(starts, stops):
    return np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(starts) else np.zeros(0, int)


def slots_of(iv):
    return np.concatenate([np.arange(a, b) for a, b in np.asarray(iv).reshape(-1, 2)]) if len(iv) else np.zeros(0, int)


@pytest.mark.parametrize("n,shards,bs", [(1000, 4, 7), (997, 3, 10), (5000, 8, 32), (64, 2, 32)])
def test_drop_phase_is_exact(n, shards, bs):
    phase = Phase(np.array([[0, n]]), shards, bs, "drop")
    assert phase.n_batches == (n // shards) // bs
    per = [slots_of(phase.shard_slots(s)) for s in range(shards)]
    assert all(len(c) == phase.n_batches * bs for c in per)  # equal work per shard
    cat = np.concatenate(per)
    assert np.array_equal(cat, np.arange(len(cat)))  # contiguous slices, in order, no slot twice
    assert n - len(cat) < shards * (bs + 1)  # bounded drop


def test_pad_phase_covers_every_slot_and_tops_up_from_its_own():
    phase = Phase(np.array([[0, 100]]), 3, 16, "pad")
    per = [slots_of(phase.shard_slots(s)) for s in range(3)]
    assert all(len(c) == phase.n_batches * 16 == 48 for c in per)
    assert np.array_equal(np.unique(np.concatenate(per)), np.arange(100))
    assert np.array_equal(per[0][:33], np.arange(33)) and np.array_equal(per[0][33:], np.arange(15))


@pytest.mark.parametrize("seed", range(40))
def test_any_sequence_of_resizes_consumes_every_slot_exactly_once(seed):
    """Pure slot arithmetic, independent of the loader: a phase on S shards delivers k batches per
    rank (taken from workers in turn), is resized to a random S', and so on; at the end, the slots
    delivered over all phases are each slot of the epoch once, but for the last phase's drop."""
    rng = np.random.default_rng(seed)
    n, bs = int(rng.integers(200, 3000)), int(rng.integers(1, 20))
    remainder = "drop" if seed % 4 else "pad"
    iv, delivered = np.array([[0, n]]), []
    for _ in range(int(rng.integers(1, 5))):
        world, workers = int(rng.integers(1, 6)), int(rng.integers(0, 4))
        k_w = max(1, workers)
        phase = Phase(iv, world * k_w, bs, remainder)
        if phase.n_batches == 0:
            break
        per_rank = phase.n_batches * k_w
        k = int(rng.integers(0, per_rank))  # batches every rank delivered before the failure
        for r in range(world):
            for i in range(k):  # the rank's i-th batch is worker i % k_w's (i // k_w)-th
                w = i % k_w
                sl = slots_of(phase.shard_slots(r * k_w + w))
                delivered.append(sl[(i // k_w) * bs:(i // k_w + 1) * bs])
        done = [worker_batches_done(k, k_w, w) for _ in range(world) for w in range(k_w)]
        iv = phase.remaining(done)
        if remainder == "pad":
            assert sum(len(d) for d in delivered) <= n + world * k_w * per_rank * bs
    # the last phase runs to its end
    world, workers = int(rng.integers(1, 6)), int(rng.integers(0, 4))
    k_w = max(1, workers)
    last = Phase(iv, world * k_w, bs, remainder)
    finals = [slots_of(last.shard_slots(s)) for s in range(world * k_w)] if last.n_slots else []
    got = np.concatenate(delivered + finals) if delivered or finals else np.zeros(0, int)
    if remainder == "drop":
        assert len(np.unique(got)) == len(got)  # never a slot twice
        assert set(got.tolist()) <= set(range(n))
        assert n - len(got) == last.n_slots - last.n_batches * bs * world * k_w  # only the last phase drops
    else:
        assert set(got.tolist()) == set(range(n))  # pad: every slot at least once


def test_windows_are_whole_batches_and_their_order_is_world_free():
    order = epoch_order(3000, batch_size=16, chunk_cells=50, window_cells=200, seed=2, epoch=3, shuffle=True)
    assert order.window_cells == 192 and order.n_windows == 16
    parts = []
    for w in range(order.n_windows):
        s, e = order.window_pieces(w)
        reads = read_groups(s, e, 70)
        assert all(sum(int(b - a) for a, b in zip(*r)) <= 70 for r in reads)
        parts.append(np.concatenate([cells_of(*r) for r in reads]))
        perm = order.window_order(w, np.ones(len(parts[-1]), int))
        assert np.array_equal(np.sort(perm), np.arange(len(parts[-1])))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
    again = epoch_order(3000, batch_size=16, chunk_cells=50, window_cells=200, seed=2, epoch=3, shuffle=True)
    assert np.array_equal(again.starts, order.starts)
    assert np.array_equal(again.window_order(5, np.arange(192)), order.window_order(5, np.arange(192)))
    assert window_spans(np.array([[100, 500], [600, 610]]), 192) == [(0, 100, 192), (1, 0, 192), (2, 0, 116),
                                                                    (3, 24, 34)]


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
