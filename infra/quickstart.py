"""`atlasflow quickstart`: the README's main job, end to end on an embedded default.

synth (H5AD files) -> ingest (local Ray workers) -> store stats -> pretrain (debug preset, Ray Train,
2 CPU workers) -> embed + evaluate against PCA / logistic-regression baselines and a fine-tuned
classifier (a second Ray Train run). Local disk only, no
cloud, nothing to configure; everything lands under --out.
"""

from __future__ import annotations

import json
import os
import sys
import time


FINETUNE_STEPS = 150  # frozen encoder, batch 32: the fine-tuned-classifier row of the table


def register_cli(sub) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on a small synthetic atlas (local, CPU)",
                       description=__doc__)
    p.add_argument("--out", default="atlasflow_runs/quickstart", help="working directory (default: %(default)s)")
    p.add_argument("--cells", type=int, default=6000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="override the debug preset's train.max_steps")
    p.add_argument("--skip-eval", action="store_true", help="stop after pretraining")
    p.set_defaults(func=_run)


def _step(name: str):
    print(f"\n== {name} ==", file=sys.stderr, flush=True)
    return time.time()


def run_quickstart(out: str, cells: int = 6000, genes: int = 2000, datasets: int = 6, seed: int = 0,
                   max_steps: int | None = None, skip_eval: bool = False) -> dict:
    from atlasflow.infra.ray_env import init_ray
    from atlasflow.ingest import ingest_paths
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.cli import store_info
    from atlasflow.store.stats import compute_gene_stats
    from atlasflow.train import load_preset, run_training

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    src, store = os.path.join(out, "h5ad"), os.path.join(out, "store")
    summary: dict = {"out": out}

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

    t = _step("4/5 pretrain (debug preset, Ray Train, 2 CPU workers)")
    # Pretrain on the train split of datasets only, so the evaluation's test datasets are unseen.
    over = {"data.store": store, "data.split": "train", "run.storage_path": os.path.join(out, "runs"),
            "run.name": "quickstart"}
    if max_steps:
        over["train.max_steps"] = max_steps
    result = run_training(load_preset("debug").with_overrides(over))
    summary["train"] = {"metrics": result["metrics"], "step": result["step"], "checkpoint": result["checkpoint"],
                        "loss_png": result["loss_png"], "s": round(time.time() - t, 1)}

    if not skip_eval:
        t = _step("5/5 embed + evaluate against simple baselines")
        try:
            from atlasflow.train.evaluate import EvalConfig, run_eval
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


def _run(args) -> int:
    s = run_quickstart(args.out, args.cells, args.genes, args.datasets, args.seed, args.max_steps, args.skip_eval)
    print(json.dumps(s, indent=2, default=str))
    md = os.path.join(s["out"], "eval", "eval.md")
    if os.path.exists(md):
        print("\n" + open(md).read())
    print(f"\ncheckpoint: {s['train']['checkpoint']}\nloss curve: {s['train']['loss_png']}\n"
          f"summary:    {os.path.join(s['out'], 'summary.json')}", file=sys.stderr)
    return 0
