"""Small real stores for the loader tests (built once per session, cached by path).

- ``synth``: 3 datasets of 960 / 288 / 32 cells (1280 committed cells) x 40 genes, plus a
  4th source that is written but never committed (its cells must never be streamed).
- ``real``: 300 + 200 + 200 cells from three real PBMC files in ../shared/data, genes mapped to
  Ensembl, gene stats computed by the store. Also returns the dense counts for references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from atlasflow.store import OBS_SCHEMA, SourceEntry, StoreWriter, gene_reference, map_genes, write_cells

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SYNTH_SIZES = (960, 288, 32)
SYNTH_GENES = 40
_CACHE: dict[str, object] = {}


def obs_table(n: int, **cols) -> pa.Table:
    out = {}
    for f in OBS_SCHEMA:
        v = cols.get(f.name)
        if f.name == "is_primary_data":
            out[f.name] = pa.array(np.ones(n, bool))
        elif f.name in ("raw_sum", "nnz", "source_row"):
            out[f.name] = pa.array(np.asarray(v if v is not None else np.zeros(n)), f.type)
        elif isinstance(v, (list, np.ndarray)):
            out[f.name] = pa.array([str(x) for x in v], f.type)
        else:
            out[f.name] = pa.array([v if v is not None else "unknown"] * n, f.type)
    return pa.table(out, schema=OBS_SCHEMA)


def _write_source(w: StoreWriter, uri: str, sid: str, dense: np.ndarray, gene_joinids: np.ndarray,
                  complete: bool = True, **obs) -> SourceEntry:
    n = dense.shape[0]
    e = w.reserve(SourceEntry(source_id=sid, kind="synthetic", name=sid, fingerprint=f"fp-{sid}", n_cells=n))
    r, c = np.nonzero(dense)
    raw = dense.sum(axis=1, dtype=np.float64)
    write_cells(uri, e.joinid_start, obs_table(n, raw_sum=raw, nnz=(dense > 0).sum(1), source_id=sid,
                                               source_row=np.arange(n), **obs),
                r, gene_joinids[c], dense[r, c].astype(np.float32))
    if complete:
        w.complete(sid, nnz=int(len(r)), raw_sum=float(raw.sum()))
    return e


def synth_store(tmp_path_factory) -> str:
    if "synth" not in _CACHE:
        uri = str(tmp_path_factory.mktemp("loader") / "synth")
        rng = np.random.default_rng(7)
        w = StoreWriter(uri)
        ref = gene_reference()
        genes = w.register_genes(ref.index[ref["feature_type"] == "protein_coding"][:SYNTH_GENES].tolist())
        for d, n in enumerate(SYNTH_SIZES):
            dense = (rng.random((n, SYNTH_GENES)) < 0.3) * rng.integers(1, 9, (n, SYNTH_GENES))
            dense[:, d] += 1  # no empty cell
            donors = np.array([f"donor{d}_{i % 3}" for i in range(n)])
            _write_source(w, uri, f"src{d}", dense, genes, dataset_id=f"ds{d}", donor_id=donors,
                          cell_type=np.array(["T", "B", "NK"])[rng.integers(0, 3, n)])
        # written but never committed: a half-ingested source
        _write_source(w, uri, "pending", np.ones((50, SYNTH_GENES)), genes, complete=False, dataset_id="dsX")
        _CACHE["synth"] = uri
    return _CACHE["synth"]


REAL_FILES = (("soupx_pbmc4k_2170cells_counts.h5ad", 300), ("garnett_zheng2017_pbmc_800cells_counts.h5ad", 200),
              ("harmony_kang2018_ctrl_stim_2000cells_counts.h5ad", 200))


def real_store(tmp_path_factory):
    """-> (uri, dense counts [cells, store genes] in joinid order, dataset ids per cell)."""
    if "real" not in _CACHE:
        if not all((DATA / f).exists() for f, _ in REAL_FILES):
            pytest.skip(f"real test data not found under {DATA} (see shared/data/README.md)")
        import anndata

        from atlasflow.store.stats import compute_gene_stats

        uri = str(tmp_path_factory.mktemp("loader") / "real")
        w = StoreWriter(uri)
        blocks, ds = [], []
        for k, (fname, n) in enumerate(REAL_FILES):
            a = anndata.read_h5ad(DATA / fname)
            m = map_genes(a.var_names.to_numpy(), symbols=a.var.get("gene_symbol"))
            x = a.X[:n][:, m.source_index].toarray().astype(np.float64)
            # symbols can map two source columns to one Ensembl id: sum them (as counts)
            uniq, inv = np.unique(m.feature_ids, return_inverse=True)
            xs = np.zeros((n, len(uniq)))
            np.add.at(xs.T, inv, x.T)
            gj = w.register_genes(list(uniq))
            blocks.append((xs, gj))
            _write_source(w, uri, f"real{k}", xs, gj, dataset_id=f"real{k}",
                          cell_type=a.obs["cell_type"].astype(str).to_numpy()[:n] if "cell_type" in a.obs else None)
            ds += [f"real{k}"] * n
        G = len(w.gene_index)
        dense = np.zeros((sum(b[0].shape[0] for b in blocks), G))
        r = 0
        for xs, gj in blocks:
            dense[r:r + len(xs), gj] = xs
            r += len(xs)
        compute_gene_stats(uri)
        _CACHE["real"] = (uri, dense, np.array(ds))
    return _CACHE["real"]
