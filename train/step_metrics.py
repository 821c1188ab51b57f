"""What a rank measures between two reports (summed over ranks when reported), and the optional
trace of every micro-batch's soma_joinids (run.trace_dir, for exactness tests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config


def _allreduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()



class Window:
    """Metrics accumulated between two reports (summed over ranks when reported)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = self.n_loss = self.cells = self.tokens = self.slots = self.wait = self.busy = 0.0
        self.masked = self.correct = self.uni = self.cond = 0.0
        self.cell = self.cell_uni = self.n_cell = 0.0
        self.con = self.con_chance = self.n_con = 0.0
        self.t_start = time.perf_counter()

    def add(self, loss, stats, batch, inputs, wait, base: tuple[float, float], cell_base: float | None = None):
        """``loss``: the MLM (or NTP) term alone, the one ``base`` is the baseline of; the cell term and
        its baseline come from ``stats["cell_loss"]`` and ``cell_base``."""
        self.loss += loss
        if "cell_loss" in stats:
            self.cell += stats["cell_loss"]
            self.cell_uni += cell_base if cell_base is not None else float("nan")
            self.n_cell += 1
        if "contrast_loss" in stats:
            self.con += stats["contrast_loss"]
            self.con_chance += stats["contrast_chance"]
            self.n_con += 1
        self.uni += base[0]  # per-batch means like the loss, so all three weigh batches alike
        self.cond += base[1]
        self.n_loss += 1
        self.cells += batch["soma_joinid"].shape[0]
        self.tokens += inputs["n_tokens"]
        self.slots += inputs["segment_ids"].numel()
        self.wait += wait
        self.masked += stats["n_masked"]
        self.correct += stats["n_correct"]

    def time(self, dt):
        self.busy += dt

    def metrics(self, st, optimizer, ctx) -> dict:
        wall = max(time.perf_counter() - self.t_start, 1e-9)
        (loss, n, cells, tokens, slots, wait, busy, masked, correct, wall_sum, seen, tok_seen, uni, cond, cell,
         cell_uni, n_cell, con, con_chance, n_con) = _allreduce(
            [self.loss, self.n_loss, self.cells, self.tokens, self.slots, self.wait, self.busy, self.masked,
             self.correct, wall, st["cells_seen"], st["tokens_seen"], self.uni, self.cond, self.cell,
             self.cell_uni, self.n_cell, self.con, self.con_chance, self.n_con], ctx.device)
        walls = wall_sum / ctx.world_size
        m = {"step": st["step"], "epoch": st["epoch"], "loss": loss / max(n, 1),
             "unigram_loss": uni / max(n, 1), "position_unigram_loss": cond / max(n, 1),
             "lr": optimizer.param_groups[0]["lr"], "cells_per_s": cells / walls, "tokens_per_s": tokens / walls,
             "pad_fraction": 1 - tokens / max(slots, 1), "loader_wait_share": wait / max(busy, 1e-9),
             "masked_accuracy": correct / max(masked, 1), "cells_seen": int(seen),
             "tokens_seen": int(tok_seen)}
        if n_cell:
            m["cell_loss"], m["cell_unigram_loss"] = cell / n_cell, cell_uni / n_cell
        if n_con:  # the contrastive term next to its chance level log(2B - 1)
            m["contrast_loss"], m["contrast_chance"] = con / n_con, con_chance / n_con
        if ctx.device.type == "cuda":  # this rank's peak since the run started (rank 0's is logged)
            m["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        self.reset()
        return m


class Tracer:
    """Appends the soma_joinids of every micro-batch to trace_dir/rank{r}.jsonl (run.trace_dir)."""

    def __init__(self, cfg: Config, rank: int, resumed_from: int, world_size: int = 1,
                 share=lambda attempt: attempt):
        self.path = Path(cfg.run.trace_dir) / f"rank{rank}.jsonl" if cfg.run.trace_dir else None
        # one id per (re)start of the whole worker group, rank 0's: "<start time ns>-<pid>"
        self.attempt = share(f"{time.time_ns()}-{os.getpid()}") if self.path else ""
        self.resumed_from, self.world_size = resumed_from, world_size
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, st, batch) -> None:
        if self.path is None:
            return
        rec = {"attempt": self.attempt, "resumed_from": self.resumed_from, "world_size": self.world_size,
               "epoch": st["epoch"],
               "micro": st["micro_in_epoch"], "step": st["step"], "joinids": batch["soma_joinid"].tolist()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
