"""A query's cells written out: to an .h5ad (``to_h5ad``) or a new atlasflow store (``to_store``).

Both stream ``store.query.iter_blocks``: X is appended block by block, so memory is one block of
counts plus the selection (and, for .h5ad, the kept obs columns).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasflow.store.query import QUERY_FORMAT_VERSION, QueryConfig, Selection, iter_blocks, select

H5AD_CHUNK_VALUES = 1 << 16  # values per HDF5 chunk of X's data / indices / indptr


def _obs_for_h5ad(obs: pd.DataFrame) -> pd.DataFrame:
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    obs.index.name = "soma_joinid"
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    return obs


def to_h5ad(cfg: QueryConfig, out: str, sel: Selection | None = None) -> Selection:
    """Write the query to ``out`` (.h5ad): counts in X (CSR float32), Ensembl ids as var index.

    X grows block by block on disk; only obs (the kept columns) is assembled in memory.
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    sel = sel or select(cfg)
    var = sel.var.reset_index().rename(columns={"soma_joinid": "source_var_joinid"}).set_index("feature_id")
    var.index = var.index.astype(str)
    obs_parts = []
    with h5py.File(out, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        # X grows by appends, so its datasets are chunked; h5py's guess for an empty dataset is
        # 1,024 values (4 KB), which makes every backed row read walk a B-tree of ~1k-value chunks
        # (scDataset over a 200k-cell export: 0.5k cells/s; 64k-value chunks: 8k; contiguous: 10k).
        write_elem(f, "X", sp.csr_matrix((0, len(var)), dtype=np.float32),
                   dataset_kwargs={"chunks": (H5AD_CHUNK_VALUES,)})
        X = sparse_dataset(f["X"])
        for ids, obs, m in iter_blocks(cfg, sel):
            X.append(m)
            obs_parts.append(obs)
        obs = _obs_for_h5ad(pd.concat(obs_parts))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        uns = {"atlasflow_query": {"format_version": QUERY_FORMAT_VERSION, "query": json.dumps(asdict(cfg)),
                                   "counts": json.dumps(sel.counts)}}
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", uns)
    ad.read_h5ad(out, backed="r").file.close()  # fail here, not in the user's notebook, if unreadable
    return sel


def to_store(cfg: QueryConfig, out: str, sel: Selection | None = None) -> Selection:
    """Write the query as a new atlasflow store (one source of kind ``query``) and compute gene stats."""
    from atlasflow.store.lease import writer_lease

    sel = sel or select(cfg)
    with writer_lease(out) as lease:  # one writer per store (store/lease.py)
        _write_store(cfg, out, sel, lease)
    return sel


def _write_store(cfg: QueryConfig, out: str, sel: Selection, lease) -> None:
    from .obs import to_store_obs
    from atlasflow.store import SourceEntry, write_cells
    from atlasflow.store.lease_writer import LeasedStoreWriter
    from atlasflow.store.stats import compute_gene_stats

    w = LeasedStoreWriter(out, lease, organism=cfg.organism.lower().replace(" ", "_"))
    gene_joinids = w.register_genes(list(sel.var["feature_id"].astype(str)))
    key = cfg.key()
    entry = w.reserve(SourceEntry(source_id=f"query-{key[:12]}", kind="query",
                                  name=f"atlasflow query v{QUERY_FORMAT_VERSION} {cfg.describe()}", fingerprint=key,
                                  n_cells=sel.n_cells, counts_field='ms["RNA"].X["raw"]',
                                  genes_mapped=len(gene_joinids)))
    off, nnz, total = 0, 0, 0.0
    for ids, obs, m in iter_blocks(cfg, sel, obs_columns=()):
        coo = m.tocoo()
        rs = np.asarray(m.sum(axis=1)).ravel().astype(np.float64)
        obs = obs.drop(columns=["raw_sum", "nnz", "source_id", "source_file", "source_row"], errors="ignore")
        table = to_store_obs(obs, source_id=entry.source_id, source_file=cfg.describe(), source_rows=ids,
                             nnz=np.diff(m.indptr), raw_sum=rs, default_dataset_id=entry.source_id)
        write_cells(out, entry.joinid_start + off, table, coo.row.astype(np.int64), gene_joinids[coo.col],
                    coo.data)
        off += len(ids)
        nnz += m.nnz
        total += float(rs.sum())
    w.complete(entry.source_id, nnz=nnz, raw_sum=total)
    compute_gene_stats(out)
