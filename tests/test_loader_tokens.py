"""Tokens of real cells equal a straightforward dense, one-cell-at-a-time numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader import CLS, EOS, LoaderConfig, Vocab, gene_hash, make_loader
from atlasflow.store import open_store

from test_loader_fixtures import real_store, synth_store


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_store(tmp_path_factory)


def independent_medians(dense: np.ndarray) -> np.ndarray:
    med = np.full(dense.shape[1], np.nan)
    norm = dense / dense.sum(axis=1, keepdims=True) * 1e4
    for g in range(dense.shape[1]):
        nz = dense[:, g] > 0
        if nz.any():
            med[g] = np.median(norm[nz, g])
    return med


def ref_rank(x, med, max_len):
    nz = np.flatnonzero(x)
    y = x[nz] / x.sum() * 1e4 / med[nz]
    order = sorted(range(len(nz)), key=lambda i: (-y[i], nz[i]))  # y descending, gene id ascending
    return np.array([CLS] + [4 + nz[i] for i in order][: max_len - 2] + [EOS])


def ref_bin(x, n_bins):
    nz = np.flatnonzero(x)
    v = x[nz]
    edges = np.quantile(v, np.linspace(0, 1, n_bins - 1))
    return np.array([CLS] + [4 + g for g in nz]), np.concatenate([[0], np.digitize(v, edges)])


def ref_value(x):
    nz = np.flatnonzero(x)
    return np.array([CLS] + [4 + g for g in nz]), np.concatenate([[0], np.log1p(x[nz] / x.sum() * 1e4)])


def stream(uri, **kw):
    loader = make_loader(uri, LoaderConfig(batch_size=20, window_cells=80, read_cells=40, chunk_cells=16, **kw))
    for b in loader:
        for i in range(len(b["soma_joinid"])):
            n = int(b["lengths"][i])
            yield int(b["soma_joinid"][i]), {k: v[i, :n].numpy() for k, v in b.items() if v.ndim == 2}, \
                b["attention_mask"][i].numpy(), n


def test_store_medians_match_independent_numpy(real):
    uri, dense, _ = real
    stats = open_store(uri).gene_stats()
    med = independent_medians(dense)
    got = stats["nonzero_median"].reindex(range(dense.shape[1])).to_numpy()
    assert np.allclose(got[np.isfinite(med)], med[np.isfinite(med)], rtol=0, atol=1e-9)


@pytest.mark.parametrize("max_len", [2048, 64])
def test_rank_tokens_equal_reference(real, max_len):
    uri, dense, _ = real
    med = independent_medians(dense)
    seen = 0
    for jid, seq, mask, n in stream(uri, tokenizer="rank", max_len=max_len):
        assert np.array_equal(seq["input_ids"], ref_rank(dense[jid], med, max_len)), jid
        assert mask[:n].all() and not mask[n:].any()
        seen += 1
    assert seen == len(dense)


def test_bin_tokens_equal_reference(real):
    uri, dense, _ = real
    for jid, seq, _, n in stream(uri, tokenizer="bin", n_bins=51, max_len=10_000):
        ids, bins = ref_bin(dense[jid], 51)
        assert np.array_equal(seq["input_ids"], ids), jid
        assert np.array_equal(seq["bins"], bins), jid
        assert bins[1:].min() >= 1 and bins.max() <= 50


def test_value_tokens_equal_reference(real):
    uri, dense, _ = real
    for jid, seq, _, n in stream(uri, tokenizer="value", max_len=10_000):
        ids, vals = ref_value(dense[jid])
        assert np.array_equal(seq["input_ids"], ids), jid
        assert np.array_equal(seq["values"], vals.astype(np.float32)), jid


def test_long_cells_are_sampled_by_seeded_hash(real):
    uri, dense, _ = real
    max_len, seed, epoch = 200, 5, 2
    got = {}
    loader = make_loader(uri, LoaderConfig(tokenizer="bin", max_len=max_len, seed=seed, batch_size=20,
                                           window_cells=64, read_cells=32, chunk_cells=16))
    loader.dataset.set_epoch(epoch)
    for b in loader:
        for i, jid in enumerate(b["soma_joinid"].tolist()):
            got[jid] = (b["input_ids"][i, : b["lengths"][i]].numpy(), b["bins"][i, : b["lengths"][i]].numpy())
    long_cells = [j for j in got if (dense[j] > 0).sum() > max_len - 1]
    assert len(long_cells) > 50
    for jid in long_cells[:60]:
        x = dense[jid]
        nz = np.flatnonzero(x)
        h = gene_hash(seed, epoch, np.full(len(nz), jid), nz)
        keep = np.sort(nz[np.argsort(h, kind="stable")[: max_len - 1]])
        _, all_bins = ref_bin(x, 51)
        ids, bins = got[jid]
        assert np.array_equal(ids, np.concatenate([[CLS], 4 + keep]))
        assert np.array_equal(bins[1:], all_bins[1:][np.searchsorted(nz, keep)])  # bins use all genes


@pytest.mark.parametrize("compact_runs", [4096, 0])
def test_obs_labels_and_vocab_round_trip(real, monkeypatch, compact_runs):
    """Labels equal the store's obs, whether a column is looked up from its runs (compact: cell_type
    within 4,096 runs; dataset_id, the stratification column, always) or read with every block
    (compact_runs=0: cell_type exceeds the budget)."""
    import atlasflow.loader.dataset as D

    monkeypatch.setattr(D, "COMPACT_LABEL_RUNS", compact_runs)
    uri, dense, ds = real
    cell_type = open_store(uri).obs(["cell_type"])["cell_type"].astype(str).to_numpy()
    loader = make_loader(uri, LoaderConfig(tokenizer="value", obs_columns=("dataset_id", "cell_type"), batch_size=20,
                                           window_cells=64, read_cells=32, chunk_cells=16))
    assert sorted(loader.dataset._run_labels) == (["cell_type", "dataset_id"] if compact_runs else ["dataset_id"])
    cats = loader.dataset.obs_categories["dataset_id"]
    assert cats == sorted(set(ds))
    ct = loader.dataset.obs_categories["cell_type"]
    n = 0
    for b in loader:
        codes = b["obs.dataset_id"].numpy()
        assert [cats[c] for c in codes] == list(ds[b["soma_joinid"].numpy()])
        assert [ct[c] for c in b["obs.cell_type"].numpy()] == list(cell_type[b["soma_joinid"].numpy()])
        n += len(codes)
    assert n == len(ds) // 20 * 20
    v = loader.dataset.vocab
    assert len(v) == 4 + dense.shape[1]
    v2 = Vocab.from_dict(__import__("json").loads(__import__("json").dumps(v.to_dict())))
    assert np.array_equal(v2.gene_joinids, v.gene_joinids) and v2.gene_feature_ids == v.gene_feature_ids
    assert v2.token_of(v.gene_feature_ids[5]) == 9
    with pytest.raises(ValueError, match="version"):
        Vocab.from_dict({**v.to_dict(), "version": 99})


def test_gene_filter_restricts_vocab_and_tokens(real):
    uri, dense, _ = real
    var = open_store(uri).var()
    coding = var.index[var["feature_type"] == "protein_coding"].to_numpy()
    loader = make_loader(uri, LoaderConfig(tokenizer="value", gene_filter="protein_coding", batch_size=20,
                                           window_cells=64, read_cells=32, chunk_cells=16, shuffle=False))
    v = loader.dataset.vocab
    assert np.array_equal(v.gene_joinids, coding)
    b = next(iter(loader))
    jid = int(b["soma_joinid"][0])
    x = dense[jid]
    nz = [g for g in np.flatnonzero(x) if g in set(coding)]
    want = [CLS] + [4 + int(np.searchsorted(coding, g)) for g in nz]
    assert b["input_ids"][0, : b["lengths"][0]].tolist() == want
    # values still normalize by the cell's full raw_sum
    assert np.allclose(b["values"][0, 1: b["lengths"][0]].numpy(), np.log1p(x[nz] / x.sum() * 1e4), rtol=1e-6)


def test_rank_without_stats_tells_what_to_run(tmp_path_factory):
    uri = synth_store(tmp_path_factory)
    with pytest.raises(ValueError, match="atlasflow store stats"):
        make_loader(uri, LoaderConfig(tokenizer="rank"))


def test_obs_label_codes_decode_to_the_stored_values_for_every_column_type(tmp_path_factory):
    """String, bool, int and float obs columns: categories[code] is the cell's stored value."""
    uri = synth_store(tmp_path_factory)
    cols = ("cell_type", "is_primary_data", "nnz", "raw_sum")
    obs = open_store(uri).obs(list(cols))
    loader = make_loader(uri, LoaderConfig(tokenizer="value", obs_columns=cols, batch_size=16, window_cells=64,
                                           read_cells=32, chunk_cells=16))
    cats = loader.dataset.obs_categories
    parse = {"cell_type": str, "is_primary_data": lambda s: {"true": True, "false": False}[s], "nnz": int,
             "raw_sum": float}
    seen = 0
    for b in loader:
        for i, jid in enumerate(b["soma_joinid"].tolist()):
            for c in cols:
                code = int(b[f"obs.{c}"][i])
                assert code >= 0, (c, jid)
                assert parse[c](cats[c][code]) == obs.loc[jid, c], (c, jid)
            seen += 1
    assert seen >= len(obs) - 16


def test_one_obs_pass_gives_each_column_as_pandas_sees_it_under_a_filter(tmp_path_factory):
    """The loader reads every obs column it needs in one pass: run-length labels expand to exactly the
    query cells' values in joinid order; category-only columns list the query's distinct values."""
    from atlasflow.store.selection import obs_labels, query_runs
    from atlasflow.store.runs import Runs

    uri = synth_store(tmp_path_factory)
    s = open_store(uri)
    obs = s.obs(["dataset_id", "cell_type", "nnz"])
    cut = int(obs["nnz"].median())
    flt = f"nnz > {cut}"
    want = obs[obs["nnz"] > cut].sort_index()
    assert 0 < len(want) < len(obs)
    with s.experiment() as exp:
        runs = query_runs(exp, Runs.from_ranges(s.complete_ranges()), flt)
        got = obs_labels(exp, runs, {"dataset_id": True, "cell_type": True, "nnz": False}, flt)
    for c in ("dataset_id", "cell_type"):
        lab = got[c]
        per_cell = np.repeat(np.array(lab.categories, dtype=object)[lab.codes], np.diff(lab.bounds))
        assert list(per_cell) == list(want[c].astype(str)), c
        assert lab.categories == sorted(set(want[c].astype(str))), c
    assert got["nnz"] == sorted(set(want["nnz"].astype(str)))
