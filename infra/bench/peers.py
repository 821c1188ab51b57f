"""Loaders side by side (issue 15): atlasflow against every peer installable here, on the same cells,
interleaved; prints one JSON document.

    python -m atlasflow.infra.bench.peers --store /tmp/s200k --work /tmp/peers_work [--pairs 3]

The corpus is one store; each peer reads it in its own format, converted once and cached in
``--work`` (conversion time and disk size reported): an ``.h5ad`` written by ``ingest.export.to_h5ad``
(the same cells, counts in CSR X) for scDataset, and BioNeMo SCDL's own memory-mapped conversion of
that file. Peers, each at its documented settings and none tokenizing (each number says so):

- ``tiledbsoma-ml`` 0.1: shuffle, io_batch_size 8192, dense X (as ``bench loader``);
- ``scdataset`` 0.3: a backed AnnData, ``BlockShuffling(block_size)`` with ``fetch_factor`` and its
  AnnData ``fetch_transform`` (``adata_to_mindex``, dense X); block_size = fetch_factor is what its
  own ``suggest_parameters`` calls balanced;
- ``scdl`` (bionemo-scdl 0.1.3): its memmap dataset, a seeded random permutation as the sampler and
  its ``collate_sparse_matrix_batch`` (sparse CSR output; SCDL yields no obs, so the batches'
  dataset entropy is computed from the sampler's indices).

Arc's ``cell-load`` is not run: it is a perturbation-pair loader (each sample is a perturbed cell
plus a control cell mapped to it, read from per-plate H5 files with perturbation, cell-type and
batch columns); a pretraining corpus without perturbations gives it nothing to pair, and measuring
it on invented perturbation labels would time a different workload.

Every measurement is a fresh child process (clean peak RSS/PSS); the runs go in pairs, each pair
running atlasflow and every peer once, in an order rotated pair by pair, and the summary takes
per-pair ratios (atlasflow / peer) and their median, with each run's load average.
``bound`` measures what this machine can do at all: the loader's own stages (the TileDB read of its
plan's read groups with obs labels, the tokenizer, batch assembly) run one after another in one
thread, timed in process CPU seconds per cell; with zero overhead and both stages spread over
every core, the loader could reach ``cores / (read + tokenize)`` cells/s (and
``cores / (read + tokenize + batch)`` counting batch assembly). It runs in every pair, so each
pair's loader is divided by the bound measured in the same minutes; the summary gives the median.
``atlasflow-tuned`` is the same loader under ``tune_allocator()`` (the setting its documentation
gives a process whose main work is streaming); its rows carry the same ratios (``summary.tuned``).
``--cells 0`` streams the store's whole epoch (no partly used last window, the build amortized).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np

from atlasflow.infra.bench.loader import _entropy, _random_baseline, measure_atlasflow, measure_scan, \
    measure_tiledbsoma_ml
from atlasflow.infra.bench.util import PeakRSS, emit, environment

PEERS_FORMAT_VERSION = 2  # 2: the bound runs in every pair; atlasflow-tuned rows; --cells 0 = an epoch
PEERS = ("tiledbsoma-ml", "scdataset", "scdl")


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prepare(store: str, work: str, log=None) -> dict:
    """The corpus in each peer's format (cached in ``work``; the first conversion's cost is kept)."""
    os.makedirs(work, exist_ok=True)
    meta_path = os.path.join(work, "conversions.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    h5ad, scdl = os.path.join(work, "corpus.h5ad"), os.path.join(work, "corpus.scdl")
    if meta.get("store") != os.path.abspath(store) or not os.path.exists(h5ad):
        from atlasflow.ingest.export import to_h5ad
        from atlasflow.store.query import QueryConfig

        t0 = time.perf_counter()
        with PeakRSS() as mem:
            to_h5ad(QueryConfig(source="store", uri=store, obs_columns=("dataset_id",)), h5ad)
        meta = {"store": os.path.abspath(store), "h5ad": {"seconds": round(time.perf_counter() - t0, 1),
                                                           "bytes": _du(h5ad), "peak_rss_gb": mem.peak_gib,
                                                           "by": "atlasflow.ingest.export.to_h5ad"}}
        if os.path.exists(scdl):
            import shutil

            shutil.rmtree(scdl)
    if "scdl" not in meta or not os.path.exists(scdl):
        r = _run_child({"kind": "scdl_convert", "h5ad": h5ad, "out": scdl}, timeout=3600)
        meta["scdl"] = r
    json.dump(meta, open(meta_path, "w"), indent=1)
    if log:
        log(json.dumps({"conversions": meta}))
    return {"h5ad": h5ad, "scdl": scdl, "conversions": meta}


def convert_scdl(h5ad: str, out: str) -> dict:
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        ds = SingleCellMemMapDataset(out, h5ad_path=h5ad, use_X_not_raw=True)  # X holds raw counts
        ds.save()
        n = len(ds)
    return {"seconds": round(time.perf_counter() - t0, 1), "bytes": _du(out), "rows": n,
            "peak_rss_gb": mem.peak_gib, "by": "bionemo.scdl SingleCellMemMapDataset(h5ad_path=...)",
            "version": _version("bionemo-scdl")}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _dataset_codes(h5ad: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-cell dataset code, cells per dataset) from the h5ad's obs."""
    import anndata as ad

    a = ad.read_h5ad(h5ad, backed="r")
    codes = np.unique(a.obs["dataset_id"].astype(str).to_numpy(), return_inverse=True)[1].astype(np.int64)
    a.file.close()
    return codes, np.bincount(codes)


def _result(name: str, n: int, batch_size: int, t0: float, t_first: float, t1: float, ents: list,
            counts: np.ndarray, mem: PeakRSS, **extra) -> dict:
    base = _random_baseline(counts, batch_size, len(ents))
    now = time.perf_counter()
    return {"loader": name, "batch_size": batch_size, "cells": n, "first_batch_s": round(t_first, 2),
            "cells_per_s": round(n / (now - t0), 1), "steady_cells_per_s": round((n - batch_size) / (now - t1), 1),
            "entropy": round(float(np.mean(ents)), 4), "entropy_random": round(base, 4),
            "entropy_ratio": round(float(np.mean(ents)) / base, 4), **mem.stop(), **extra}


def measure_scdataset(h5ad: str, cells: int, batch_size: int, block_size: int = 16, fetch_factor: int = 16,
                      workers: int = 0) -> dict:
    import anndata as ad
    from scdataset import BlockShuffling, scDataset
    from scdataset.transforms import adata_to_mindex
    from torch.utils.data import DataLoader

    codes, counts = _dataset_codes(h5ad)
    mem = PeakRSS().start()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(h5ad, backed="r")
    ds = scDataset(adata, BlockShuffling(block_size=block_size), batch_size=batch_size, fetch_factor=fetch_factor,
                   fetch_transform=partial(adata_to_mindex, columns=["dataset_id"]), seed=0)
    # its documented DataLoader use: the dataset yields whole batches
    kw = {"prefetch_factor": fetch_factor + 1} if workers else {}
    loader = DataLoader(ds, batch_size=None, num_workers=workers, **kw)
    n, ents, t_first = 0, [], None
    for b in loader:
        if t_first is None:
            t_first, t1 = time.perf_counter() - t0, time.perf_counter()
        n += b["X"].shape[0]
        ents.append(_entropy(np.unique(np.asarray(b["dataset_id"]), return_inverse=True)[1]))
        if n >= cells:
            break
    return _result("scdataset", n, batch_size, t0, t_first, t1, ents, counts, mem, workers=workers,
                   block_size=block_size, fetch_factor=fetch_factor, version=_version("scDataset"),
                   output="dense X, untokenized")


def measure_scdl(scdl: str, h5ad: str, cells: int, batch_size: int, workers: int = 0) -> dict:
    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import DataLoader

    codes, counts = _dataset_codes(h5ad)
    mem = PeakRSS().start()
    t0 = time.perf_counter()
    ds = SingleCellMemMapDataset(scdl)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(ds, batch_size=batch_size, sampler=perm, num_workers=workers,
                        collate_fn=collate_sparse_matrix_batch)
    n, ents, t_first = 0, [], None
    for b in loader:
        if t_first is None:
            t_first, t1 = time.perf_counter() - t0, time.perf_counter()
        k = b.shape[0]
        ents.append(_entropy(codes[perm[n:n + k]]))
        n += k
        if n >= cells:
            break
    return _result("scdl", n, batch_size, t0, t_first, t1, ents, counts, mem, workers=workers,
                   version=_version("bionemo-scdl"), output="sparse CSR X, untokenized (no obs)")


def measure_bound(store: str, cells: int, batch_size: int, tokenizer: str = "rank") -> dict:
    """The loader's stages one after another in one thread, in process CPU seconds per cell."""
    from atlasflow.loader import LoaderConfig
    from atlasflow.loader import plan as P
    from atlasflow.loader.batching import TokenWindow, collate
    from atlasflow.loader.dataset import CellStream

    cfg = LoaderConfig(tokenizer=tokenizer, batch_size=batch_size, obs_columns=("dataset_id",))
    ds = CellStream(store, cfg)
    phase, _ = ds.begin()
    order = ds.epoch_order(0)
    spans = P.window_spans(phase.shard_slots(0), order.window_cells)
    tok, reader = ds._tokenizer(), ds._reader(slot=0)
    cpu = {"read": 0.0, "tokenize": 0.0, "batch": 0.0}
    n, pending, warmed = 0, [], False
    clock = time.process_time
    wall0 = time.perf_counter()
    for i, last, ranges in ds._read_tasks(order, spans):
        if not warmed:  # open the arrays and run each kernel once, outside the timings
            ds._tokenize(tok, 0, ranges, reader.read(ranges))
            warmed = True
        t = clock()
        out = reader.read(ranges)
        t2 = clock()
        block = ds._tokenize(tok, 0, ranges, out)
        t3 = clock()
        cpu["read"] += t2 - t
        cpu["tokenize"] += t3 - t2
        pending.append(block)
        if last:
            t = clock()
            window, pending = TokenWindow(pending), []
            w, lo, hi = spans[i]
            idx = order.window_order(w, window.lengths)[lo:hi]
            for j in range(0, len(idx) - batch_size + 1, batch_size):
                collate(window, idx[j:j + batch_size], cfg.obs_columns)
            cpu["batch"] += clock() - t
            n += len(idx)
            if n >= cells:
                break
    reader.close()
    wall = time.perf_counter() - wall0
    us = {k: round(v / n * 1e6, 2) for k, v in cpu.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rt = (cpu["read"] + cpu["tokenize"]) / n
    return {"loader": "bound", "tokenizer": tokenizer, "cells": n, "cores": cores, "cpu_us_per_cell": us,
            "serial_cells_per_s": round(n / wall, 1),
            "read_tokenize_bound_cells_per_s": round(cores / rt, 1),
            "read_tokenize_batch_bound_cells_per_s": round(cores / (rt + cpu["batch"] / n), 1)}


_MEASURE = {"atlasflow": measure_atlasflow, "tiledbsoma-ml": measure_tiledbsoma_ml, "scan": measure_scan,
            "atlasflow-tuned": measure_atlasflow, "scdataset": measure_scdataset, "scdl": measure_scdl,
            "bound": measure_bound, "scdl_convert": convert_scdl}


def _child(spec: dict) -> dict:
    kind = spec.pop("kind")
    if not spec.pop("tuned_allocator", False):  # the flag `bench loader`'s runs carry too
        return _MEASURE[kind](**spec)
    from atlasflow.loader.memory import tune_allocator

    applied = tune_allocator()  # before the loader allocates anything, as a user would
    return {**_MEASURE[kind](**spec), "loader": kind, "allocator": applied or "glibc default"}


def _run_child(spec: dict, timeout: int = 900) -> dict:
    cmd = [sys.executable, "-m", "atlasflow.infra.bench.peers", "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"spec": spec, "error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1])


def _spec(kind: str, store: str, files: dict, cells: int, batch_size: int, tokenizer: str) -> dict:
    if kind in ("atlasflow", "atlasflow-tuned"):
        return {"kind": kind, "store": store, "tokenizer": tokenizer, "workers": 0, "cells": cells,
                "batch_size": batch_size, **({"tuned_allocator": True} if kind == "atlasflow-tuned" else {})}
    if kind == "bound":
        return {"kind": kind, "store": store, "cells": cells, "batch_size": batch_size, "tokenizer": tokenizer}
    if kind == "tiledbsoma-ml":
        return {"kind": kind, "store": store, "cells": cells, "batch_size": batch_size}
    if kind == "scdataset":
        return {"kind": kind, "h5ad": files["h5ad"], "cells": cells, "batch_size": batch_size}
    if kind == "scdl":
        return {"kind": kind, "scdl": files["scdl"], "h5ad": files["h5ad"], "cells": cells, "batch_size": batch_size}
    raise ValueError(f"peers: unknown loader {kind!r} (known: atlasflow, {', '.join(PEERS)})")


def _rate(run: dict | None, key: str = "cells_per_s") -> float | None:
    return run.get(key) if run else None


def _ratios(pairs: list[dict], ours: str, peers: tuple[str, ...], bound: bool) -> dict:
    """Per-pair ratios of loader ``ours`` to each peer (whole run, steady) and to the pair's bound."""
    out = {}
    mine = [p[ours] for p in pairs if _rate(p.get(ours))]
    if not mine:
        return out
    out["median_cells_per_s"] = round(statistics.median(r["cells_per_s"] for r in mine), 1)
    out["min_entropy_ratio"] = min(r["entropy_ratio"] for r in mine)
    for peer in peers:
        rs = [(p[ours]["cells_per_s"] / p[peer]["cells_per_s"],
               p[ours]["steady_cells_per_s"] / p[peer]["steady_cells_per_s"])
              for p in pairs if _rate(p.get(ours)) and _rate(p.get(peer))]
        if rs:
            out[peer] = {"whole_run_ratios": [round(a, 2) for a, _ in rs],
                         "median_whole_run_ratio": round(statistics.median(a for a, _ in rs), 2),
                         "median_steady_ratio": round(statistics.median(b for _, b in rs), 2)}
    if bound:
        for name, key in (("fraction_of_read_tokenize_bound", "read_tokenize_bound_cells_per_s"),
                          ("fraction_of_read_tokenize_batch_bound", "read_tokenize_batch_bound_cells_per_s")):
            fr = [p[ours]["cells_per_s"] / p["bound"][key] for p in pairs
                  if _rate(p.get(ours)) and _rate(p.get("bound"), key)]
            if fr:
                out[name + "_per_pair"] = [round(f, 3) for f in fr]
                out[name] = round(statistics.median(fr), 3)
    return out


def summarize(pairs: list[dict], peers: tuple[str, ...], scans: list[dict]) -> dict:
    """Per-pair ratios atlasflow / peer (whole run and steady), atlasflow / the pair's bound, and
    their medians; the same for ``atlasflow-tuned`` under ``tuned``."""
    mine = _ratios(pairs, "atlasflow", peers, bound=True)
    out = {peer: {**mine[peer], "median_cells_per_s": round(statistics.median(
        p[peer]["cells_per_s"] for p in pairs if _rate(p.get(peer))), 1)} for peer in peers if peer in mine}
    if mine:
        out["atlasflow_median_cells_per_s"] = mine["median_cells_per_s"]
        out["atlasflow_min_entropy_ratio"] = mine["min_entropy_ratio"]
        out.update({k: v for k, v in mine.items() if k.startswith("fraction_of")})
    others = [p for p in peers if p != "tiledbsoma-ml" and p in out]
    if others:
        fastest = max(others, key=lambda p: out[p]["median_cells_per_s"])
        out["fastest_other_peer"] = fastest
        out["median_ratio_vs_fastest_other_peer"] = out[fastest]["median_whole_run_ratio"]
    bounds = [p["bound"] for p in pairs if _rate(p.get("bound"), "read_tokenize_bound_cells_per_s")]
    if bounds:
        out["bound_median_cells_per_s"] = {k: round(statistics.median(b[k] for b in bounds), 1) for k in
                                           ("read_tokenize_bound_cells_per_s", "read_tokenize_batch_bound_cells_per_s")}
    tuned = _ratios(pairs, "atlasflow-tuned", peers, bound=True)
    if tuned:
        out["tuned"] = tuned
    ok = [s for s in scans if "cells_per_s" in s]
    if ok and mine:
        best = max(s["cells_per_s"] for s in ok)
        out["raw_scan_cells_per_s"] = best
        out["fraction_of_raw_scan"] = round(out["atlasflow_median_cells_per_s"] / best, 3)
    return out


def drop_page_cache() -> None:
    """Empty the OS page cache (Linux, root): the next read of every file comes from disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as exc:
        raise PermissionError(f"--cold: cannot drop the page cache ({exc}); it needs root on Linux") from exc


def run(store: str, work: str, cells: int = 60_000, batch_size: int = 32, pairs: int = 3,
        peers: tuple[str, ...] = PEERS, tokenizer: str = "rank", cold: bool = False, tuned: bool = True,
        log=None) -> dict:
    """``cold``: drop the page cache before every run, so that each loader reads its files from disk
    (an atlas does not fit in memory; warm runs measure decoding and copying only). ``cells`` 0: the
    whole epoch (every committed cell of the store, in whole batches). ``tuned``: also run
    atlasflow under ``tune_allocator()`` in every pair."""
    if cells == 0:
        from atlasflow.store import open_store

        cells = sum(b - a for a, b in open_store(store).complete_ranges()) // batch_size * batch_size
    for p in peers:
        _spec(p, store, {"h5ad": "", "scdl": ""}, cells, batch_size, tokenizer)  # unknown names fail first
    files = prepare(store, work, log) if set(peers) & {"scdataset", "scdl"} else {"conversions": {}}
    out = {"peers_format_version": PEERS_FORMAT_VERSION, "store": store, "cells_per_run": cells,
           "batch_size": batch_size, "tokenizer": tokenizer, "environment": {
               **environment(), **{d: _version(d) for d in ("tiledbsoma-ml", "scDataset", "bionemo-scdl")}},
           "conversions": files["conversions"], "page_cache": "dropped before each run" if cold else "warm",
           "runs": []}

    def add(spec):
        if cold:
            drop_page_cache()
        r = _run_child(dict(spec))
        r["load_avg"] = round(os.getloadavg()[0], 2)
        out["runs"].append(r)
        if log:
            log(json.dumps(r))
        return r

    scans = [add({"kind": "scan", "store": store, "cells": cells, "tuned": True})]
    kinds = ["atlasflow", *(["atlasflow-tuned"] if tuned else []), "bound", *peers]
    out["pairs"] = []
    for i in range(pairs):
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        out["pairs"].append({k: add(_spec(k, store, files, cells, batch_size, tokenizer)) for k in order})
    scans.append(add({"kind": "scan", "store": store, "cells": cells, "tuned": True}))
    out["summary"] = summarize(out["pairs"], tuple(peers), scans)
    out["load_avg_end"] = os.getloadavg()[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atlasflow.infra.bench.peers", description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="the bench store (atlasflow bench loader --build 200000 makes one)")
    ap.add_argument("--work", help="folder for the peers' copies of the corpus (cached)")
    ap.add_argument("--cells", type=int, default=60_000, help="cells per run; 0: the store's whole epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved rounds (each runs every loader once)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--tokenizer", default="rank")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root, Linux)")
    ap.add_argument("--no-tuned", action="store_true", help="skip the atlasflow-under-tune_allocator() runs")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if not args.store or not args.work:
        ap.error("--store and --work are required")
    res = run(args.store, args.work, cells=args.cells, batch_size=args.batch_size, pairs=args.pairs,
              peers=tuple(p for p in args.peers.split(",") if p), tokenizer=args.tokenizer, cold=args.cold,
              tuned=not args.no_tuned,
              log=lambda line: print(line, file=sys.stderr, flush=True))
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
