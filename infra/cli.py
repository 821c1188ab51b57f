"""The ``atlasflow`` console command. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing ``register_cli(subparsers)``; missing ones are skipped so that a partial
# install still gives a working --help.
_AREAS = [
    "atlasflow.ingest.cli",
    "atlasflow.store.cli",
    "atlasflow.infra.bench.cli",
    "atlasflow.train.cli",
    "atlasflow.train.eval_cli",
    "atlasflow.infra.quickstart",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasflow", description="Streaming single-cell foundation-model engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _AREAS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
