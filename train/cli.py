"""``atlasflow train``: pretraining with Ray Train (local or ``ray job submit``)."""

from __future__ import annotations

import argparse
import json
import sys


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a cell encoder with Ray Train (MLM on the stream)",
                              description="Pretrain with Ray Train. Re-running with the same --storage-path and "
                                          "--name resumes from the latest checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="TOML config file")
    src.add_argument("--preset", metavar="NAME", help="built-in preset (debug, gpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--store", help="store URI (= data.store)")
    p.add_argument("--storage-path", help="Ray Train storage path, local dir or s3://... (= run.storage_path)")
    p.add_argument("--name", help="run name (= run.name)")
    p.add_argument("--num-workers", type=_workers, help="Ray Train workers, or an elastic range like 2-8 (= run.num_workers)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-plot", action="store_true", help="do not write the loss-curve PNG")
    p.set_defaults(func=_train)


def _workers(text: str):
    """An int, or an elastic range such as "2-8" (validated by RunConfig)."""
    return int(text) if text.strip().isdigit() else text


def config_from_args(args):
    from .config import load_config, load_preset

    cfg = load_config(args.config) if args.config else load_preset(args.preset)
    overrides = list(args.overrides)
    for flag, key in (("store", "data.store"), ("storage_path", "run.storage_path"), ("name", "run.name"),
                      ("num_workers", "run.num_workers")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return cfg.with_overrides(overrides)


def _train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"atlasflow train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    from .trainer import run_training

    out = run_training(cfg, plot=not args.no_plot)
    summary = {k: out[k] for k in ("step", "metrics", "checkpoint", "loss_png", "run_dir")}
    print(json.dumps(summary, indent=1))
    return 0
