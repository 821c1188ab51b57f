"""Exact partitioning across simulated ranks x real DataLoader workers; epoch order; committed cells only."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.store import open_store

from test_loader_fixtures import SYNTH_SIZES, synth_store

N = sum(SYNTH_SIZES)  # 1280 committed cells
SMALL = dict(tokenizer="value", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=3)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return synth_store(tmp_path_factory)


def epoch_ids(uri, world, workers, epoch=0, **kw):
    """soma_joinids per rank (list of batches), each rank a fresh loader as in DDP."""
    out = []
    for rank in range(world):
        loader = make_loader(uri, LoaderConfig(**{**SMALL, **kw}, num_workers=workers, rank=rank, world_size=world))
        loader.dataset.set_epoch(epoch)
        batches = [b["soma_joinid"].numpy() for b in loader]
        assert len(batches) == loader.dataset.batches_per_epoch == len(loader)
        out.append(batches)
    return out


def test_every_cell_exactly_once_2_ranks_x_2_workers(uri):
    committed = np.concatenate([np.arange(a, b) for a, b in open_store(uri).complete_ranges()])
    assert len(committed) == N
    per_rank = epoch_ids(uri, world=2, workers=2)
    # 1280 cells / (2 x 2 shards) = 320 = 20 batches of 16 per shard: nothing dropped
    assert [len(r) for r in per_rank] == [40, 40]
    assert all(len(b) == 16 for r in per_rank for b in r)
    seen = np.concatenate([b for r in per_rank for b in r])
    assert len(seen) == N
    assert np.array_equal(np.sort(seen), committed)  # each committed cell once, never a pending one


def test_order_changes_with_epoch_and_repeats_with_seed(uri):
    e0 = np.concatenate([b for r in epoch_ids(uri, 2, 2, epoch=0) for b in r])
    e0_again = np.concatenate([b for r in epoch_ids(uri, 2, 2, epoch=0) for b in r])
    e1 = np.concatenate([b for r in epoch_ids(uri, 2, 2, epoch=1) for b in r])
    assert np.array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    assert np.array_equal(np.sort(e0), np.sort(e1))
    other_seed = np.concatenate([b for r in epoch_ids(uri, 2, 2, epoch=0, seed=4) for b in r])
    assert not np.array_equal(e0, other_seed)
    # shuffled well beyond chunk granularity: consecutive cells rarely stay adjacent
    adjacent = np.mean(np.abs(np.diff(e0)) == 1)
    assert adjacent < 0.5


def test_drop_remainder_is_bounded_and_batches_equal(uri):
    # 3 ranks x 1 worker, batch 24: 1280 // 3 = 426 -> 17 batches per rank, 1224 cells, 56 dropped
    per_rank = epoch_ids(uri, world=3, workers=0, batch_size=24)
    assert [len(r) for r in per_rank] == [17, 17, 17]
    seen = np.concatenate([b for r in per_rank for b in r])
    assert len(np.unique(seen)) == len(seen) == 17 * 24 * 3
    assert N - len(seen) < 3 * (24 + 1)


def test_pad_remainder_covers_every_cell(uri):
    per_rank = epoch_ids(uri, world=3, workers=0, batch_size=24, remainder="pad")
    assert [len(r) for r in per_rank] == [18, 18, 18]  # ceil(ceil(1280 / 3) / 24)
    seen = np.concatenate([b for r in per_rank for b in r])
    assert len(np.unique(seen)) == N  # every cell at least once
    assert len(seen) - N < 3 * (24 + 1)  # duplicates bounded


def test_unshuffled_is_joinid_order(uri):
    per_rank = epoch_ids(uri, world=1, workers=0, shuffle=False)
    seen = np.concatenate(per_rank[0])
    committed = np.concatenate([np.arange(a, b) for a, b in open_store(uri).complete_ranges()])
    assert np.array_equal(seen, committed)


def test_obs_filter_streams_only_matching_cells(uri):
    store = open_store(uri)
    want = store.obs(["dataset_id"]).query("dataset_id == 'ds1'").index.to_numpy()
    seen = np.concatenate(epoch_ids(uri, 1, 0, obs_filter="dataset_id == 'ds1'")[0])
    assert np.array_equal(np.sort(seen), want)  # 288 = 18 batches of 16


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="tokenizer"):
        LoaderConfig(tokenizer="bpe")
    with pytest.raises(ValueError, match="balance_alpha"):
        LoaderConfig(balance_alpha=2.0)
    with pytest.raises(ValueError, match="rank"):
        LoaderConfig(rank=2, world_size=2)
    with pytest.raises(TypeError, match="batch_size"):
        LoaderConfig(batch_size=3.5)
    with pytest.raises(ValueError, match="split_fractions"):
        LoaderConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="read_threads"):
        LoaderConfig(read_threads=0)


def test_read_threads_default_to_two_in_process_and_one_per_worker():
    assert LoaderConfig().threads_per_process == 2
    assert LoaderConfig(num_workers=3).threads_per_process == 1
    assert LoaderConfig(num_workers=3, read_threads=4).threads_per_process == 4


def test_bad_query_is_refused(uri):
    with pytest.raises(ValueError, match="obs_columns"):
        make_loader(uri, LoaderConfig(**SMALL, obs_columns=("no_such_column",)))
    with pytest.raises(ValueError, match="no committed cells"):
        make_loader(uri, LoaderConfig(**SMALL, obs_filter="dataset_id == 'dsX'"))  # only the pending source
    with pytest.raises(ValueError, match="obs_filter"):
        make_loader(uri, LoaderConfig(**SMALL, obs_filter="dataset_id === 'ds1'"))
