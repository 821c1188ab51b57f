"""Ingest every real dataset in ../shared/data into one store and check it exactly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from atlasflow.ingest import ingest_paths
from atlasflow.store import open_store
from atlasflow.store.genes import gene_reference


@pytest.fixture(scope="session")
def real_store(shared_data, ray_session, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("real") / "store")
    report = ingest_paths(uri, [str(shared_data)], progress=False)
    return uri, report


def _source_counts(path):
    """Raw counts as a user would find them: raw.X when present, else X (independent of ingest)."""
    a = ad.read_h5ad(path)
    if a.raw is not None:
        return sp.csr_matrix(a.raw.X, dtype=np.float64), a.raw.var, a.obs
    return sp.csr_matrix(a.X, dtype=np.float64), a.var, a.obs


def _store_block(store, entry):
    with store.experiment() as exp:
        tbl = exp.ms["RNA"].X["raw"].read(coords=(slice(entry.joinid_start, entry.joinid_stop - 1),)).tables().concat()
    rows = tbl["soma_dim_0"].to_numpy() - entry.joinid_start
    return sp.csr_matrix((tbl["soma_data"].to_numpy().astype(np.float64), (rows, tbl["soma_dim_1"].to_numpy())),
                         shape=(entry.n_cells, store.n_genes))


def test_every_real_source_ingested(real_store, shared_data):
    uri, report = real_store
    assert report.failed == []
    store = open_store(uri)
    names = sorted(e.name for e in store.manifest.complete())
    assert names == sorted(p.name for p in shared_data.glob("*.h5ad"))
    obs = store.obs(["source_file", "source_row"])
    for e in store.manifest.complete():
        rows = obs[obs.source_file == e.name].source_row.to_numpy()
        assert np.array_equal(np.sort(rows), np.arange(e.n_cells)), e.name  # every cell exactly once


def test_counts_conserved_column_by_column(real_store, shared_data):
    """Each stored gene column equals the source column it came from; every count not stored
    belongs to a gene the reference does not know (reported as unmapped)."""
    uri, _ = real_store
    store = open_store(uri)
    var = store.var()
    ref = gene_reference()
    ref_ids, ref_symbols = set(ref.index), set(ref["feature_name"])
    obs = store.obs(["source_file", "raw_sum", "nnz", "cell_type"])
    for e in store.manifest.complete():
        B, svar, sobs = _source_counts(shared_data / e.name)
        A = _store_block(store, e)
        ids = svar.index.astype(str).to_numpy()
        ensembl = np.mean([i.startswith("ENSG") for i in ids]) > 0.9
        col_of = {v: i for i, v in enumerate(ids)}
        symbols = svar["gene_symbol"].astype(str).to_numpy() if "gene_symbol" in svar else None
        js = np.unique(A.indices)
        cs = []
        for j in js:
            fid, name = var.at[j, "feature_id"], var.at[j, "feature_name"]
            c = col_of.get(fid) if ensembl else col_of.get(name)
            if c is None and symbols is not None:  # a retired ID matched through its symbol
                c = int(np.flatnonzero(symbols == name)[0])
            assert c is not None, (e.name, fid, name)
            cs.append(c)
        cs = np.array(cs, dtype=int)
        assert len(set(cs)) == len(cs), e.name  # no two source genes merged
        assert (A[:, js] != B[:, cs]).nnz == 0, e.name
        used = np.zeros(len(ids), bool)
        used[cs] = True
        unstored = B[:, ~used]
        # Counts are conserved: stored + dropped == source total, and each dropped gene with counts
        # is unknown to the reference (or an ERCC spike-in).
        assert A.sum() + unstored.sum() == pytest.approx(B.sum(), rel=0, abs=0)
        dropped = ids[~used][np.asarray(unstored.sum(axis=0)).ravel() > 0]
        for d in dropped:
            known = (d.split(".")[0] in ref_ids) if ensembl else (d in ref_symbols)
            assert not known or (symbols is not None), (e.name, d)
        # obs: per-cell totals and labels carried over
        o = obs[obs.source_file == e.name]
        assert np.array_equal(o.raw_sum.to_numpy(), np.asarray(A.sum(axis=1)).ravel())
        assert np.array_equal(o.nnz.to_numpy(), np.diff(A.indptr))
        if "cell_type" in sobs:
            assert list(o.cell_type) == [str(x) for x in sobs["cell_type"]]


def test_symbol_and_ensembl_sources_share_genes(real_store, shared_data):
    """Spot-check harmonization: MS4A1/CD3E/LYZ land in one column whether named by symbol or Ensembl."""
    uri, _ = real_store
    store = open_store(uri)
    var = store.var()
    known = {"MS4A1": "ENSG00000156738", "CD3E": "ENSG00000198851", "CD79A": "ENSG00000105369"}
    obs = store.obs(["source_file"])
    for symbol, ensembl in known.items():
        rows = var[var.feature_id == ensembl]
        assert len(rows) == 1 and rows.feature_name.iloc[0] == symbol
        j = rows.index[0]
        for fname, by in [("soupx_pbmc4k_2170cells_counts.h5ad", "ensembl"),
                          ("garnett_zheng2017_pbmc_800cells_counts.h5ad", "symbol")]:
            a = ad.read_h5ad(shared_data / fname)
            col = a.var_names.get_loc(ensembl if by == "ensembl" else symbol)
            expect = np.asarray(a.X[:, col].todense()).ravel()
            ids = obs[obs.source_file == fname].index.to_numpy()
            with store.experiment() as exp:
                t = exp.ms["RNA"].X["raw"].read(coords=(ids, [j])).tables().concat()
            got = np.zeros(len(ids))
            got[np.searchsorted(ids, t["soma_dim_0"].to_numpy())] = t["soma_data"].to_numpy()
            assert np.array_equal(got, expect), (symbol, fname)
            assert expect.sum() > 0


def test_gene_stats_exact_on_real_store(real_store):
    from atlasflow.store.stats import compute_gene_stats, read_gene_stats

    uri, _ = real_store
    compute_gene_stats(uri, block_cells=1000)  # several blocks
    store = open_store(uri)
    stats = read_gene_stats(store)
    obs = store.obs(["raw_sum"])
    with store.experiment() as exp:
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
    r, c, v = (t[k].to_numpy() for k in ("soma_dim_0", "soma_dim_1", "soma_data"))
    y = v / obs.raw_sum.reindex(r).to_numpy() * 1e4
    order = np.argsort(c, kind="stable")
    c, y = c[order], y[order]
    bounds = np.searchsorted(c, np.arange(store.n_genes + 1))
    for g in np.random.default_rng(0).choice(store.n_genes, 300, replace=False):
        vals = y[bounds[g]:bounds[g + 1]]
        assert stats.nnz[g] == len(vals)
        if len(vals):
            assert stats.nonzero_median[g] == np.median(vals)
        else:
            assert np.isnan(stats.nonzero_median[g])


def test_store_info_reports_the_store(real_store, capsys):
    import json

    from atlasflow.infra.cli import main as cli_main

    uri, _ = real_store
    assert cli_main(["store", "info", uri, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    store = open_store(uri)
    obs = store.obs(["nnz", "dataset_id"])
    assert info["cells"] == len(obs) == store.n_cells
    assert info["genes"] == store.n_genes
    assert info["nnz"] == int(obs.nnz.sum())
    assert info["datasets"] == obs.dataset_id.nunique()
    assert info["manifest"]["sources"] == {"complete": 7, "pending": 0, "failed": 0}
    assert cli_main(["store", "info", uri]) == 0
    assert f"cells       {store.n_cells:,}" in capsys.readouterr().out
