"""Loader benchmark (issue #3): prints one JSON document.

Each measurement runs in a fresh child process (clean peak RSS, summed over the process and its
DataLoader workers, sampled every 50 ms):

(a) atlasflow tokenized shuffled cells/s and tokens/s, per tokenizer, 0 and 2 workers;
(b) tiledbsoma-ml 0.1 with shuffle on the same store and batch size (dense X, untokenized);
(c) a raw sequential scan of X in 8192-row slices, with the store's default TileDB settings and with
    the loader's read settings (the faster one is the read ceiling);
(d) mean per-batch entropy of dataset_id relative to batches of a true random permutation;
(e) peak RSS, and with ``--memory-stores`` the same loader on stores of growing size;
then the in-process loader, and tiledbsoma-ml, again under ``tune_allocator()`` (a process-wide
malloc setting the user opts into; DataLoader workers always run under it).

    atlasflow bench loader --store /tmp/s200k --json [--cells 60000] [--build 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from atlasflow.infra.bench.util import PeakRSS, emit, environment

BENCH_FORMAT_VERSION = 3  # 2: two scans (store default, loader read settings); the ceiling is the faster
# 3: atlasflow's whole-run rate and first batch count from before the loader is built, as tiledbsoma-ml's
#    always did (its timer starts before its dataset is built); in-process and tiledbsoma-ml runs again
#    under tune_allocator() ("allocator" in each run)


def _entropy(codes: np.ndarray) -> float:
    c = np.bincount(codes)
    p = c[c > 0] / len(codes)
    return float(-(p * np.log(p)).sum())


def _random_baseline(counts: np.ndarray, batch_size: int, n_batches: int, seed: int = 0) -> float:
    labels = np.repeat(np.arange(len(counts)), counts)
    perm = np.random.default_rng(seed).permutation(labels)[: n_batches * batch_size]
    return float(np.mean([_entropy(b) for b in perm.reshape(-1, batch_size)]))


def _versions(*mods: str) -> dict:
    out = {}
    for m in mods:
        try:
            out[m] = __import__(m).__version__
        except ImportError:
            pass
    return out


def measure_atlasflow(store: str, tokenizer: str, workers: int, cells: int, batch_size: int, **cfg_kw) -> dict:
    from atlasflow.loader import LoaderConfig, make_loader
    from atlasflow.loader.memory import ALLOCATOR_SETTINGS

    mem = PeakRSS().start()
    t0 = time.perf_counter()
    cfg = LoaderConfig(tokenizer=tokenizer, num_workers=workers, batch_size=batch_size,
                       obs_columns=("dataset_id",), **cfg_kw)
    loader = make_loader(store, cfg)
    build_s = time.perf_counter() - t0
    n = tokens = padded = 0
    ents, t_first = [], None
    for b in loader:
        if t_first is None:
            t_first = time.perf_counter() - t0
            t1 = time.perf_counter()
        lens = b["lengths"]
        n += len(lens)
        tokens += int(lens.sum())
        padded += int(b["input_ids"].numel())
        ents.append(_entropy(b["obs.dataset_id"].numpy()))
        if n >= cells:
            break
    steady = time.perf_counter() - t1
    total = time.perf_counter() - t0
    ds = loader.dataset
    counts = np.bincount(ds.strata.codes, weights=np.diff(ds.strata.bounds)).astype(np.int64) \
        if ds.strata is not None else None
    base = _random_baseline(counts, batch_size, len(ents)) if counts is not None else None
    del loader
    return {"loader": "atlasflow", "tokenizer": tokenizer, "workers": workers, "batch_size": batch_size,
            "cells": n, "build_s": round(build_s, 2), "first_batch_s": round(t_first, 2),
            "cells_per_s": round(n / total, 1), "steady_cells_per_s": round((n - batch_size) / steady, 1),
            "tokens_per_s": round(tokens / total, 1), "pad_fraction": round(1 - tokens / padded, 4),
            "entropy": round(float(np.mean(ents)), 4), "entropy_random": None if base is None else round(base, 4),
            "entropy_ratio": None if base is None else round(float(np.mean(ents)) / base, 4),
            **mem.stop(), "config": {k: v for k, v in cfg.to_dict().items() if v not in (None, ())},
            # DataLoader workers fork from a forkserver that called tune_allocator() (see memory.py)
            "workers_allocator": ALLOCATOR_SETTINGS if workers else None}


def measure_tiledbsoma_ml(store: str, cells: int, batch_size: int, io_batch_size: int = 8192) -> dict:
    import tiledbsoma as soma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    mem = PeakRSS().start()
    n, ents, t_first = 0, [], None
    t0 = time.perf_counter()
    with soma.Experiment.open(store) as exp:
        with exp.axis_query(measurement_name="RNA") as query:
            ds = ExperimentDataset(query, layer_name="raw", obs_column_names=["soma_joinid", "dataset_id"],
                                   batch_size=batch_size, io_batch_size=io_batch_size, shuffle=True, seed=0)
            for X, obs in experiment_dataloader(ds):
                if t_first is None:
                    t_first = time.perf_counter() - t0
                    t1 = time.perf_counter()
                n += X.shape[0]
                ents.append(_entropy(np.unique(obs["dataset_id"].to_numpy(), return_inverse=True)[1]))
                if n >= cells:
                    break
    total = time.perf_counter() - t0
    return {"loader": "tiledbsoma-ml", "version": __import__("tiledbsoma_ml").__version__, "workers": 0,
            "batch_size": batch_size, "io_batch_size": io_batch_size, "cells": n,
            "first_batch_s": round(t_first, 2), "cells_per_s": round(n / total, 1),
            "steady_cells_per_s": round((n - batch_size) / (time.perf_counter() - t1), 1),
            "entropy": round(float(np.mean(ents)), 4), **mem.stop(), "output": "dense X, untokenized"}


def measure_scan(store: str, cells: int, slice_rows: int = 8192, tuned: bool = False) -> dict:
    """``tuned``: the TileDB settings of the loader's read threads (no malloc_trim after each query,
    16 MB buffers) with TileDB's own thread pool, which also lifts the sequential scan: the ceiling
    is the faster of the two."""
    import tiledbsoma as soma

    from atlasflow.store import open_store
    from atlasflow.store.store import READ_TILEDB_CONFIG, soma_context

    mem = PeakRSS().start()
    s = open_store(store)
    ctx = soma.SOMATileDBContext(tiledb_config=READ_TILEDB_CONFIG) if tuned else soma_context()
    n = nnz = 0
    t0 = time.perf_counter()
    with s.locator.open(context=ctx) as exp:
        X = exp.ms["RNA"].X["raw"]
        for lo, hi in s.complete_ranges():
            for a in range(lo, hi, slice_rows):
                b = min(hi, a + slice_rows)
                tbl = X.read(coords=(slice(a, b - 1),)).tables().concat()
                nnz += tbl.num_rows
                n += b - a
                if n >= cells:
                    break
            if n >= cells:
                break
    total = time.perf_counter() - t0
    return {"loader": "raw_sequential_scan", "tiledb_settings": "loader read threads'" if tuned else "store default",
            "slice_rows": slice_rows, "cells": n, "cells_per_s": round(n / total, 1),
            "nnz_per_s": round(nnz / total, 1), **mem.stop()}


def _child(spec: dict) -> dict:
    kind = spec.pop("kind")
    applied = {}
    if spec.pop("tuned_allocator", False):  # before the loader allocates anything, as a user would
        from atlasflow.loader.memory import tune_allocator

        applied = tune_allocator()
    fn = {"atlasflow": measure_atlasflow, "tiledbsoma-ml": measure_tiledbsoma_ml, "scan": measure_scan}[kind]
    return {**fn(**spec), "allocator": applied or "glibc default"}


def _run_child(spec: dict, timeout: int = 900) -> dict:
    cmd = [sys.executable, "-m", "atlasflow.infra.bench.loader", "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"spec": spec, "error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1])


def run(store: str, cells: int = 60_000, batch_size: int = 32, tokenizers=("rank", "bin", "value"),
        workers=(0, 2), with_ml: bool = True, memory_stores=(), log=None) -> dict:
    from atlasflow.store import open_store

    s = open_store(store)
    out = {"bench_format_version": BENCH_FORMAT_VERSION, "store": store, "n_cells": s.n_cells, "n_genes": s.n_genes,
           "cells_per_run": cells, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
           "environment": {**environment(), **_versions("numba", "tiledbsoma_ml")}, "runs": []}

    def add(spec):
        r = _run_child(dict(spec))
        r["load_avg"] = round(os.getloadavg()[0], 2)
        out["runs"].append(r)
        if log:
            log(json.dumps(r))
        return r

    scans = [add({"kind": "scan", "store": store, "cells": cells, "tuned": t}) for t in (False, True)]
    ok_scans = [r for r in scans if "cells_per_s" in r]
    scan = max(ok_scans, key=lambda r: r["cells_per_s"]) if ok_scans else scans[0]
    ml = add({"kind": "tiledbsoma-ml", "store": store, "cells": cells, "batch_size": batch_size}) \
        if with_ml else None
    ours = [add({"kind": "atlasflow", "store": store, "tokenizer": t, "workers": w, "cells": cells,
                 "batch_size": batch_size}) for t in tokenizers for w in workers]
    mem = [add({"kind": "atlasflow", "store": m, "tokenizer": "value", "workers": 2, "cells": cells,
                "batch_size": batch_size}) for m in memory_stores]
    # In-process runs under tune_allocator() (DataLoader workers always run under it), and
    # tiledbsoma-ml under the same process-wide setting, so that the comparison stays like for like.
    tuned = [add({"kind": "atlasflow", "store": store, "tokenizer": t, "workers": 0, "cells": cells,
                  "batch_size": batch_size, "tuned_allocator": True}) for t in tokenizers if 0 in workers]
    ml_tuned = add({"kind": "tiledbsoma-ml", "store": store, "cells": cells, "batch_size": batch_size,
                    "tuned_allocator": True}) if with_ml and tuned else None
    ok = [r for r in ours if "cells_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["cells_per_s"])
        summary = {"best": {k: best[k] for k in ("tokenizer", "workers", "cells_per_s", "steady_cells_per_s", "tokens_per_s")},
                   "min_entropy_ratio": min(r["entropy_ratio"] for r in ok if r.get("entropy_ratio")),
                   "max_peak_rss_gb_2_workers": max((r["peak_rss_gb"] for r in ok if r["workers"] == 2), default=None),
                   "max_peak_pss_gb_2_workers": max((r["peak_pss_gb"] for r in ok if r["workers"] == 2), default=None)}
        if ml and "cells_per_s" in ml:
            summary["speedup_vs_tiledbsoma_ml"] = round(best["cells_per_s"] / ml["cells_per_s"], 2)
            summary["steady_speedup_vs_tiledbsoma_ml"] = round(
                best["steady_cells_per_s"] / ml["steady_cells_per_s"], 2)
        if "cells_per_s" in scan:
            summary["sequential_scan_cells_per_s"] = scan["cells_per_s"]
            summary["fraction_of_sequential_scan"] = round(best["cells_per_s"] / scan["cells_per_s"], 3)
        ok_tuned = [r for r in tuned if "cells_per_s" in r]
        if ok_tuned:
            bt = max(ok_tuned, key=lambda r: r["cells_per_s"])
            summary["best_tuned_allocator"] = {k: bt[k] for k in ("tokenizer", "workers", "cells_per_s",
                                                                  "steady_cells_per_s", "peak_rss_gb")}
            if ml_tuned and "cells_per_s" in ml_tuned:
                summary["tuned_speedup_vs_tiledbsoma_ml_tuned"] = round(bt["cells_per_s"] / ml_tuned["cells_per_s"], 2)
            if ml and "cells_per_s" in ml:
                summary["tuned_speedup_vs_tiledbsoma_ml"] = round(bt["cells_per_s"] / ml["cells_per_s"], 2)
            if "cells_per_s" in scan:
                summary["tuned_fraction_of_sequential_scan"] = round(bt["cells_per_s"] / scan["cells_per_s"], 3)
        if mem:
            summary["memory_curve"] = [{"n_cells": open_store(m).n_cells, "store": m,
                                        "peak_rss_gb": r.get("peak_rss_gb"), "peak_pss_gb": r.get("peak_pss_gb")}
                                       for r, m in zip(mem, memory_stores)]
        out["summary"] = summary
    out["load_avg_end"] = os.getloadavg()[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="atlasflow-bench-loader")
    add_arguments(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    return run_cli(args)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", required=False, help="store to read (built with --build N if missing)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON (always JSON; kept for the contract)")
    ap.add_argument("--cells", type=int, default=60_000, help="cells per measurement (default 60000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tokenizers", default="rank,bin,value")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--no-ml", action="store_true", help="skip tiledbsoma-ml")
    ap.add_argument("--build", type=int, default=0, help="build a synthetic store of N cells at --store if missing")
    ap.add_argument("--memory-stores", default="", help="comma-separated stores for the memory curve")
    ap.add_argument("--out", default=None, help="also write the JSON here")


def run_cli(args) -> int:
    if not args.store:
        print("atlasflow bench loader: --store is required", file=sys.stderr)
        return 2
    if args.build and not os.path.exists(args.store):
        from atlasflow.ingest.synth import synthesize

        # The benchmark corpus of the issue: 20k genes, 20 Zipf-sized datasets, ~1.5k nnz per cell.
        synthesize(args.store, args.build, 20_000, 20, seed=0, layout="store")
    if "rank" in args.tokenizers:
        from atlasflow.store import open_store

        try:
            open_store(args.store).gene_stats()
        except Exception:
            from atlasflow.store.stats import compute_gene_stats

            compute_gene_stats(args.store)
    res = run(args.store, cells=args.cells, batch_size=args.batch_size,
              tokenizers=tuple(t for t in args.tokenizers.split(",") if t),
              workers=tuple(int(w) for w in args.workers.split(",") if w), with_ml=not args.no_ml,
              memory_stores=tuple(m for m in args.memory_stores.split(",") if m),
              log=lambda line: print(line, file=sys.stderr, flush=True))
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
