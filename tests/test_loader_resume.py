"""Resume: consume N batches, save, rebuild from scratch, load: the next K batches are identical."""

from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest

from atlasflow.loader import LoaderConfig, make_loader

from test_loader_fixtures import synth_store

BASE = dict(tokenizer="bin", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=11,
            obs_columns=("dataset_id",))


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return synth_store(tmp_path_factory)


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


@pytest.mark.parametrize("workers,n,k", [(0, 5, 7), (2, 9, 12)])
def test_resume_gives_the_next_batches(uri, workers, n, k):
    cfg = LoaderConfig(**BASE, num_workers=workers, rank=1, world_size=2)
    a = make_loader(uri, cfg)
    a.dataset.set_epoch(1)
    it = iter(a)
    for _ in range(n):
        next(it)
    state = a.state_dict()
    expected = list(itertools.islice(it, k))
    del it
    blob = pickle.dumps(state)
    assert len(blob) < 16_000  # small: no per-cell ids
    assert state["format"] == "atlasflow.loader_state" and state["version"] == 2
    assert state["position"] == n and state["phase"] == [[0, 1280]]
    assert (state["seed"], state["epoch"], state["world_size"], state["num_workers"]) == (11, 1, 2, workers)

    b = make_loader(uri, cfg)  # from scratch, still at epoch 0 until the state says otherwise
    b.load_state_dict(pickle.loads(blob))
    got = list(itertools.islice(iter(b), k))
    assert len(got) == k
    for x, y in zip(expected, got):
        same(x, y)


def test_resume_at_end_of_epoch_then_next_epoch(uri):
    cfg = LoaderConfig(**BASE, rank=0, world_size=1)
    a = make_loader(uri, cfg)
    full = [x["soma_joinid"].numpy() for x in a]
    assert len(full) == a.dataset.batches_per_epoch
    b = make_loader(uri, cfg)
    it = iter(b)
    first = [next(it)["soma_joinid"].numpy() for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(first, full))


def test_a_resume_that_changes_the_order_is_refused_naming_the_field(uri):
    a = make_loader(uri, LoaderConfig(**BASE, rank=0, world_size=2))
    it = iter(a)
    next(it)
    state = a.state_dict()
    for field, value in (("seed", 12), ("tokenizer", "value"), ("window_cells", 256), ("bucket_batches", 4)):
        other = make_loader(uri, LoaderConfig(**{**BASE, field: value}, rank=0, world_size=2))
        with pytest.raises(ValueError, match=field):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        make_loader(uri, LoaderConfig(**BASE, rank=0, world_size=2)).load_state_dict({**state, "version": 7})
    with pytest.raises(ValueError, match="version 1"):
        make_loader(uri, LoaderConfig(**BASE, rank=0, world_size=2)).load_state_dict({**state, "version": 1})
    # a different world size is not refused: the rest of the epoch is re-cut (test_loader_elastic.py)
    make_loader(uri, LoaderConfig(**BASE, rank=0, world_size=3)).load_state_dict(state)


def test_state_records_position_json_able_dataset_state(uri):
    a = make_loader(uri, LoaderConfig(**BASE))
    it = iter(a)
    for _ in range(4):
        next(it)
    ds_state = a.dataset.state_dict()
    assert json.loads(json.dumps(ds_state))["position"] == 4


def test_after_a_resumed_epoch_the_next_epoch_is_whole(uri):
    cfg = LoaderConfig(**BASE)
    a = make_loader(uri, cfg)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    b = make_loader(uri, cfg)
    b.load_state_dict(state)
    rest = list(b)
    assert len(rest) == b.dataset.batches_per_epoch - 3
    b.dataset.set_epoch(1)
    nxt = [x["soma_joinid"].numpy() for x in b]
    assert len(nxt) == b.dataset.batches_per_epoch
    fresh = make_loader(uri, cfg)
    fresh.dataset.set_epoch(1)
    assert all(np.array_equal(x, y["soma_joinid"].numpy()) for x, y in zip(nxt, fresh))
