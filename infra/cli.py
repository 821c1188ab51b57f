"""The ``atlasflow`` console command. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing ``register_cli(subparsers)``; missing ones are skipped so that a partial
# install still gives a working --help.
_AREAS = [
    "atlasflow.ingest.cli",
    "atlasflow.store.cli",
    "atlasflow.infra.bench.cli",
    "atlasflow.train.cli",
    "atlasflow.train.tasks.cli",
    "atlasflow.infra.quickstart",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasflow", description="Streaming single-cell foundation-model engine.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="library messages: -v adds debug ones (default: info and warnings, on stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="library messages: warnings and errors only")
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


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at creation: tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(level: int) -> None:
    """One stderr handler on the ``atlasflow`` logger (stdout stays for the JSON and tables commands print)."""
    root = logging.getLogger("atlasflow")
    handler = next((h for h in root.handlers if getattr(h, "_atlasflow_cli", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler._atlasflow_cli = True
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
