"""``atlasflow synth``: generate a synthetic atlas (wired into ingest/cli.py by ``register_synth_cli``)."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace) -> int:
    from . import synthesize

    try:
        summary = synthesize(args.out, n_cells=args.cells, n_genes=args.genes, n_datasets=args.datasets,
                             seed=args.seed, layout=args.layout, chunk_cells=args.chunk_cells,
                             organism=args.organism)
    except (ValueError, TypeError, FileExistsError) as exc:
        print(f"atlasflow synth: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def register_synth_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth", help="generate a deterministic synthetic single-cell atlas",
        description="Generate a synthetic atlas (negative-binomial counts, cell-type gene programs, Zipf-sized "
                    "datasets, real Ensembl genes) as H5AD files, a CELLxGENE-Census-layout SOMA store, or an "
                    "atlasflow store. Same arguments -> identical data. Prints a JSON summary.")
    p.add_argument("--out", required=True,
                   help="output directory (must not exist or be empty); with --layout store an existing "
                        "atlasflow store is appended to, and an interrupted run is completed by re-running it")
    p.add_argument("--cells", type=int, required=True, help="total number of cells")
    p.add_argument("--genes", type=int, required=True, help="number of genes (real reference Ensembl IDs)")
    p.add_argument("--datasets", type=int, required=True, help="number of datasets (Zipf-like sizes, >= 1 cell)")
    p.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    p.add_argument("--layout", choices=["h5ad", "census", "store"], default="h5ad",
                   help="h5ad: one file per dataset; census: ROOT/census_data/<organism> for "
                        "cellxgene_census.open_soma(uri=ROOT); store: an atlasflow store (default: h5ad)")
    p.add_argument("--chunk-cells", type=int, default=20_000,
                   help="cells generated and written per chunk; bounds memory (default: 20000)")
    p.add_argument("--organism", default="homo_sapiens", help="gene reference organism (default: homo_sapiens)")
    p.set_defaults(func=_run)
    return p
