"""A query's obs side at atlas scale: ``store.query.select`` (obs scan + filter + per-label cap and
stratified fraction + label counts) on a store with a 1M-row obs and hundreds of labels. Each
measurement is a fresh child process (time, peak RSS); prints JSON.

    python -m atlasflow.infra.bench.selection --store /tmp/sel_1m [--cells 1000000] [--repeats 3]

The store is built once if missing (``--cells`` cells in 20 sources; ``cell_type`` drawn from
``--labels`` Zipf-weighted labels, ``tissue`` from 8; one count per cell, so X costs nothing).
The selected joinids are hashed, so two versions of the code can be checked to cut the same cells.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

QUERY = {"label": "cell_type", "per_label_cap": 2000, "fraction": 0.5, "obs_filter": "tissue != 'tissue7'",
         "seed": 0}


def build_store(uri: str, n_cells: int, n_labels: int, sources: int = 20, seed: int = 0) -> None:
    import pyarrow as pa

    from atlasflow.store import OBS_SCHEMA, SourceEntry, StoreWriter, gene_reference, write_cells

    rng = np.random.default_rng(seed)
    w = StoreWriter(uri)
    ref = gene_reference()
    genes = w.register_genes(ref.index[ref["feature_type"] == "protein_coding"][:8].tolist())
    p = 1.0 / np.arange(1, n_labels + 1) ** 1.1
    labels = np.array([f"cell type {i}" for i in range(n_labels)])
    bounds = np.linspace(0, n_cells, sources + 1).astype(int)
    for s in range(sources):
        n = int(bounds[s + 1] - bounds[s])
        sid = f"sel{s}"
        e = w.reserve(SourceEntry(source_id=sid, kind="synthetic", name=sid, fingerprint=f"fp-{sid}", n_cells=n))
        cols = {"cell_type": labels[rng.choice(n_labels, n, p=p / p.sum())],
                "tissue": np.array([f"tissue{i}" for i in range(8)])[rng.integers(0, 8, n)],
                "dataset_id": np.full(n, f"dataset{s}"), "source_id": np.full(n, sid)}
        obs = {}
        for f in OBS_SCHEMA:
            if f.name == "is_primary_data":
                obs[f.name] = pa.array(np.ones(n, bool))
            elif f.name in ("raw_sum", "nnz"):
                obs[f.name] = pa.array(np.ones(n), f.type)
            elif f.name == "source_row":
                obs[f.name] = pa.array(np.arange(n), f.type)
            else:
                obs[f.name] = pa.array(cols.get(f.name, np.full(n, "unknown")).tolist(), f.type)
        write_cells(uri, e.joinid_start, pa.table(obs, schema=OBS_SCHEMA), np.arange(n),
                    genes[rng.integers(0, len(genes), n)], np.ones(n, np.float32))
        w.complete(sid, nnz=n, raw_sum=float(n))


def measure(store: str) -> dict:
    from atlasflow.infra.bench.util import PeakRSS
    from atlasflow.store.query import QueryConfig, select

    mem = PeakRSS().start()
    t0 = time.perf_counter()
    sel = select(QueryConfig(source="store", uri=store, **QUERY))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), **mem.stop(), "matched": sel.matched, "selected": sel.n_cells,
            "labels": len(sel.counts),
            "joinids_digest": hashlib.blake2b(sel.joinids.tobytes(), digest_size=8).hexdigest(),
            "counts_digest": hashlib.blake2b(json.dumps(sel.counts, sort_keys=True).encode(),
                                             digest_size=8).hexdigest()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="built if missing")
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--labels", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.store)))
        return 0
    from atlasflow.infra.bench.util import environment

    if not os.path.exists(a.store):
        t = time.perf_counter()
        build_store(a.store, a.cells, a.labels)
        print(json.dumps({"built": a.store, "seconds": round(time.perf_counter() - t, 1)}), file=sys.stderr)
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-m", "atlasflow.infra.bench.selection", "--store", a.store,
                              "--child"], capture_output=True, text=True, check=True)
        runs.append({**json.loads(out.stdout.splitlines()[-1]), "load_avg": round(os.getloadavg()[0], 2)})
    print(json.dumps({"store": a.store, "query": QUERY, "runs": runs,
                      "median_seconds": statistics.median(r["seconds"] for r in runs),
                      "median_peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
                      "environment": environment()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
