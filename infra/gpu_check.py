"""The prepared GPU check: the ``gpu`` preset, briefly, on a synthetic store; prints one JSON object.

    python -m atlasflow.infra.gpu_check --out /tmp/gpu_check [--steps 300] [--cells 20000] [--budget-s 480]
    python -m atlasflow.infra.gpu_check --out /tmp/gpu_check --cpu   # the same logic on CPU (tests)

It synthesizes a store (learnable programs, several datasets) and computes its gene stats, then runs its
stages, cheapest and most telling first: the max difference of the varlen path's outputs from the padded
SDPA reference on the same batch (same weights, same autocast); the ``gpu`` preset (bf16 autocast,
packed rows, varlen attention, torch.compile, thinning, max_len 2048) on ONE worker for ``--steps``
steps with a short warmup, the held-out (val-split) loss every ``steps/3`` steps; the loader bench with
1, 2, 4 and 8 DataLoader workers on the machine's cores, and in-process with 2, 4 and 8 read threads;
then the comparison variants for ``--variant-steps`` steps each: without ``torch.compile``, the padded
SDPA path (unpacked, length-bucketed batches), and FSDP on one rank. Per run the JSON has median tokens/s and cells/s over
the logged rows after the first third (compilation, warmup), MFU (``model.flops_per_token`` at the
run's mean cell length over the device's dense bf16 peak), the loader-wait share of step time and the
peak GPU memory; for the main run also the MLM loss next to its unigram baselines and the held-out loss.
The JSON is rewritten after every stage; ``--budget-s`` skips the stages that would start later.
``--cpu`` swaps only what a CPU cannot run (fp32, no compile, no GPU, a 2 x 64 model, max_len 512,
loader workers 0 and 1) so the script's logic is tested without a GPU; its numbers say nothing about
a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

GPU_CHECK_FORMAT_VERSION = 3  # gpu_check.json; 2: variants, MFU, GPU memory, varlen diff, loader workers;
# 3: written after every stage, with per-stage errors, skipped stages (--budget-s) and `complete`;
# in-process loader runs per read-thread count (`loader_threads`)

# dense bf16 peak FLOP/s by device name (vendor datasheets; no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}
log = logging.getLogger(__name__)

VARIANTS = {  # name -> settings changed from the main run
    "no_compile": {"train.compile": False},
    "sdpa_padded": {"data.pack": False, "model.attention": "sdpa", "data.bucket_batches": 8},
    "fsdp_1rank": {"train.strategy": "fsdp"},
}

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
    """The quickstart's learning signals (loss vs baselines, held-out loss) at the end; throughput,
    loader wait and GPU memory past the first third of the logged rows."""
    from atlasflow.infra.quickstart import learning_signals
    from atlasflow.train.plot import dedupe_history

    hist = dedupe_history(history)
    steady = [h for h in hist if h["step"] > steps / 3] or hist
    sig = learning_signals(history)
    mem = [h["gpu_mem_peak_gb"] for h in hist if h.get("gpu_mem_peak_gb") is not None]
    return {"steps": sig.pop("step"), **sig,
            "tokens_per_s_median": statistics.median(h["tokens_per_s"] for h in steady),
            "cells_per_s_median": statistics.median(h["cells_per_s"] for h in steady),
            "loader_wait_share_median": statistics.median(h["loader_wait_share"] for h in steady),
            "gpu_mem_peak_gb": max(mem) if mem else None,
            "throughput_rows": len(steady), "seconds": round(seconds, 1)}


def mfu(summary: dict, cfg, n_tokens: int, device: str) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak."""
    from atlasflow.train.model import flops_per_token

    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    if peak is None or not summary["cells_per_s_median"]:
        return None
    context = summary["tokens_per_s_median"] / summary["cells_per_s_median"]  # mean tokens per cell
    return summary["tokens_per_s_median"] * flops_per_token(cfg.model, context, n_tokens) / peak


def varlen_max_diff(cfg) -> dict:
    """The varlen path's hidden states vs the padded SDPA reference for one loader batch (same weights,
    same precision): max |difference| over every real token, and which kernel ran."""
    import dataclasses

    import torch

    from atlasflow.train import signals as S
    from atlasflow.loader.encodings import get_encoding
    from atlasflow.train.loop import loader_config
    from atlasflow.train.model import CellEncoder, varlen_kernel
    from atlasflow.train.pack import model_inputs

    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.run.use_gpu else "cpu")
    vocab = S.training_vocab(cfg, None)
    medians, _ = S.vocab_stats(cfg, vocab, need=get_encoding(cfg.data.tokenizer).needs_medians)
    lcfg = dataclasses.replace(loader_config(cfg, 0, 1), num_workers=0, thin_range=None)
    batch = next(iter(S.make_loader_for(cfg, lcfg, vocab, medians)))
    n_tokens = 4 + len(vocab.gene_joinids)
    torch.manual_seed(0)
    encs = [CellEncoder(dataclasses.replace(cfg.model, attention=a), cfg.data.tokenizer, n_tokens,
                        cfg.data.max_len, cfg.data.n_bins).to(dev).eval() for a in ("varlen", "sdpa")]
    encs[1].load_state_dict(encs[0].state_dict())
    amp = cfg.train.precision == "bf16" and dev.type == "cuda"
    to = lambda d: {k: v.to(dev) if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
    packed, padded = to(model_inputs(batch, pack=True)), to(model_inputs(batch, pack=False))
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        hv, hr = encs[0](packed).float(), encs[1](padded).float()
        kernel = varlen_kernel(hv.to(torch.bfloat16) if amp else hv)
    lens = batch["lengths"].tolist()
    diff = max(float((hv[r, c:c + n] - hr[b, :n]).abs().max())
               for b, ((r, c), n) in enumerate(zip(packed["cell_pos"].tolist(), lens)))
    name = "none (per-cell SDPA)" if kernel is None else f"{kernel.__module__}.{getattr(kernel, '__name__', 'kernel')}"
    return {"max_abs_diff": diff, "ref_max_abs": float(hr.abs().max()), "kernel": name, "cells": len(lens),
            "device": dev.type, "autocast_bf16": amp}


def loader_runs(store: str, cfg, settings: tuple[tuple[int, int | None], ...], cells: int) -> list[dict]:
    """The loader bench (tokenized, shuffled cells/s, first batch, peak RSS) per (DataLoader workers,
    read threads per process; None = the loader's default)."""
    from atlasflow.infra.bench.loader import measure_atlasflow

    keys = ("workers", "cells", "cells_per_s", "steady_cells_per_s", "first_batch_s", "entropy_ratio")
    runs = (measure_atlasflow(store, cfg.data.tokenizer, w, cells, cfg.data.batch_size, max_len=cfg.data.max_len,
                              read_threads=t) for w, t in settings)
    # read_threads as the loader's own config has it (None: its default)
    return [{k: r[k] for k in keys if k in r} | {"read_threads": r["config"].get("read_threads"),
                                                 "peak_rss_gb": r.get("peak_rss_gb")} for r in runs]


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported()}


def run_check(out: str, steps: int = 300, cells: int = 20000, genes: int = 2000, datasets: int = 8,
              cpu: bool = False, variants: tuple[str, ...] = tuple(VARIANTS), variant_steps: int = 100,
              loader_cells: int = 20000, budget_s: float | None = None) -> dict:
    """``budget_s``: a stage that would start later than this many seconds after the start is skipped
    (recorded in ``skipped``), so a time-limited lease ends with a complete JSON of what did run."""
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats
    from atlasflow.train import load_preset, read_part, run_training

    t_start = time.time()
    out = os.path.abspath(out)
    store = os.path.join(out, "store")
    if not os.path.isdir(store):
        synthesize(store, cells, genes, datasets, seed=0, layout="store")
        compute_gene_stats(store)
    base = load_preset("gpu").with_overrides(overrides(store, os.path.join(out, "runs"), steps, cpu))
    dev = device_info()
    report = {"format_version": GPU_CHECK_FORMAT_VERSION, "preset": "gpu", "cpu_logic_check": cpu, **dev,
              "cells": cells, "genes": genes, "max_len": base.data.max_len, "batch_size": base.data.batch_size,
              "precision": base.train.precision, "cpu_count": os.cpu_count(), "runs": {}, "errors": {},
              "skipped": [], "budget_s": budget_s, "complete": False}

    def stage(name: str, fn) -> None:
        # A device lease is short: each stage's result (or its error) is on disk as soon as it ends,
        # so a failed or cut-off stage still leaves every number measured before it.
        t0 = time.time()
        if budget_s is not None and t0 - t_start > budget_s:
            log.warning("gpu_check stage %s skipped: %.0f s of the %.0f s budget spent", name, t0 - t_start, budget_s)
            report["skipped"].append(name)
            write(out, report)
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded, reported and turned into a failing exit code
            log.exception("gpu_check stage %s failed", name)
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
        log.info("gpu_check stage %s: %.1f s", name, time.time() - t0)
        write(out, report)

    def train_run(name: str) -> None:
        n = steps if name == "main" else variant_steps
        cfg = base if name == "main" else base.with_overrides(
            {**overrides(store, os.path.join(out, "runs"), n, cpu), **VARIANTS[name], "run.name": f"gpu_check_{name}"})
        t0 = time.time()
        res = run_training(cfg, plot=name == "main")
        summary = summarize(res["history"], n, time.time() - t0)
        summary["mfu"] = mfu(summary, cfg, read_part(res["checkpoint"], "model.json")["n_tokens"], dev["device"])
        report["runs"][name] = {"compile": cfg.train.compile, "pack": cfg.data.pack, "attention": cfg.model.attention,
                                "strategy": cfg.train.strategy, **summary, "checkpoint": res["checkpoint"],
                                "loss_png": res["loss_png"]}

    def varlen() -> None:
        report["varlen_vs_reference"] = varlen_max_diff(base)

    def loader() -> None:  # DataLoader workers (one read thread each)
        report["loader_workers"] = loader_runs(store, base, tuple((w, None) for w in ((0, 1) if cpu else (1, 2, 4, 8))),
                                               loader_cells)

    def threads() -> None:  # in-process, more read threads (each reads and tokenizes)
        report["loader_threads"] = loader_runs(store, base, tuple((0, t) for t in ((1, 2) if cpu else (2, 4, 8))),
                                               loader_cells)

    # Cheapest and most telling first: the kernel check (seconds), the main run, the loader's worker
    # scaling, then the comparison variants, so a short budget drops the least informative stages.
    stage("varlen_vs_reference", varlen)
    stage("main", lambda: train_run("main"))
    stage("loader_workers", loader)
    stage("loader_threads", threads)
    for name in variants:
        stage(name, lambda name=name: train_run(name))
    report["complete"] = not report["errors"] and not report["skipped"]
    write(out, report)
    return report


def write(out: str, report: dict) -> None:
    tmp = os.path.join(out, "gpu_check.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, os.path.join(out, "gpu_check.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--cpu", action="store_true", help="logic check on CPU (fp32, small model, no compile)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comparison runs (of {', '.join(VARIANTS)}; '' = none)")
    p.add_argument("--variant-steps", type=int, default=100)
    p.add_argument("--loader-cells", type=int, default=20000, help="cells per loader-bench run")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the stages that would start after this many seconds (a time-limited machine)")
    a = p.parse_args(argv)
    from atlasflow.infra.bench.util import emit
    from atlasflow.infra.cli import configure_logging

    configure_logging(logging.INFO)
    variants = tuple(v for v in a.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    report = run_check(a.out, a.steps, a.cells, a.genes, a.datasets, a.cpu, variants, a.variant_steps, a.loader_cells,
                       a.budget_s)
    emit(report)
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
