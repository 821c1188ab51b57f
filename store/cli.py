"""`atlasflow store info` and `atlasflow store stats`."""

from __future__ import annotations

import json
import sys

from .lease import DEFAULT_WAIT_S


def register_cli(sub) -> None:
    p = sub.add_parser("store", help="inspect a store or compute its gene statistics")
    ssub = p.add_subparsers(dest="store_command", required=True)
    info = ssub.add_parser("info", help="cells, genes, nnz, datasets and manifest status")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    stats = ssub.add_parser("stats", help="compute per-gene nnz and exact nonzero medians (rank tokenizer)")
    stats.add_argument("store")
    stats.add_argument("--block-cells", type=int, default=50_000)
    stats.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                       help="how long to wait while another process writes the store (0: fail at once)")
    stats.set_defaults(func=_stats)


def store_info(uri: str) -> dict:
    from atlasflow.store import open_store
    from atlasflow.store.stats import stats_metadata

    s = open_store(uri)
    obs = s.obs(["dataset_id", "nnz"])
    m = s.manifest
    return {
        "store": s.uri,
        "timestamp_ms": s.timestamp_ms,
        "organism": m.organism,
        "cells": s.n_cells,
        "genes": s.n_genes,
        "nnz": int(obs["nnz"].sum()),
        "datasets": int(obs["dataset_id"].nunique()),
        "cells_per_dataset": obs["dataset_id"].value_counts().sort_index().to_dict(),
        "manifest": {
            "format_version": m.format_version,
            "sources": {st: sum(1 for e in m.sources.values() if e.status == st) for st in ("complete", "pending", "failed")},
            "failed": [{"source": e.name, "error": e.error} for e in m.failed()],
            "pending": [e.name for e in m.sources.values() if e.status == "pending"],
        },
        "gene_stats": stats_metadata(s),
        "writer": _writer(uri),
    }


def _writer(uri: str) -> str | None:
    """Who holds the writer lease now (None: nobody); reading it takes nothing."""
    from .lease import current_holder

    try:
        rec = current_holder(uri)
    except (NotImplementedError, OSError, ValueError) as exc:
        return f"unknown ({exc})"
    return None if rec is None else rec.describe()


def _info(args) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    m = info["manifest"]
    print(f"store       {info['store']}  (organism {info['organism']}, snapshot {info['timestamp_ms']})")
    print(f"cells       {info['cells']:,}")
    print(f"genes       {info['genes']:,}")
    print(f"nnz         {info['nnz']:,}")
    print(f"datasets    {info['datasets']}")
    print(f"sources     {m['sources']['complete']} complete, {m['sources']['pending']} pending, {m['sources']['failed']} failed")
    for f in m["failed"]:
        print(f"  failed    {f['source']}: {f['error']}")
    for p in m["pending"]:
        if info["writer"]:
            print(f"  pending   {p} (being written now)")
        else:
            print(f"  pending   {p} (interrupted; the next ingest of this store finishes it)")
    if info["writer"]:
        print(f"writer      {info['writer']}")
    gs = info["gene_stats"]
    print(f"gene stats  {'computed over ' + str(gs['n_cells']) + ' cells' if gs else 'absent (run `atlasflow store stats`)'}")
    return 0


def _stats(args) -> int:
    from atlasflow.store.lease import StoreBusy
    from atlasflow.store.stats import compute_gene_stats

    try:
        df = compute_gene_stats(args.store, block_cells=args.block_cells, wait_s=args.wait)
    except StoreBusy as exc:
        print(f"atlasflow store stats: {exc}", file=sys.stderr)
        return 75
    print(json.dumps({"store": args.store, "genes": len(df), "genes_expressed": int((df["nnz"] > 0).sum()),
                      "median_of_medians": float(df["nonzero_median"].median())}, indent=2))
    return 0
