"""`atlasflow synth` and `atlasflow ingest`."""

from __future__ import annotations

import json
import sys

from atlasflow.store.lease import DEFAULT_WAIT_S

from .pipeline import DEFAULT_BLOCK_CELLS

EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the store's writer lease; try again later


def register_cli(sub) -> None:
    try:
        from atlasflow.ingest.synth.cli import register_synth_cli
    except ModuleNotFoundError:
        pass
    else:
        register_synth_cli(sub)

    p = sub.add_parser("ingest", help="ingest H5AD files or a CELLxGENE Census query into a store (Ray workers)",
                       description="Ingest H5AD sources (files, directories, globs, or a manifest file listing "
                                   "them) or a CELLxGENE Census query into an atlasflow store. Idempotent: "
                                   "re-running adds nothing twice; an interrupted run is completed by re-running.")
    p.add_argument("--store", required=True, help="store URI (created if absent)")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help=".h5ad file, directory, glob, or manifest file")
    p.add_argument("--census", action="store_true", help="ingest from CELLxGENE Census instead of files")
    p.add_argument("--census-version", default=None, help="Census release, e.g. 'stable' or '2025-01-30'")
    p.add_argument("--census-uri", default=None, help="URI of a local/mirrored Census (instead of a version)")
    p.add_argument("--organism", default="Homo sapiens", help="organism (default: Homo sapiens)")
    p.add_argument("--obs-filter", default=None, help="SOMA value filter on Census obs, e.g. \"tissue_general == 'lung'\"")
    p.add_argument("--genes", default=None, help="comma-separated Ensembl IDs to keep (Census only)")
    p.add_argument("--normalized", action="store_true",
                   help="accept non-integer (normalized) values; such a store is refused for pretraining")
    p.add_argument("--require-obs", default="", help="comma-separated obs columns every source must have")
    p.add_argument("--block-cells", type=int, default=DEFAULT_BLOCK_CELLS,
                   help=f"cells per write task (default {DEFAULT_BLOCK_CELLS}; memory per task grows with it)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--duplicate-genes", choices=("sum", "error"), default="sum",
                   help="features resolving to one Ensembl ID: sum their counts (default) or refuse the source")
    p.add_argument("--memory-budget", type=float, default=2.0, metavar="GB",
                   help="memory one read task may hold for a source's matrix; larger 10x .h5 / CSC files are "
                        "read in row blocks, larger MTX directories refused (default 2)")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                   help=f"how long to wait while another process writes the store (default {DEFAULT_WAIT_S:.0f}; "
                        f"0: fail at once, naming the holder)")
    p.add_argument("--all-cells", action="store_true",
                   help="Census: keep non-primary cells too (default: is_primary_data == True only, each cell once)")
    p.add_argument("--no-resume", action="store_true",
                   help="do not finish sources an interrupted run left pending (default: finish them)")
    p.set_defaults(func=_ingest)


def _ingest(args) -> int:
    from atlasflow.store.lease import LeaseLost, StoreBusy

    try:
        return _run_ingest(args)
    except StoreBusy as exc:
        print(f"atlasflow ingest: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except LeaseLost as exc:
        print(f"atlasflow ingest: {exc}", file=sys.stderr)
        return 1


def _run_ingest(args) -> int:
    from atlasflow.store import organism_key

    organism = organism_key(args.organism)
    if args.census:
        if args.sources:
            print("atlasflow ingest: give either SOURCE files or --census, not both", file=sys.stderr)
            return 2
        from atlasflow.ingest.census import ingest_census

        report = ingest_census(args.store, census_version=args.census_version, census_uri=args.census_uri,
                               organism=args.organism, obs_filter=args.obs_filter,
                               genes=[g for g in (args.genes or "").split(",") if g], primary_only=not args.all_cells,
                               block_cells=args.block_cells, num_cpus=args.num_cpus, progress=not args.no_progress,
                               wait_s=args.wait)
    else:
        if not args.sources:
            print("atlasflow ingest: no SOURCE given (or use --census)", file=sys.stderr)
            return 2
        from atlasflow.ingest.pipeline import ingest_paths

        report = ingest_paths(args.store, args.sources, organism=organism, allow_normalized=args.normalized,
                              require_obs=tuple(c for c in args.require_obs.split(",") if c),
                              block_cells=args.block_cells, num_cpus=args.num_cpus, progress=not args.no_progress,
                              wait_s=args.wait, resume_pending=not args.no_resume,
                              duplicate_genes=args.duplicate_genes, memory_budget=int(args.memory_budget * 1e9))
    print(json.dumps(report.to_dict(), indent=2))
    for f in report.failed:
        print(f"FAILED {f['source']}: {f['error']}", file=sys.stderr)
    extra = "".join(f", {n} {why.replace('_', '-')} cells skipped" for why, n in report.cells_skipped.items() if n)
    resumed = f" ({len(report.resumed)} resumed from an interrupted run)" if report.resumed else ""
    print(f"ingest: {len(report.added)} added{resumed}, {len(report.skipped)} already present, "
          f"{len(report.failed)} failed; {report.cells} cells in {report.seconds:.1f} s{extra}", file=sys.stderr)
    return 0 if report.ok else 1
