"""``atlasflow query | embed | finetune | eval`` (wired into the ``atlasflow`` command by infra/cli.py)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..model import POOLINGS


def _add_source(p, required: bool = True, many: bool = False) -> None:
    g = p.add_argument_group("input (an atlasflow store, an .h5ad, or a Census query)")
    g.add_argument("--input", action="append" if many else "store", default=[] if many else None,
                   metavar="PATH", help="store directory or .h5ad file" + (" (repeatable)" if many else ""))
    g.add_argument("--census-version", help="query CELLxGENE Census (e.g. stable) instead of --input")
    g.add_argument("--census-uri", help="query a local Census mirror (root directory) instead of --input")
    g.add_argument("--organism", default="homo_sapiens")
    g.add_argument("--obs-filter", dest="obs_filter", default="",
                   help="obs value filter, e.g. \"tissue_general == 'lung'\"")
    g.add_argument("--filter", dest="obs_filter", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # earlier name
    p.set_defaults(_source_required=required)


def _sources(args) -> list:
    from atlasflow.store.query import QueryConfig

    census = args.census_version or args.census_uri
    inputs = args.input if isinstance(args.input, list) else ([args.input] if args.input else [])
    if census and inputs:
        raise ValueError("--input: give --input or a Census query (--census-version/--census-uri), not both")
    if census:
        return [QueryConfig(source="census", uri=args.census_uri or "", census_version=args.census_version or "",
                            organism=args.organism, obs_filter=args.obs_filter)]
    if not inputs:
        raise ValueError("--input: no input given (a store, an .h5ad, or --census-version/--census-uri)")
    out = []
    for path in inputs:
        if not Path(path).exists():
            raise FileNotFoundError(f"--input: {path} does not exist")
        if args.obs_filter and not path.endswith(".h5ad"):
            out.append(QueryConfig(source="store", uri=path, obs_filter=args.obs_filter))
        elif args.obs_filter:
            raise ValueError("--obs-filter: obs filters apply to stores and Census, not to .h5ad inputs")
        else:
            out.append(path)
    return out


def _label_map(text: str | None) -> dict:
    if not text:
        return {}
    raw = Path(text).read_text() if Path(text).is_file() else text
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--label-map: neither a JSON file nor JSON text ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError("--label-map: must be a JSON object {source label: harmonized label or null}")
    return d


def _default(cls, name: str):
    """A config field's default: the CLI takes its defaults from the config dataclasses, so the two never drift."""
    return next(f.default for f in fields(cls) if f.name == name)


def register_cli(subparsers) -> None:
    from atlasflow.store.query import QueryConfig

    from .embed import EmbedConfig
    from .evaluate import EvalConfig
    from .finetune_config import FinetuneConfig

    _register_query(subparsers, functools.partial(_default, QueryConfig))
    _register_embed(subparsers, functools.partial(_default, EmbedConfig))
    _register_finetune(subparsers, functools.partial(_default, FinetuneConfig))
    _register_eval(subparsers, functools.partial(_default, EvalConfig))


def _register_query(subparsers, Q) -> None:
    q = subparsers.add_parser("query", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="cut a cell set from Census or a store into an .h5ad or a new store")
    _add_source(q)
    q.add_argument("--genes", default="", help="comma-separated Ensembl ids, or a file with one per line")
    q.add_argument("--obs-columns", default="", help="comma-separated obs columns to keep (default: all)")
    q.add_argument("--label", default="", help="label column: cells per label are printed, caps apply to it")
    q.add_argument("--per-label-cap", type=int, default=Q("per_label_cap"), help="0 = no cap")
    q.add_argument("--fraction", type=float, default=Q("fraction"), help="stratified subsample: fraction of every label")
    q.add_argument("--seed", type=int, default=Q("seed"))
    q.add_argument("--out-h5ad")
    q.add_argument("--out-store")
    q.add_argument("--dry-run", action="store_true", help="print the cells per label and stop")
    q.set_defaults(func=_query)


def _register_embed(subparsers, E) -> None:
    e = subparsers.add_parser("embed", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="cell embeddings from a pretrained checkpoint")
    e.add_argument("--checkpoint", required=True)
    _add_source(e)
    e.add_argument("--out-h5ad", help="write obsm['X_atlasflow'] (+ obs) here")
    e.add_argument("--out-parquet", help="write soma_joinid + embedding here")
    e.add_argument("--pooling", default=E("pooling"), choices=POOLINGS)
    e.add_argument("--batch-size", type=int, default=E("batch_size"))
    e.add_argument("--device", default=E("device"), help="auto | cpu | cuda | cuda:N")
    e.add_argument("--medians-store", help="store whose gene medians tokenize (default: the pretraining store)")
    e.set_defaults(func=_embed)


def _register_finetune(subparsers, F) -> None:
    f = subparsers.add_parser("finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="train a classification head on a checkpoint (Ray Train)")
    f.add_argument("--checkpoint", required=True)
    _add_source(f)
    f.add_argument("--label", default=F("label"))
    f.add_argument("--label-map", help="JSON file or text {label: harmonized label or null}")
    f.add_argument("--mode", default=F("mode"), choices=("frozen", "full"))
    f.add_argument("--pooling", default=F("pooling"), choices=POOLINGS)
    f.add_argument("--steps", type=int, default=F("steps"), help="at most (early stopping on the validation split)")
    f.add_argument("--batch-size", type=int, default=F("batch_size"))
    f.add_argument("--lr", type=float, default=F("lr"), help="head learning rate")
    f.add_argument("--encoder-lr", type=float, default=F("encoder_lr"), help="full mode: the top block's learning rate")
    f.add_argument("--layer-decay", type=float, default=F("layer_decay"), help="full mode: lr factor per block downwards")
    f.add_argument("--thin-range", default=",".join(map(str, F("thin_range") or ())) or "none",
                   help="depth augmentation: per-cell keep rate range lo,hi (log-uniform); 'none' = off")
    f.add_argument("--thin-prob", type=float, default=F("thin_prob"), help="share of cells thinned")
    f.add_argument("--val-fraction", type=float, default=F("val_fraction"), help="early-stopping split (0 = none)")
    f.add_argument("--val-by", default=F("val_by"), help="group column of the validation split")
    f.add_argument("--patience", type=int, default=F("patience"), help="evaluations without improvement before stopping")
    f.add_argument("--target", help="a source (.h5ad/store) to classify later: tokens use only the genes "
                                    "detected in both")
    f.add_argument("--seed", type=int, default=F("seed"))
    f.add_argument("--num-workers", type=int, default=F("num_workers"), help="Ray Train workers")
    f.add_argument("--use-gpu", action="store_true")
    f.add_argument("--storage-path", default=F("storage_path"))
    f.add_argument("--name", default=F("name"))
    f.add_argument("--medians-store")
    f.set_defaults(func=_finetune)


def _register_eval(subparsers, V) -> None:
    v = subparsers.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="cell-type scores of embeddings vs PCA / logistic-regression baselines")
    v.add_argument("--checkpoint", required=True)
    _add_source(v, many=True)
    v.add_argument("--label", default=V("label"))
    v.add_argument("--label-map", help="JSON file or text {label: harmonized label or null}")
    v.add_argument("--split-by", default=V("split_by"), help="grouping column (dataset_id, donor_id)")
    v.add_argument("--test-group", action="append", default=[], help="held-out group (repeatable)")
    v.add_argument("--test-fraction", type=float, default=V("test_fraction"))
    v.add_argument("--pooling", default=V("pooling"), choices=POOLINGS, help="fine-tuned head and plot")
    v.add_argument("--finetune-steps", type=int, default=V("finetune_steps"), help="at most (early stopping); 0 = no fine-tuned rows")
    v.add_argument("--finetune-mode", default=V("finetune_mode"), choices=("frozen", "full"))
    v.add_argument("--seed", type=int, action="append", default=[], dest="seeds",
                   help="seed of the trained rows (repeatable; rows report mean ± sd over them)")
    v.add_argument("--no-control", action="store_true", help="no random-init control rows")
    v.add_argument("--cv-folds", type=int, default=V("cv_folds"), help="CV folds on the test cells (0 = off)")
    v.add_argument("--no-scib", action="store_true", help="skip the scib-metrics table")
    v.add_argument("--finetuned", help="score this fine-tuned checkpoint instead of fine-tuning")
    v.add_argument("--medians-store")
    v.add_argument("--out", default="atlasflow_eval")
    v.add_argument("--no-plot", action="store_true")
    v.add_argument("--meta-tokens", default=V("meta_tokens"), choices=("keep", "drop"),
                   help="a model with metadata tokens: keep them (<unk> for unknown values) or drop them")
    v.set_defaults(func=_eval)


def _fail(cmd: str, exc: Exception) -> int:
    print(f"atlasflow {cmd}: {exc}", file=sys.stderr)
    return 2


def _query(args) -> int:
    from atlasflow.ingest.export import to_h5ad, to_store
    from atlasflow.store.query import QueryConfig, select

    try:
        src = _sources(args)[0]
        if not isinstance(src, QueryConfig):
            if str(src).endswith(".h5ad"):
                raise ValueError("--input: query reads a store or Census, not an .h5ad")
            src = QueryConfig(source="store", uri=src)
        genes = args.genes
        if genes and Path(genes).is_file():
            genes = ",".join(Path(genes).read_text().split())
        cfg = QueryConfig(**{**src.__dict__, "genes": tuple(g for g in genes.split(",") if g),
                             "obs_columns": tuple(c for c in args.obs_columns.split(",") if c), "label": args.label,
                             "per_label_cap": args.per_label_cap, "fraction": args.fraction, "seed": args.seed})
        if not (args.out_h5ad or args.out_store or args.dry_run):
            raise ValueError("--out-h5ad / --out-store: say where to write (or --dry-run)")
        sel = select(cfg)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("query", exc)
    print(sel.counts_table(), flush=True)
    if args.out_h5ad:
        to_h5ad(cfg, args.out_h5ad, sel)
        print(f"wrote {args.out_h5ad}")
    if args.out_store:
        to_store(cfg, args.out_store, sel)
        print(f"wrote store {args.out_store}")
    return 0


def _embed(args) -> int:
    from .embed import EmbedConfig, embed

    try:
        src = _sources(args)[0]
        cfg = EmbedConfig(pooling=args.pooling, batch_size=args.batch_size, device=args.device)
        out = embed(args.checkpoint, src, args.out_h5ad, args.out_parquet, cfg, args.medians_store)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("embed", exc)
    print(json.dumps(out, indent=1))
    return 0


def _finetune(args) -> int:
    from .finetune import FinetuneConfig, run_finetune

    try:
        src = _sources(args)[0]
        thin = None if args.thin_range.lower() == "none" else tuple(float(v) for v in args.thin_range.split(","))
        cfg = FinetuneConfig(label=args.label, mode=args.mode, pooling=args.pooling, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, encoder_lr=args.encoder_lr,
                             layer_decay=args.layer_decay, thin_range=thin, thin_prob=args.thin_prob,
                             val_fraction=args.val_fraction, val_by=args.val_by, patience=args.patience,
                             seed=args.seed, num_workers=args.num_workers,
                             use_gpu=args.use_gpu, storage_path=args.storage_path, name=args.name)
        out = run_finetune(args.checkpoint, src, cfg, _label_map(args.label_map) or None, args.medians_store,
                           target=args.target)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("finetune", exc)
    print(json.dumps(out, indent=1, default=str))
    return 0


def _eval(args) -> int:
    from .evaluate import EvalConfig, run_eval

    try:
        cfg = EvalConfig(label=args.label, split_by=args.split_by, test_groups=tuple(args.test_group),
                         test_fraction=args.test_fraction, label_map=_label_map(args.label_map),
                         pooling=args.pooling, finetune_steps=0 if args.finetuned else args.finetune_steps,
                         finetune_mode=args.finetune_mode, seeds=tuple(args.seeds), control=not args.no_control,
                         cv_folds=args.cv_folds, scib=not args.no_scib, plot=not args.no_plot,
                         meta_tokens=args.meta_tokens)
        table = run_eval(args.checkpoint, _sources(args), args.out, cfg, args.medians_store, args.finetuned)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("eval", exc)
    print(Path(args.out, "eval.md").read_text())
    print(json.dumps({k: table[k] for k in ("n_train", "n_test", "test_groups", "rows")}, indent=1))
    return 0
