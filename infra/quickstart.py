"""`atlasflow quickstart`: the README's main job, end to end on an embedded default.

synth (H5AD files) -> ingest (local Ray workers) -> store stats -> pretrain (cpu-small preset, Ray
Train, 2 CPU workers; prints the MLM loss next to its unigram baselines and the held-out loss) -> embed + evaluate against PCA / logistic-regression baselines and a fine-tuned
classifier (a second Ray Train run). Local disk only, no
cloud, nothing to configure; everything lands under --out.
"""

from __future__ import annotations

import json
import os
import sys
import time


PRESET = "cpu-small"  # learns within its budget on this corpus (train/presets/cpu-small.toml)
FINETUNE_STEPS = 150  # at most (early stopping); full fine-tune, batch 32: the fine-tuned rows of the table


def register_cli(sub) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on a small synthetic atlas (local, CPU)",
                       description=__doc__)
    p.add_argument("--out", default="atlasflow_runs/quickstart", help="working directory (default: %(default)s)")
    p.add_argument("--cells", type=int, default=6000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="override the cpu-small preset's train.max_steps")
    p.add_argument("--skip-eval", action="store_true", help="stop after pretraining")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pretraining setting of the cpu-small preset, as `atlasflow train --set` "
                        "(e.g. --set objective.contrast_weight=0 turns the contrastive term off; repeatable)")
    p.set_defaults(func=_run)


def _step(name: str):
    print(f"\n== {name} ==", file=sys.stderr, flush=True)
    return time.time()


def run_quickstart(out: str, cells: int = 6000, genes: int = 2000, datasets: int = 6, seed: int = 0,
                   max_steps: int | None = None, skip_eval: bool = False,
                   overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from atlasflow.store.ray_env import init_ray
    from atlasflow.ingest import ingest_paths
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.cli import store_info
    from atlasflow.store.stats import compute_gene_stats
    from atlasflow.train import load_preset, run_training

    # The user's settings are checked before anything runs; the store, split and run location stay
    # the quickstart's own.
    preset = load_preset(PRESET).with_overrides(list(overrides))
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    src, store = os.path.join(out, "h5ad"), os.path.join(out, "store")
    summary: dict = {"out": out, "overrides": list(overrides)}

    t = _step("1/5 synth: a synthetic atlas as H5AD files")
    if not os.path.isdir(src):
        synthesize(src, cells, genes, datasets, seed=seed, layout="h5ad")
    summary["synth_s"] = round(time.time() - t, 1)

    t = _step("2/5 ingest with Ray workers")
    init_ray()
    rep = ingest_paths(store, [src], progress=sys.stderr.isatty())
    if not rep.ok:
        raise RuntimeError(f"ingest failed: {rep.failed}")
    summary["ingest"] = {"added": len(rep.added), "already_present": len(rep.skipped), "s": round(time.time() - t, 1)}

    t = _step("3/5 store stats (gene medians for the rank tokenizer)")
    compute_gene_stats(store)
    info = store_info(store)
    summary["store"] = {k: info[k] for k in ("cells", "genes", "nnz", "datasets")}

    t = _step(f"4/5 pretrain ({PRESET} preset, Ray Train, 2 CPU workers)")
    # Pretrain on the train split of datasets only, so the evaluation's test datasets are unseen.
    over = {"data.store": store, "data.split": "train", "run.storage_path": os.path.join(out, "runs"),
            "run.name": "quickstart"}
    if max_steps:
        over["train.max_steps"] = max_steps
    result = run_training(preset.with_overrides(over))
    summary["train"] = {"metrics": result["metrics"], "step": result["step"], "checkpoint": result["checkpoint"],
                        "loss_png": result["loss_png"], "s": round(time.time() - t, 1),
                        "signals": learning_signals(result["history"])}
    print(format_signals(summary["train"]["signals"]), file=sys.stderr, flush=True)

    if not skip_eval:
        t = _step("5/5 embed + evaluate against simple baselines")
        try:
            from atlasflow.train.tasks.evaluate import EvalConfig, run_eval
        except ImportError:
            summary["eval"] = "evaluation module not installed"
        else:
            # The fine-tuned row is a second Ray Train run in this process (ray_env explains what once
            # killed it); FINETUNE_STEPS keeps it to ~20 s on 2 CPU cores.
            summary["eval"] = run_eval(checkpoint=result["checkpoint"], store=store, out=os.path.join(out, "eval"),
                                       cfg=EvalConfig(finetune_steps=FINETUNE_STEPS))
            summary["eval_s"] = round(time.time() - t, 1)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    return summary


def learning_signals(history: list[dict]) -> dict:
    """The last logged row's loss next to its baselines; ``below_unigram`` > 0 means it learned more
    than gene frequencies (the first and last held-out measurements as well)."""
    from atlasflow.train.plot import dedupe_history

    hist = dedupe_history(history)
    last = hist[-1]
    keys = ("step", "loss", "unigram_loss", "position_unigram_loss", "masked_accuracy", "val_loss",
            "val_unigram_loss", "val_position_unigram_loss", "val_masked_accuracy", "val_step")
    out = {k: last.get(k) for k in keys}
    out["below_unigram"] = None if last.get("unigram_loss") is None else last["unigram_loss"] - last["loss"]
    if last.get("val_loss") is not None and last.get("val_unigram_loss") is not None:
        out["val_below_unigram"] = last["val_unigram_loss"] - last["val_loss"]
    return out


def format_signals(sig: dict) -> str:
    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"pretraining signals at step {sig['step']}:",
             f"  train MLM loss {f(sig['loss'])}  unigram {f(sig['unigram_loss'])}  per-position unigram "
             f"{f(sig['position_unigram_loss'])}  ({f(sig['below_unigram'], '+.3f')} nat below unigram)  "
             f"masked acc {f(sig['masked_accuracy'])}"]
    if sig.get("val_loss") is not None:
        lines.append(f"  held-out (val datasets) loss {f(sig['val_loss'])}  unigram {f(sig['val_unigram_loss'])}  "
                     f"per-position {f(sig['val_position_unigram_loss'])}  masked acc {f(sig['val_masked_accuracy'])}")
    return "\n".join(lines)


def _run(args) -> int:
    from atlasflow.train import load_preset

    try:
        load_preset(PRESET).with_overrides(args.overrides)
    except ValueError as exc:
        print(f"atlasflow quickstart: {exc}", file=sys.stderr)
        return 2
    s = run_quickstart(args.out, args.cells, args.genes, args.datasets, args.seed, args.max_steps, args.skip_eval,
                       args.overrides)
    print(json.dumps(s, indent=2, default=str))
    md = os.path.join(s["out"], "eval", "eval.md")
    if os.path.exists(md):
        print("\n" + open(md).read())
    print(f"\ncheckpoint: {s['train']['checkpoint']}\nloss curve: {s['train']['loss_png']}\n"
          f"summary:    {os.path.join(s['out'], 'summary.json')}", file=sys.stderr)
    return 0
