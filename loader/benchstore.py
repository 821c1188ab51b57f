"""A minimal synthetic store for the loader benchmark when ``atlasflow.ingest.synth`` is unavailable.

Cells of 20 Zipf-sized datasets (one manifest source per dataset, contiguous joinids, as ingestion
lays them out), ~1.4k nonzero genes per cell drawn from a heavy-tailed gene popularity, counts
1 + geometric. Deterministic in ``seed``; written in blocks so memory stays bounded.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from atlasflow.store import OBS_SCHEMA, SourceEntry, StoreWriter, gene_reference, write_cells

BLOCK = 10_000


def _obs_table(n: int, dataset_id: str, raw_sum: np.ndarray, nnz: np.ndarray, source_id: str) -> pa.Table:
    cols = {}
    for f in OBS_SCHEMA:
        if f.name == "dataset_id":
            cols[f.name] = pa.array([dataset_id] * n, f.type)
        elif f.name == "is_primary_data":
            cols[f.name] = pa.array(np.ones(n, bool))
        elif f.name == "raw_sum":
            cols[f.name] = pa.array(raw_sum.astype(np.float64))
        elif f.name == "nnz":
            cols[f.name] = pa.array(nnz.astype(np.int64))
        elif f.name == "source_id":
            cols[f.name] = pa.array([source_id] * n, f.type)
        elif f.name == "source_row":
            cols[f.name] = pa.array(np.arange(n, dtype=np.int64))
        else:
            cols[f.name] = pa.array(["unknown"] * n, f.type)
    return pa.table(cols, schema=OBS_SCHEMA)


def dataset_sizes(n_cells: int, n_datasets: int, exponent: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n_datasets + 1) ** exponent
    sizes = np.maximum(1, np.floor(w / w.sum() * n_cells)).astype(np.int64)
    sizes[0] += n_cells - sizes.sum()
    return sizes


def build_bench_store(uri: str, n_cells: int, n_genes: int = 20_000, n_datasets: int = 20,
                      mean_nnz: int = 1_400, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = StoreWriter(uri)
    ref = gene_reference("homo_sapiens")
    coding = (ref["feature_type"] == "protein_coding").to_numpy()
    feature_ids = (ref.index[coding].tolist() + ref.index[~coding].tolist())[:n_genes]
    gene_ids = w.register_genes(feature_ids)
    popularity = rng.pareto(1.2, n_genes) + 1.0
    cdf = np.cumsum(popularity / popularity.sum())
    total_nnz = 0
    for d, size in enumerate(dataset_sizes(n_cells, n_datasets)):
        sid = f"bench-d{d:02d}"
        entry = w.reserve(SourceEntry(source_id=sid, kind="synthetic", name=sid, fingerprint=f"bench-{seed}-{d}",
                                      n_cells=int(size)))
        nnz_sum, raw_total = 0, 0.0
        for a in range(0, int(size), BLOCK):
            n = min(BLOCK, int(size) - a)
            target = np.clip(rng.lognormal(np.log(mean_nnz), 0.35, n), 50, n_genes // 2).astype(np.int64)
            rows = np.repeat(np.arange(n), (target * 1.45).astype(np.int64))
            genes = np.searchsorted(cdf, rng.random(len(rows)), side="right").clip(0, n_genes - 1)
            key = np.sort(rows.astype(np.int64) * n_genes + genes)
            key = key[np.concatenate([[True], key[1:] != key[:-1]])]  # np.unique is ~20x slower (numpy 2.4)
            r, g = key // n_genes, key % n_genes
            order = np.argsort(r * n_genes + gene_ids[g], kind="stable")  # (cell, gene joinid) order
            r, g = r[order], g[order]
            vals = (1 + rng.geometric(0.45, len(r)) - 1 + (g % 7 == d % 7)).astype(np.float32)
            nnz = np.bincount(r, minlength=n)
            raw = np.bincount(r, weights=vals, minlength=n)
            obs = _obs_table(n, f"d{d:02d}", raw, nnz, sid)
            write_cells(uri, entry.joinid_start + a, obs, r, gene_ids[g], vals)
            nnz_sum += int(len(r))
            raw_total += float(raw.sum())
        w.complete(sid, nnz=nnz_sum, raw_sum=raw_total)
        total_nnz += nnz_sum
    return {"n_cells": int(n_cells), "n_genes": int(n_genes), "n_datasets": int(n_datasets), "nnz": int(total_nnz)}
