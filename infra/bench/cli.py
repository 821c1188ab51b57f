"""`atlasflow bench loader ...` (the loader benchmark)."""

from __future__ import annotations

import argparse


def _bench_subparsers(subparsers):
    """The `bench` command's own subparsers, shared with other areas that add `bench X`."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks (loader, ...)")
        bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    for action in bench._actions:  # another area may already have added `bench` subcommands
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_command", required=True)


def register_cli(subparsers) -> None:
    from .loader import add_arguments, run_cli

    p = _bench_subparsers(subparsers).add_parser(
        "loader", help="loader throughput / shuffle quality / memory vs tiledbsoma-ml and a raw scan (JSON)")
    add_arguments(p)
    p.set_defaults(func=run_cli)
