"""The peers benchmark end to end on a tiny store: each peer's copy of the corpus holds exactly the
store's cells, every loader runs in every pair (order rotated), the summary is the median of the
per-pair ratios, and the bound is computed from its own stage timings."""

from __future__ import annotations

import json
import shutil
import statistics

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from atlasflow.infra.bench.peers import PEERS_FORMAT_VERSION, run
from atlasflow.store.stats import compute_gene_stats

from test_loader_fixtures import synth_store


def _store_csr(uri: str) -> tuple[np.ndarray, sp.csr_matrix]:
    """The committed cells of the store and their counts, read with tiledbsoma directly."""
    import tiledbsoma as soma

    from atlasflow.store import open_store

    s = open_store(uri)
    ids = np.concatenate([np.arange(a, b) for a, b in s.complete_ranges()])
    with soma.Experiment.open(uri) as exp:
        t = exp.ms["RNA"].X["raw"].read(coords=(ids,)).tables().concat()
        n_genes = exp.ms["RNA"].var.count
    rows = np.searchsorted(ids, t["soma_dim_0"].to_numpy())
    m = sp.csr_matrix((t["soma_data"].to_numpy(), (rows, t["soma_dim_1"].to_numpy())), shape=(len(ids), n_genes))
    return ids, m


def test_peers_bench_on_a_tiny_store(tmp_path_factory, tmp_path):
    import anndata as ad

    scdl_io = pytest.importorskip(
        "bionemo.scdl.io.single_cell_memmap_dataset",
        reason="bionemo-scdl is installed with --no-deps (its anndata>=0.12.1 floor conflicts with "
               "cellxgene-schema's anndata pin); see README, Quick start")
    SingleCellMemMapDataset = scdl_io.SingleCellMemMapDataset

    # a private copy with its gene medians (rank needs them; the shared fixture may not have them yet)
    uri = str(tmp_path / "store")
    shutil.copytree(synth_store(tmp_path_factory), uri)
    compute_gene_stats(uri)
    work = tmp_path / "work"
    out = json.loads(json.dumps(run(uri, str(work), cells=320, batch_size=16, pairs=2,
                                    peers=("scdataset", "scdl"))))
    assert out["peers_format_version"] == PEERS_FORMAT_VERSION

    # the peers read the same cells: the h5ad export and SCDL's conversion equal the store's counts
    ids, ref = _store_csr(uri)
    a = ad.read_h5ad(work / "corpus.h5ad")
    assert a.obs.index.astype(int).tolist() == ids.tolist()  # committed cells only, in joinid order
    assert (a.X != ref).nnz == 0
    with h5py.File(work / "corpus.h5ad") as f:  # appendable, but not in h5py's 1,024-value chunks
        assert f["X/data"].chunks[0] >= 1 << 16 and f["X/indices"].chunks[0] >= 1 << 16
    scdl = SingleCellMemMapDataset(str(work / "corpus.scdl"))
    assert len(scdl) == len(ids)
    for i in range(len(ids)):
        (vals, cols), _, _ = scdl.get_row(i)
        lo, hi = ref.indptr[i], ref.indptr[i + 1]
        assert np.array_equal(cols, ref.indices[lo:hi]) and np.array_equal(vals, ref.data[lo:hi])
    conv = out["conversions"]
    assert conv["h5ad"]["bytes"] > 0 and conv["scdl"]["rows"] == len(ids) and conv["scdl"]["seconds"] >= 0

    # every loader (and the bound) once per pair, in an order rotated pair by pair
    kinds = ["atlasflow", "atlasflow-tuned", "bound", "scdataset", "scdl"]
    runs = [r["loader"] for r in out["runs"]]
    assert runs[0] == "raw_sequential_scan" and runs[-1] == "raw_sequential_scan"
    assert runs[1:6] == kinds and runs[6:11] == kinds[1:] + kinds[:1]
    for pair in out["pairs"]:
        assert sorted(pair) == sorted(kinds)
        for name, r in pair.items():
            assert r["loader"] == name and r["cells"] >= 320, r
            if name != "bound":
                assert r["cells_per_s"] > 0 and 0 < r["entropy_ratio"] <= 1.2 and r["peak_rss_gb"] > 0, r
        assert "untokenized" in pair["scdataset"]["output"] and "untokenized" in pair["scdl"]["output"]
        assert pair["atlasflow-tuned"]["allocator"] not in ("glibc default", None)  # glibc here
        assert "allocator" not in pair["atlasflow"]

    s = out["summary"]
    for peer in ("scdataset", "scdl"):
        for ours, where in (("atlasflow", s), ("atlasflow-tuned", s["tuned"])):
            ratios = [p[ours]["cells_per_s"] / p[peer]["cells_per_s"] for p in out["pairs"]]
            assert where[peer]["median_whole_run_ratio"] == round(statistics.median(ratios), 2)
    fastest = max(("scdataset", "scdl"), key=lambda p: statistics.median(q[p]["cells_per_s"] for q in out["pairs"]))
    assert s["fastest_other_peer"] == fastest

    # the bound is computed from its own stage timings, and each pair's loader divided by its pair's bound
    fractions = []
    for pair in out["pairs"]:
        bound = pair["bound"]
        us = bound["cpu_us_per_cell"]
        assert bound["cells"] == len(ids) and all(us[k] > 0 for k in ("read", "tokenize", "batch"))
        expect = bound["cores"] / ((us["read"] + us["tokenize"]) * 1e-6)
        assert abs(bound["read_tokenize_bound_cells_per_s"] - expect) <= 0.01 * expect
        fractions.append(pair["atlasflow"]["cells_per_s"] / bound["read_tokenize_bound_cells_per_s"])
    assert s["fraction_of_read_tokenize_bound"] == round(statistics.median(fractions), 3)
    assert s["fraction_of_read_tokenize_bound_per_pair"] == [round(f, 3) for f in fractions]


def test_whole_epoch_runs(tmp_path_factory, tmp_path):
    """--cells 0: every loader streams the store's whole epoch (its committed cells in whole batches)."""
    uri = str(tmp_path / "store")
    shutil.copytree(synth_store(tmp_path_factory), uri)
    compute_gene_stats(uri)
    ids, _ = _store_csr(uri)
    out = run(uri, str(tmp_path / "work"), cells=0, batch_size=16, pairs=1, peers=(), tuned=False)
    assert out["cells_per_run"] == len(ids) // 16 * 16
    (pair,) = out["pairs"]
    assert sorted(pair) == ["atlasflow", "bound"]
    assert pair["atlasflow"]["cells"] == len(ids) // 16 * 16 and pair["bound"]["cells"] >= len(ids) // 16 * 16


def test_a_bench_report_printed_is_the_report_written(tmp_path, capsys):
    """The benchmark scripts' one output path: stdout and --out carry the same JSON (numpy-free dicts)."""
    from atlasflow.infra.bench.util import emit

    report = {"loader": "atlasflow", "cells_per_s": 1234.5, "pairs": [{"a": 1}, {"b": [1, 2]}]}
    assert emit(report, str(tmp_path / "r.json")) == 0
    assert json.loads(capsys.readouterr().out) == report == json.loads((tmp_path / "r.json").read_text())
    assert emit(report) == 0 and json.loads(capsys.readouterr().out) == report
