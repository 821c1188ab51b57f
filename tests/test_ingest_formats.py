"""Source formats: 10x .h5, 10x MTX (gzipped), AnnData zarr, and .h5ad with CSR, CSC or dense X,
all written here from real counts (following each format's documented layout) and ingested to
exactly the store content of the equivalent CSR .h5ad; row blocks read in bounded memory."""

from __future__ import annotations

import gzip
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from atlasflow.ingest import ingest_paths
from atlasflow.store import open_store
from atlasflow.store.genes import gene_reference

SOUPX = "soupx_pbmc4k_2170cells_counts.h5ad"
N_CELLS = 300


def _real(shared_data):
    a = ad.read_h5ad(shared_data / SOUPX)[:N_CELLS]
    X = sp.csr_matrix(a.X).astype(np.int32)
    return X, a.var_names.astype(str).to_numpy(), a.var["gene_symbol"].astype(str).to_numpy(), \
        a.obs_names.astype(str).to_numpy()


def write_10x_h5(path, X, ids, names, barcodes, extra_antibodies: int = 0):
    """Cell Ranger v3 feature-barcode matrix: /matrix with genes x cells CSC (= cells x genes CSR)."""
    types = ["Gene Expression"] * len(ids)
    if extra_antibodies:  # non-GEX features, which a gene-expression ingest must leave out
        rng = np.random.default_rng(0)
        ab = sp.csr_matrix(rng.integers(0, 50, size=(X.shape[0], extra_antibodies)).astype(np.int32))
        X = sp.hstack([X, ab]).tocsr()
        ids = np.concatenate([ids, [f"AB{i}" for i in range(extra_antibodies)]])
        names = np.concatenate([names, [f"CD{i}_TotalSeqB" for i in range(extra_antibodies)]])
        types += ["Antibody Capture"] * extra_antibodies
    X = sp.csr_matrix(X)
    X.sort_indices()
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = X.data.astype(np.int32), X.indices.astype(np.int64), X.indptr
        g["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        ft = g.create_group("features")
        ft["id"], ft["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        ft["feature_type"] = np.array(types, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
        ft["_all_tag_keys"] = np.array([b"genome"])


def write_10x_mtx(d, X, ids, names, barcodes):
    """Cell Ranger v3 MTX directory: matrix.mtx.gz (genes x cells), features.tsv.gz, barcodes.tsv.gz."""
    d.mkdir()
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(X.T), field="integer")
    with open(d / "matrix.mtx", "rb") as src, gzip.open(d / "matrix.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (d / "matrix.mtx").unlink()
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\tGene Expression\n" for i, n in zip(ids, names))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)


def _anndata(X, ids, names, barcodes):
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)),
                      var=pd.DataFrame({"gene_symbol": names}, index=pd.Index(ids)))


@pytest.fixture(scope="module")
def format_sources(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    X, ids, names, barcodes = _real(shared_data)
    _anndata(X, ids, names, barcodes).write_h5ad(d / "ref_csr.h5ad")
    _anndata(sp.csc_matrix(X), ids, names, barcodes).write_h5ad(d / "csc.h5ad")
    _anndata(X.toarray(), ids, names, barcodes).write_h5ad(d / "dense.h5ad")
    _anndata(X, ids, names, barcodes).write_zarr(d / "cells.zarr")
    write_10x_h5(d / "filtered_feature_bc_matrix.h5", X, ids, names, barcodes, extra_antibodies=3)
    write_10x_mtx(d / "mtx", X, ids, names, barcodes)
    return d, X, ids


def test_test_writers_match_the_field_readers(format_sources):
    """The files written above read back through scanpy as the counts they were written from."""
    import scanpy as sc

    d, X, ids = format_sources
    h5 = sc.read_10x_h5(d / "filtered_feature_bc_matrix.h5", gex_only=True)
    mtx = sc.read_10x_mtx(d / "mtx", var_names="gene_ids", cache=False)
    for a in (h5, mtx):
        assert (sp.csr_matrix(a.X) != X).nnz == 0
    assert list(mtx.var_names) == list(ids) and list(h5.var["gene_ids"]) == list(ids)


def _block(store, entry, var):
    with store.experiment() as exp:
        t = exp.ms["RNA"].X["raw"].read(coords=(slice(entry.joinid_start, entry.joinid_stop - 1),)).tables().concat()
    r = t["soma_dim_0"].to_numpy() - entry.joinid_start
    c = var.feature_id.to_numpy()[t["soma_dim_1"].to_numpy()]  # by Ensembl id, not by store column
    return pd.DataFrame({"r": r, "g": c, "v": t["soma_data"].to_numpy()}).sort_values(["r", "g"]).reset_index(drop=True)


def _check_same_content(uri, names, X, ids):
    store = open_store(uri)
    var = store.var()
    entries = {e.name: e for e in store.manifest.complete()}
    assert set(entries) == set(names) | {"ref_csr.h5ad"}, entries.keys()
    ref = _block(store, entries["ref_csr.h5ad"], var)
    # The reference source itself, independently: every column whose Ensembl id the CELLxGENE
    # reference knows is stored unchanged.
    known = pd.Index(ids).isin(gene_reference().index)
    Xk = sp.coo_matrix(X[:, np.flatnonzero(known)])
    expect = pd.DataFrame({"r": Xk.row, "g": ids[known][Xk.col], "v": Xk.data.astype(np.float32)})
    got = ref[ref.g.isin(set(ids[known]))]
    expect = expect.sort_values(["r", "g"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expect, check_dtype=False)
    obs = store.obs(["source_file", "source_row", "raw_sum", "nnz"])
    o_ref = obs[obs.source_file == "ref_csr.h5ad"].sort_values("source_row")
    for name in names:
        e = entries[name]
        pd.testing.assert_frame_equal(_block(store, e, var), ref, obj=name)
        o = obs[obs.source_file == name].sort_values("source_row")
        for col in ("source_row", "raw_sum", "nnz"):
            assert np.array_equal(o[col].to_numpy(), o_ref[col].to_numpy()), (name, col)
        assert e.total_counts == entries["ref_csr.h5ad"].total_counts == float(X.sum()), name
        assert e.genes_report == entries["ref_csr.h5ad"].genes_report, name
    return entries


def test_every_format_ingests_to_the_same_store_content(format_sources, tmp_path, ray_session):
    d, X, ids = format_sources
    uri = str(tmp_path / "store")
    rep = ingest_paths(uri, [str(d)], progress=False)
    assert rep.failed == []
    names = ["csc.h5ad", "dense.h5ad", "cells.zarr", "filtered_feature_bc_matrix.h5", "mtx"]
    entries = _check_same_content(uri, names, X, ids)
    assert {entries[n].kind for n in names} == {"h5ad", "zarr", "10x_h5", "10x_mtx"}


def test_small_memory_budget_reads_in_row_blocks(format_sources, tmp_path, ray_session):
    """Under a budget a few cells wide, the 10x .h5 and the CSC h5ad are read in several row
    blocks (same content), and an MTX directory that would not fit is refused by name."""
    from atlasflow.ingest.h5ad import probe_source

    d, X, ids = format_sources
    budget = int(X.nnz / X.shape[0] * 36 * 70)  # ~70 cells of CSC per block: 5 blocks of 300 cells
    p = probe_source(str(d / "csc.h5ad"), memory_budget=budget)
    assert 1 < p.block_cells < N_CELLS // 3, p.block_cells
    uri = str(tmp_path / "store")
    rep = ingest_paths(uri, [str(d / n) for n in ("ref_csr.h5ad", "csc.h5ad", "filtered_feature_bc_matrix.h5", "mtx")],
                       progress=False, memory_budget=budget, block_cells=64)
    (fail,) = rep.failed
    assert "mtx: matrix.mtx:" in fail["error"] and "memory budget" in fail["error"], fail
    _check_same_content(uri, ["csc.h5ad", "filtered_feature_bc_matrix.h5"], X, ids)


class _ReadLog:
    """Counts the elements every h5py dataset read returns (all readers go through it)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        orig = h5py.Dataset.__getitem__

        def getitem(ds, key):
            out = orig(ds, key)
            if ds.name.endswith(("/data", "/indices")) or ds.name.endswith("/X"):
                self.sizes.append(int(np.size(out)))
            return out

        monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)


@pytest.mark.parametrize("name", ["ref_csr.h5ad", "csc.h5ad", "dense.h5ad", "filtered_feature_bc_matrix.h5"])
def test_row_blocks_never_read_more_than_a_block(format_sources, monkeypatch, name):
    from atlasflow.ingest import matrices
    from atlasflow.ingest.h5ad import open_counts

    d, X, _ = format_sources
    monkeypatch.setattr(matrices, "SCAN_NNZ", 5_000)  # scan chunk for CSC gathers (the matrix readers')
    block = 37
    src, node = open_counts(str(d / name), "X")
    log = _ReadLog(monkeypatch)
    with src:
        got = sp.vstack([node.read_rows(a, min(N_CELLS, a + block)) for a in range(0, N_CELLS, block)]).tocsr()
    assert got.shape[0] == N_CELLS and (got[:, :X.shape[1]] != X).nnz == 0
    nnz_per_block = [X[a:a + block].nnz for a in range(0, N_CELLS, block)]
    if name == "dense.h5ad":
        assert max(log.sizes) <= block * X.shape[1]
    elif name == "csc.h5ad":  # each block: one scan of the columns in chunks of SCAN_NNZ entries
        assert max(log.sizes) <= 5_000
    else:  # CSR: exactly each block's entries, each entry read once
        assert max(log.sizes) <= max(nnz_per_block) + 3 * block  # (+ the 10x antibody columns)
        assert sum(log.sizes) <= 2 * (X.nnz + 3 * N_CELLS)  # data + indices, once


def test_directories_find_every_format_once(format_sources, tmp_path):
    from atlasflow.ingest.sources import resolve_sources

    d, _, _ = format_sources
    paths, errors = resolve_sources([str(d)])
    assert errors == []
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(
        ["ref_csr.h5ad", "csc.h5ad", "dense.h5ad", "cells.zarr", "filtered_feature_bc_matrix.h5", "mtx"])
    # Cell Ranger's outs/: the same matrix as X.h5 and X/ is taken once, as the .h5
    outs = tmp_path / "outs"
    outs.mkdir()
    shutil.copy(d / "filtered_feature_bc_matrix.h5", outs)
    shutil.copytree(d / "mtx", outs / "filtered_feature_bc_matrix")
    paths, _ = resolve_sources([str(outs)])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["filtered_feature_bc_matrix.h5"]
    # a source directory given directly is one source, not searched
    assert resolve_sources([str(d / "cells.zarr")])[0] == [str(d / "cells.zarr")]
