"""atlasflow query: selection, per-label caps, outputs (.h5ad, store, loader), Census mirror, CLI.

Expected values are recomputed independently: cell lists from ``Store.obs`` + pandas, counts from
a direct TileDB-SOMA read of X, the Census case against ``cellxgene_census.get_anndata``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from atlasflow.infra.cli import main as atlasflow_main
from atlasflow.ingest.export import to_h5ad, to_store
from atlasflow.loader import make_loader
from atlasflow.store.query import QueryConfig, select, subsample


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats

    path = tmp_path_factory.mktemp("query") / "store"
    synthesize(str(path), 300, 200, 3, 7, layout="store")
    compute_gene_stats(str(path))
    return str(path)


def dense_x(uri: str, joinids: np.ndarray, n_genes: int) -> np.ndarray:
    """Counts straight from the SOMA array (no atlasflow code)."""
    with soma.Experiment.open(uri) as exp:
        tbl = exp.ms["RNA"].X["raw"].read(coords=(joinids,)).tables().concat()
    out = np.zeros((len(joinids), n_genes), dtype=np.float32)
    rows = np.searchsorted(joinids, tbl["soma_dim_0"].to_numpy())
    out[rows, tbl["soma_dim_1"].to_numpy()] = tbl["soma_data"].to_numpy()
    return out


def test_filter_and_cap_match_pandas(store):
    from atlasflow.store import open_store

    obs = open_store(store).obs(["cell_type", "is_primary_data"])
    want = obs[obs["is_primary_data"]]
    cfg = QueryConfig(uri=store, obs_filter="is_primary_data == True", label="cell_type", per_label_cap=10,
                      seed=3)
    sel = select(cfg)
    assert sel.matched == len(want)
    expected_counts = {k: min(10, int(v)) for k, v in want["cell_type"].value_counts().items()}
    assert sel.counts == expected_counts
    assert np.all(np.diff(sel.joinids) > 0)
    assert set(sel.joinids) <= set(want.index)
    assert (obs.loc[sel.joinids, "cell_type"].to_numpy() == sel.labels).all()
    again = select(cfg)
    assert np.array_equal(again.joinids, sel.joinids)  # seeded: the same cells every run
    other = select(QueryConfig(**{**cfg.__dict__, "seed": 4}))
    assert not np.array_equal(other.joinids, sel.joinids)


def test_subsample_fraction_per_label():
    labels = np.array(["a"] * 10 + ["b"] * 4 + ["c"], dtype=object)
    pos = subsample(labels, cap=0, fraction=0.5, seed=0)
    kept = pd.Series(labels[pos]).value_counts().to_dict()
    assert kept == {"a": 5, "b": 2, "c": 1}  # round(0.5 * n), at least one per label
    # a label's draw does not depend on the other labels present
    solo = subsample(labels[:10], cap=0, fraction=0.5, seed=0)
    assert np.array_equal(solo, pos[labels[pos] == "a"])


def test_subsample_codes_equals_the_per_label_definition():
    """Many labels, interleaved: every label keeps exactly the cells its own seeded draw picks from its
    ascending positions (the definition, evaluated label by label with numpy)."""
    import hashlib

    from atlasflow.store.query import subsample_codes

    rng = np.random.default_rng(5)
    cats = [f"type {i}" for i in range(40)]
    codes = rng.integers(0, 40, 5000).astype(np.int32)
    got = subsample_codes(codes, cats, cap=90, fraction=0.5, seed=11)
    want = []
    for k, lab in enumerate(cats):
        pos = np.flatnonzero(codes == k)
        n = max(1, round(0.5 * min(len(pos), 90)))
        if n < len(pos):
            h = int.from_bytes(hashlib.blake2b(f"11:{lab}".encode(), digest_size=8).digest(), "big")
            pos = np.random.default_rng(h).choice(pos, size=n, replace=False)
        want.append(pos)
    assert np.array_equal(got, np.sort(np.concatenate(want)))


def test_h5ad_output_equals_store_counts(store, tmp_path):
    import anndata as ad

    from atlasflow.store import open_store

    s = open_store(store)
    var = s.var()
    cfg = QueryConfig(uri=store, obs_filter="cell_type == 'B cell'", label="cell_type", block_cells=7,
                      obs_columns=("cell_type", "dataset_id"))
    sel = to_h5ad(cfg, str(tmp_path / "q.h5ad"))
    a = ad.read_h5ad(tmp_path / "q.h5ad")
    obs = s.obs(["cell_type"])
    ids = obs.index[obs["cell_type"] == "B cell"].to_numpy()
    assert a.n_obs == len(ids) == sel.n_cells and sel.counts == {"B cell": len(ids)}
    assert list(a.obs.index.astype(int)) == ids.tolist()
    assert list(a.var.index) == list(var["feature_id"])  # Ensembl ids in var
    assert sorted(a.obs.columns) == ["cell_type", "dataset_id"]
    assert np.array_equal(a.X.toarray(), dense_x(store, ids, len(var)))


def test_gene_subset_and_new_store(store, tmp_path):
    from atlasflow.store import open_store

    s = open_store(store)
    var = s.var()
    genes = tuple(var["feature_id"].iloc[[3, 50, 120]])
    cfg = QueryConfig(uri=store, genes=genes, label="cell_type", per_label_cap=5)
    sel = to_store(cfg, str(tmp_path / "sub"))
    new = open_store(str(tmp_path / "sub"))
    assert new.n_cells == sel.n_cells == sum(sel.counts.values())
    assert list(new.var()["feature_id"]) == sorted(genes)  # the store registers genes in sorted order
    assert [e.kind for e in new.manifest.complete()] == ["query"]
    assert len(new.gene_stats()) == 3
    got = dense_x(str(tmp_path / "sub"), np.arange(new.n_cells), 3)
    ref_cols = [int(var.index[var["feature_id"] == g][0]) for g in sorted(genes)]
    assert np.array_equal(got, dense_x(store, sel.joinids, len(var))[:, ref_cols])
    # raw_sum in the new store is over the kept genes (what the new store's tokenizers will see)
    assert np.allclose(new.obs(["raw_sum"])["raw_sum"].to_numpy(), got.sum(1))


def test_empty_and_bad_queries_are_refused(store):
    with pytest.raises(ValueError, match="matches no cells"):
        select(QueryConfig(uri=store, obs_filter="cell_type == 'no such cell'"))
    with pytest.raises(ValueError, match="label / obs_columns.*'nope'"):
        select(QueryConfig(uri=store, label="nope"))
    with pytest.raises(ValueError, match="QueryConfig.per_label_cap"):
        QueryConfig(uri=store, label="cell_type", per_label_cap=-1)
    with pytest.raises(ValueError, match="QueryConfig.label"):
        QueryConfig(uri=store, fraction=0.5)
    with pytest.raises(ValueError, match="QueryConfig.genes"):
        select(QueryConfig(uri=store, genes=("ENSG_NOT_A_GENE",)))


def test_loader_over_query_without_copy(store):
    from atlasflow.loader import LoaderConfig
    from atlasflow.store import open_store

    obs = open_store(store).obs(["cell_type"])
    want = set(obs.index[obs["cell_type"] == "B cell"])
    loader = make_loader(QueryConfig(uri=store, obs_filter="cell_type == 'B cell'"),
                       LoaderConfig(batch_size=4, shuffle=False, remainder="pad", max_len=32))
    seen = {int(j) for b in loader for j in b["soma_joinid"]}
    assert seen == want
    with pytest.raises(ValueError, match="per_label_cap"):
        make_loader(QueryConfig(uri=store, label="cell_type", per_label_cap=2))


def test_census_mirror_matches_get_anndata(tmp_path):
    import cellxgene_census

    from atlasflow.ingest.synth import synthesize

    root = tmp_path / "census"
    synthesize(str(root), 240, 150, 3, 11, layout="census")
    flt = "cell_type == 'B cell' and is_primary_data == True"
    cfg = QueryConfig(source="census", uri=str(root), organism="Homo sapiens", obs_filter=flt,
                      label="cell_type", block_cells=16)
    sel = to_h5ad(cfg, str(tmp_path / "c.h5ad"))
    import anndata as ad

    got = ad.read_h5ad(tmp_path / "c.h5ad")
    with cellxgene_census.open_soma(uri=str(root)) as census:
        ref = cellxgene_census.get_anndata(census, "Homo sapiens", obs_value_filter=flt)
    ref = ref[np.argsort(ref.obs["soma_joinid"].to_numpy())]
    assert sel.n_cells == ref.n_obs > 0
    assert got.obs.index.astype(int).tolist() == ref.obs["soma_joinid"].tolist()
    assert list(got.var.index) == list(ref.var["feature_id"])
    assert np.array_equal(got.X.toarray(), sp.csr_matrix(ref.X).toarray())


def test_cli_prints_counts_and_refuses_empty(store, tmp_path, capsys):
    assert atlasflow_main(["query", "--input", store, "--label", "cell_type", "--per-label-cap", "3",
                           "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per label:" in out and "B cell" in out
    rc = atlasflow_main(["query", "--input", store, "--filter", "cell_type == 'zzz'", "--out-h5ad",
                         str(tmp_path / "x.h5ad")])
    assert rc == 2
    assert "matches no cells" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_query_fingerprint_survives_the_obs_filter_rename():
    """QueryConfig.obs_value_filter became obs_filter (one name across loader, query, ingest and CLI);
    a store source written by a query is recognised by its fingerprint, so the fingerprint must not
    change: this value was computed by the pre-rename QueryConfig (commit 037383b) for the same query."""
    from atlasflow.store.query import QueryConfig

    q = QueryConfig(source="store", uri="/data/atlas", obs_filter="tissue_general == 'lung'", label="cell_type",
                    seed=3)
    assert q.key() == "66cb3b7c512bb1d488b57e0c4b553931"


def test_selection_layer_ordered_and_unordered_reads_select_the_same_cells(store):
    """store.selection is the one obs-filter engine: its joinid-ordered (sliced) read and its
    unordered (one streaming) read select the cells pandas selects from Store.obs."""
    from atlasflow.store import open_store
    from atlasflow.store import selection as S
    from atlasflow.store.runs import Runs
    from atlasflow.store.view import StoreView, open_view

    view = open_view(store)
    assert isinstance(view, StoreView)
    obs = open_store(store).obs(["cell_type"])
    want = obs.index[obs["cell_type"] == "B cell"].to_numpy()
    assert 0 < len(want) < len(obs)
    within = Runs.from_ranges(view.complete_ranges())
    old_slice, S.OBS_SLICE = S.OBS_SLICE, 37  # several slices, the last one partial
    try:
        with view.experiment() as exp:
            ordered = np.concatenate([t["soma_joinid"].to_numpy() for t in
                                      S.obs_batches(exp, ["cell_type"], "cell_type == 'B cell'", within)])
            unordered = np.concatenate([t["soma_joinid"].to_numpy() for t in
                                        S.obs_batches(exp, [], "cell_type == 'B cell'", within, ordered=False)])
            runs = S.query_runs(exp, within, "cell_type == 'B cell'")
            with pytest.raises(ValueError, match="QueryConfig.obs_filter: 'no_such_column == 1'"):
                list(S.obs_batches(exp, [], "no_such_column == 1", within, field="QueryConfig.obs_filter"))
    finally:
        S.OBS_SLICE = old_slice
    assert np.array_equal(ordered, want)  # joinid order, every slice once
    assert np.array_equal(np.sort(unordered), want)
    assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in runs.ranges()]), want)


def test_ordered_obs_reads_are_in_joinid_order_when_fragments_are_not(tmp_path):
    """Two writers commit obs rows out of joinid order (the later range first, as concurrent ingests can):
    the ordered read still yields each slice sorted by joinid, every row once, labels aligned. (tiledbsoma
    2.3 happened to return these rows sorted without being asked; the ordered read must not rely on it.)"""
    import pyarrow as pa
    import tiledbsoma as soma

    from atlasflow.store import selection as S
    from atlasflow.store.runs import Runs

    schema = pa.schema([("soma_joinid", pa.int64()), ("dataset_id", pa.large_string())])
    uri = str(tmp_path / "exp")
    with soma.Experiment.create(uri) as exp:
        exp.add_new_dataframe("obs", schema=schema, index_column_names=["soma_joinid"], domain=[(0, 999)])
    parts = [np.arange(60, 100), np.arange(0, 60), np.arange(100, 130)]  # three fragments, out of order
    for ids in parts:
        with soma.Experiment.open(uri, "w") as exp:
            exp.obs.write(pa.table({"soma_joinid": ids, "dataset_id": [f"d{i // 50}" for i in ids]}, schema=schema))
    old_slice, S.OBS_SLICE = S.OBS_SLICE, 80  # a slice spans fragments
    try:
        with soma.Experiment.open(uri) as exp:
            tables = list(S.obs_batches(exp, ["dataset_id"], None, Runs.from_ranges([(0, 130)])))
            labels = S.obs_labels(exp, Runs.from_ranges([(0, 130)]), {"dataset_id": True}, None)["dataset_id"]
    finally:
        S.OBS_SLICE = old_slice
    ids = np.concatenate([t["soma_joinid"].to_numpy() for t in tables])
    assert np.array_equal(ids, np.arange(130))
    assert [v for t in tables for v in t["dataset_id"].to_pylist()] == [f"d{i // 50}" for i in range(130)]
    assert list(labels.bounds) == [0, 50, 100, 130] and labels.categories == ["d0", "d1", "d2"]
