"""The prepared GPU check: the ``gpu`` preset, briefly, on a synthetic store; prints one JSON object.

    python -m atlasflow.infra.gpu_check --out /tmp/gpu_check [--steps 300] [--cells 20000]
    python -m atlasflow.infra.gpu_check --out /tmp/gpu_check --cpu   # the same logic on CPU (tests)

It synthesizes a store (learnable programs, several datasets), computes its gene stats and runs the
``gpu`` preset (bf16 autocast, packed rows, varlen attention, torch.compile, thinning, max_len 2048) on
ONE worker for ``--steps`` steps with a short warmup, the held-out (val-split) loss every ``steps/3``
steps. The JSON reports what the issue asks a GPU session to record: the MLM loss next to its unigram
baselines at the end, the held-out loss, and throughput (median tokens/s and cells/s over the logged
rows after the first third, which holds compilation and warmup) and the device.
``--cpu`` swaps only what a CPU cannot run (fp32, no compile, no GPU, a 2 x 64 model, max_len 512)
so the script's logic is tested without a GPU; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

GPU_CHECK_FORMAT_VERSION = 1  # gpu_check.json

def overrides(store: str, runs: str, steps: int, cpu: bool) -> dict:
    """Preset settings changed for a brief single-worker check (the rest is the gpu preset as shipped)."""
    over = {"data.store": store, "run.storage_path": runs, "run.name": "gpu_check", "run.num_workers": 1,
            "run.cpus_per_worker": float(os.cpu_count() or 1), "train.max_steps": steps, "train.epochs": 1000,
            "train.log_every": max(1, steps // 30), "train.ckpt_every": steps,
            "train.eval_every": max(1, steps // 3), "train.eval_cells": 1024, "train.baseline_cells": 2048,
            "optim.warmup_steps": max(1, steps // 10), "data.num_workers": 2,
            # synthetic genes carry no biotype: keep every gene
            "data.gene_filter": ""}
    if cpu:
        over.update({"run.use_gpu": False, "run.gpus_per_worker": 0.0, "train.precision": "fp32",
                     "train.compile": False, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
                     "model.d_ff": 128, "data.max_len": 512, "data.batch_size": 8, "data.num_workers": 0,
                     "train.eval_cells": 64, "train.baseline_cells": 256})
    return over


def summarize(history: list[dict], steps: int, seconds: float) -> dict:
    """The quickstart's learning signals (loss vs baselines, held-out loss) at the end; throughput
    medians past the first third of the logged rows."""
    from atlasflow.infra.quickstart import learning_signals
    from atlasflow.train.plot import dedupe_history

    hist = dedupe_history(history)
    steady = [h for h in hist if h["step"] > steps / 3] or hist
    sig = learning_signals(history)
    return {"steps": sig.pop("step"), **sig,
            "tokens_per_s_median": statistics.median(h["tokens_per_s"] for h in steady),
            "cells_per_s_median": statistics.median(h["cells_per_s"] for h in steady),
            "throughput_rows": len(steady), "seconds": round(seconds, 1)}


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported()}


def run_check(out: str, steps: int = 300, cells: int = 20000, genes: int = 2000, datasets: int = 8,
              cpu: bool = False) -> dict:
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats
    from atlasflow.train import load_preset, run_training

    out = os.path.abspath(out)
    store = os.path.join(out, "store")
    if not os.path.isdir(store):
        synthesize(store, cells, genes, datasets, seed=0, layout="store")
        compute_gene_stats(store)
    cfg = load_preset("gpu").with_overrides(overrides(store, os.path.join(out, "runs"), steps, cpu))
    t0 = time.time()
    res = run_training(cfg)
    report = {"format_version": GPU_CHECK_FORMAT_VERSION, "preset": "gpu", "cpu_logic_check": cpu, **device_info(),
              "cells": cells, "genes": genes,
              "max_len": cfg.data.max_len, "batch_size": cfg.data.batch_size, "precision": cfg.train.precision,
              "compile": cfg.train.compile, "pack": cfg.data.pack,
              **summarize(res["history"], steps, time.time() - t0), "checkpoint": res["checkpoint"],
              "loss_png": res["loss_png"]}
    with open(os.path.join(out, "gpu_check.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--cpu", action="store_true", help="logic check on CPU (fp32, small model, no compile)")
    a = p.parse_args(argv)
    import logging

    from atlasflow.infra.cli import configure_logging

    configure_logging(logging.INFO)
    print(json.dumps(run_check(a.out, a.steps, a.cells, a.genes, a.datasets, a.cpu), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
