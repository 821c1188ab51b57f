"""Training throughput benchmark (prints JSON): packed rows vs padding every cell to max_len.

Same model (same initial weights), same cells, same masks; only the batch layout differs:
  * pad_to_max_len: every cell padded to data.max_len (the naive layout);
  * bucketed: the loader's layout: cells length-sorted across data.bucket_batches batches, each
    padded to its longest cell;
  * packed: the same cells in unbucketed batches (packing needs no length sorting, so the batches
    mix better), packed first-fit into rows just above each batch's longest cell; block-diagonal
    attention in one SDPA call per layer on CPU (on CUDA the varlen flash kernel, no pad computed).
Then a live run (loader iterated inside the step loop) measures the share of step time spent
waiting for the loader, for each loader worker count asked for.

    python -m atlasflow.infra.bench.train --store STORE [--max-len 2048] [--steps 6] [--out bench.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from atlasflow.infra.bench.util import emit
from atlasflow.train.config import load_preset
from atlasflow.train.masking import mask_batch, masking_generator
from atlasflow.train.model import N_SPECIAL, CellEncoder
from atlasflow.train.objective import MLMObjective
from atlasflow.train.pack import model_inputs


def _train_interleaved(cfg, n_tokens, layouts: dict, repeats: int = 1) -> dict:
    """Train one model per layout (same initial weights) on the same batches, interleaving the
    layouts step by step so that a noisy machine slows them alike; throughput from median step time."""
    models = {}
    for name in layouts:
        torch.manual_seed(0)
        obj = MLMObjective(CellEncoder(cfg.model, cfg.data.tokenizer, n_tokens, cfg.data.max_len, cfg.data.n_bins))
        models[name] = (obj, torch.optim.AdamW(obj.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in layouts}
    n = len(next(iter(layouts.values())))
    for rep in range(repeats + 1):
        for i in range(n):
            for name, inputs_list in layouts.items():
                obj, opt = models[name]
                t0 = time.perf_counter()
                loss, _ = obj(inputs_list[i])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if rep > 0:  # the first pass warms up allocator and kernels
                    times[name].append(time.perf_counter() - t0)
    out = {}
    for name, inputs_list in layouts.items():
        tokens = sum(x["n_tokens"] for x in inputs_list)
        slots = sum(x["segment_ids"].numel() for x in inputs_list)
        cells = sum(x["cell_pos"].shape[0] for x in inputs_list)
        med = statistics.median(times[name])
        out[name] = {"median_step_s": med, "tokens_per_s": tokens / n / med, "cells_per_s": cells / n / med,
                     "tokens_per_s_mean": tokens * repeats / sum(times[name]), "pad_fraction": 1 - tokens / slots,
                     "rows_per_batch": sum(x["segment_ids"].shape[0] for x in inputs_list) / n, "batches": n}
    return out


def _live(cfg, store: str, steps: int, num_workers: int) -> dict:
    """Loader iterated inside the loop: time blocked in next(loader) over total step time."""
    from atlasflow.loader import make_loader

    from atlasflow.train.loop import loader_config

    lc = loader_config(cfg.with_overrides({"data.num_workers": num_workers}), 0, 1)
    loader = make_loader(store, lc)
    n_tokens = N_SPECIAL + len(loader.dataset.vocab.gene_joinids)
    torch.manual_seed(0)
    obj = MLMObjective(CellEncoder(cfg.model, cfg.data.tokenizer, n_tokens, cfg.data.max_len, cfg.data.n_bins))
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-4)
    loader.dataset.set_epoch(0)
    it = iter(loader)
    wait = busy = 0.0
    first = None
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        m = mask_batch(batch, cfg.data.tokenizer, cfg.masking, masking_generator(0, 0, step, 0), n_tokens,
                       cfg.data.n_bins)
        loss, _ = obj(model_inputs(m, pack=cfg.data.pack))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step == 0:  # the first batch includes worker start-up and planning
            first = t1 - t0
            continue
        wait += t1 - t0
        busy += t2 - t0
    return {"num_workers": num_workers, "pack": cfg.data.pack, "loader_wait_share": wait / busy, "first_batch_s": first,
            "steps": steps, "step_s": busy / steps}


def _sample(cfg, store: str, n: int) -> tuple[list[dict], int]:
    """The first n batches of epoch 0 and the model's token count."""
    from atlasflow.loader import make_loader

    from atlasflow.train.loop import loader_config

    loader = make_loader(store, loader_config(cfg, 0, 1))
    loader.dataset.set_epoch(0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out, N_SPECIAL + len(loader.dataset.vocab.gene_joinids)


def run(store: str, max_len: int = 2048, batch_size: int = 32, steps: int = 6, live_workers=(0, 1),
        preset: str = "debug", repeats: int = 1, bucket_batches: int | None = None, pad_batches: int = 64) -> dict:
    over = {"data.max_len": max_len, "data.batch_size": batch_size, "data.store": store}
    if bucket_batches is not None:
        over["data.bucket_batches"] = bucket_batches
    cfg = load_preset(preset).with_overrides(over)
    n_sample = max(pad_batches, steps + 1)
    sample, n_tokens = _sample(cfg, store, n_sample)
    flat, _ = _sample(cfg.with_overrides({"data.bucket_batches": 0}), store, n_sample)
    if len(sample) < 2:
        raise ValueError(f"store: {store} yields {len(sample)} batches of {batch_size}; need at least 2")
    same_cells = sorted(torch.cat([b["soma_joinid"] for b in sample]).tolist()) == sorted(
        torch.cat([b["soma_joinid"] for b in flat]).tolist())
    kinds = {"pad_to_max_len": (sample, {"pack": False, "pad_to": max_len}), "bucketed": (sample, {"pack": False}),
             "packed": (flat, {"pack": True})}
    pad = {}
    for name, (src, kw) in kinds.items():
        ins = [model_inputs(b, **kw) for b in src]
        pad[name] = 1 - sum(x["n_tokens"] for x in ins) / sum(x["segment_ids"].numel() for x in ins)
    stride = max(1, len(sample) // (steps + 1))

    def timed(src, kw):
        return [model_inputs(mask_batch(b, cfg.data.tokenizer, cfg.masking, masking_generator(0, 0, i, 0), n_tokens,
                                        cfg.data.n_bins), **kw) for i, b in enumerate(src[::stride][:steps + 1])]

    layouts = {name: timed(src, kw) for name, (src, kw) in kinds.items()}
    res = _train_interleaved(cfg, n_tokens, layouts, repeats)
    for name in res:
        res[name]["pad_fraction_timed_batches"] = res[name].pop("pad_fraction")
        res[name]["pad_fraction"] = pad[name]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in sample]).float()
    out = {
        "bench": "atlasflow.infra.bench.train", "format_version": 1, "store": store, "preset": preset,
        "model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads},
        "max_len": max_len, "batch_size": batch_size, "tokenizer": cfg.data.tokenizer,
        "bucket_batches": cfg.data.bucket_batches, "pad_fraction_batches": len(sample),
        "packed_batches_same_cells": same_cells, "timed_batches": len(layouts["bucketed"]) - 1,
        "cell_tokens": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        "layouts": res,
        "speedup_packed_vs_pad_to_max_len": res["packed"]["tokens_per_s"] / res["pad_to_max_len"]["tokens_per_s"],
        "speedup_bucketed_vs_pad_to_max_len": res["bucketed"]["tokens_per_s"] / res["pad_to_max_len"]["tokens_per_s"],
        "speedup_packed_vs_bucketed": res["packed"]["tokens_per_s"] / res["bucketed"]["tokens_per_s"],
        "live": [_live(cfg, store, steps, w) for w in live_workers],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlasflow.infra.bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--live-workers", default="0,1", help="loader worker counts for the live run")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the batches (after one warm-up)")
    p.add_argument("--bucket-batches", type=int, help="loader length bucketing (default: the preset's)")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    res = run(a.store, a.max_len, a.batch_size, a.steps, tuple(int(w) for w in a.live_workers.split(",") if w),
              repeats=a.repeats, bucket_batches=a.bucket_batches)
    return emit(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
