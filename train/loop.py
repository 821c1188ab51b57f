"""The per-worker training loop.

``train_loop_per_worker`` is what Ray Train runs on every worker; the loop itself (``run_worker``)
only talks to a small ``runtime.WorkerContext`` (rank, world, device, restore directory, report), so it
also runs in a plain process (world size 1) for tests and debugging.

Order of business on every (re)start: restore first (model, optimizer, scheduler, train state, and
this rank's loader position), then stream. Metrics are all-reduced every train.log_every steps;
Ray Train gets a report (metrics + checkpoint) every train.ckpt_every steps and at the end: rank 0
writes the checkpoint (loader states of all ranks are gathered to it), every rank reports at the
same steps (Ray Train's report is a barrier).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from atlasflow.store.schema import check_format

from .checkpoint import build_encoder, read_part, save_checkpoint
from .config import Config
from . import signals as S
from atlasflow.loader.encodings import get_encoding

from .masking import masking_generator
from .model import N_SPECIAL
from .objective import PretrainObjective, original_ids
from .pack import model_inputs
from .runtime import WorkerContext, ray_worker_context
from .signals import Baselines
from .step_metrics import Tracer, Window

FAIL_ENV = "ATLASFLOW_FAIL_AT_STEP"
TRAIN_STATE_VERSION = 2  # 2: world0 / rank_steps (the schedule's clock across resizes)
_log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised once by the fault-injection knob (run.fail_at_step)."""


def loader_config(cfg: Config, rank: int, world_size: int):
    from atlasflow.loader import LoaderConfig

    d = cfg.data
    return LoaderConfig(tokenizer=d.tokenizer, max_len=d.max_len, batch_size=d.batch_size, shuffle=d.shuffle,
                        seed=d.seed, num_workers=d.num_workers, obs_filter=d.obs_filter or None,
                        split=d.split or None, split_by=d.split_by, rank=rank, world_size=world_size,
                        n_bins=d.n_bins, gene_filter=d.gene_filter or None, bucket_batches=d.bucket_batches,
                        timestamp_ms=d.timestamp_ms or None, thin_range=tuple(d.thin_range) or None,
                        thin_prob=d.thin_prob, bin_width=d.bin_width, meta_columns=tuple(d.meta_columns))


def lr_factor(cfg: Config, step: float) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at train.max_steps. ``step`` is the run's
    progress in steps of its first world size (see ``_Trainer.progress``): a float after a resize."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _state_dicts(model, optimizer):
    # Full (unsharded) CPU state dicts for DDP and FSDP alike; collective under FSDP.
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return {k.removeprefix("encoder."): v for k, v in msd.items()}, osd


def _load_state_dicts(model, optimizer, msd: dict, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, {f"encoder.{k}": v for k, v in msd.items()}, options=opts)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)


def _gather_objects(obj, world_size: int) -> list:
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def run_worker(cfg: Config, ctx: WorkerContext, loader=None) -> dict:
    """Train on this rank until train.max_steps or train.epochs; returns the final train state.

    ``loader`` defaults to ``make_loader(data.store, ...)`` for this rank/world. The phases are the
    methods of ``_Trainer``: build (data, baselines, model, optimizer), restore (from the restore
    directory, while it is open), then fit (steps, reports, checkpoints).
    """
    with ctx.restore_dir() as d:
        trainer = _Trainer.build(cfg, ctx, d, loader)
        if d is not None:
            trainer.restore(d)
    return trainer.fit()


def _pinned_snapshot(cfg: Config, ctx: WorkerContext, d) -> Config:
    """Every rank, and every restart of the run, reads the same store snapshot (the batch order is a
    function of it): the first start pins rank 0's clock, restarts reuse the pin."""
    if d is not None:
        ts = read_part(d, "config.json")["data"]["timestamp_ms"]
    else:
        ts = cfg.data.timestamp_ms or _gather_objects(int(time.time() * 1000), ctx.world_size)[0]
    return cfg if ts == cfg.data.timestamp_ms else cfg.with_overrides({"data.timestamp_ms": ts})


class _Trainer:
    """One rank's training run, one method per phase (as torchtitan's Trainer)."""

    def __init__(self, cfg: Config, ctx: WorkerContext, **parts):
        self.cfg, self.ctx = cfg, ctx
        self.vocab, self.loader, self.n_tokens = parts["vocab"], parts["loader"], parts["n_tokens"]
        self.baselines, self.val_set, self.model_meta = parts["baselines"], parts["val_set"], parts["model_meta"]
        self.model, self.optimizer = parts["model"], parts["optimizer"]
        # world0: the world size of the run's first start; rank_steps: optimizer steps x ranks
        self.st = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "cells_seen": 0, "tokens_seen": 0, "history": [],
                   "world0": ctx.world_size, "rank_steps": 0, "format_version": TRAIN_STATE_VERSION}
        # The schedule's clock is the progress, not the scheduler's own step count (see progress)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: lr_factor(cfg, self.progress))
        self.loader_state = None
        self.amp = cfg.train.precision == "bf16"
        self.window = Window()
        self.val = None

    # -- build -------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, ctx: WorkerContext, d, loader=None) -> "_Trainer":
        """Data (vocabulary, stats, loader), learning-signal baselines, the model and its optimizer."""
        cfg = _pinned_snapshot(cfg, ctx, d)
        saved_vocab = read_part(d, "vocab.json") if d is not None else None
        saved_meta = read_part(d, "model.json").get("meta_vocab") if d is not None else None
        vocab = loader.dataset.vocab if loader is not None else S.training_vocab(cfg, saved_vocab)
        enc = get_encoding(cfg.data.tokenizer)
        medians, gene_nnz = S.vocab_stats(cfg, vocab, need=enc.needs_medians)
        if loader is None:
            loader = S.make_loader_for(cfg, loader_config(cfg, ctx.rank, ctx.world_size), vocab, medians, saved_meta)
        meta = loader.dataset.meta_vocab
        gene_end = N_SPECIAL + len(vocab.gene_joinids)
        n_tokens = gene_end + len(enc.extra_tokens) + (meta.n_tokens if meta else 0)
        if d is not None and "baselines.pt" in read_part(d, "format.json")["parts"]:
            baselines = Baselines.from_state_dict(read_part(d, "baselines.pt"))
        else:  # every rank fits the same seeded sample: no broadcast needed
            baselines = S.fit_baselines(cfg, loader_config(cfg, 0, 1), vocab, medians, gene_nnz, n_tokens, meta)
        val_set = S.val_inputs(cfg, loader_config(cfg, ctx.rank, ctx.world_size), vocab, medians, n_tokens,
                               baselines, ctx.rank, meta)
        model_meta = {"tokenizer": cfg.data.tokenizer, "n_tokens": n_tokens, "max_len": cfg.data.max_len,
                      "n_bins": cfg.data.n_bins, "bin_width": cfg.data.bin_width, "gene_end": gene_end,
                      "extra_tokens": list(enc.extra_tokens), "objective": cfg.objective.kind,
                      "meta_vocab": meta.to_dict() if meta else None, "cell_head": cfg.objective.cell_weight > 0,
                      "contrast_head": cfg.objective.contrast_weight > 0}
        torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank
        encoder = build_encoder(cfg, model_meta)
        if cfg.train.compile:
            for blk in encoder.blocks:  # in place: state-dict keys stay unchanged
                blk.compile(dynamic=True)
        objective = PretrainObjective(encoder, cfg.objective.kind, cfg.objective.value_weight,
                                      cfg.objective.cell_weight, cfg.objective.contrast_weight,
                                      cfg.objective.contrast_temperature)
        model = ctx.wrap(objective.to(ctx.device), cfg.train.strategy)
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay, fused=ctx.device.type == "cuda")
        return cls(cfg, ctx, vocab=vocab, loader=loader, n_tokens=n_tokens, baselines=baselines, val_set=val_set,
                   model_meta=model_meta, model=model, optimizer=optimizer)

    @property
    def progress(self) -> float:
        """Optimizer steps in units of the first start's global batch. A resized restart keeps the
        per-rank batch (the loader's order depends on it), so a step of W ranks moves the schedule
        by W / world0 steps: the LR at a given number of cells trained, and the run's total cells
        (train.max_steps steps of the original global batch), do not depend on resizes."""
        return self.st["rank_steps"] / self.st["world0"]

    def _budget_spent(self) -> bool:
        return self.st["rank_steps"] >= self.cfg.train.max_steps * self.st["world0"]

    # -- restore -----------------------------------------------------------------------------
    def restore(self, d) -> None:
        """Weights, optimizer, scheduler, train state and the loader's position, on any world size."""
        parts = read_part(d, "format.json")["parts"]
        if "loader.pt" not in parts:
            raise ValueError(f"{d}: a checkpoint from before elastic resume (per-rank loader positions); "
                             f"this atlasflow cannot continue its epoch: start a new run (its weights can "
                             f"still be fine-tuned or embedded)")
        _load_state_dicts(self.model, self.optimizer, read_part(d, "model.pt"), read_part(d, "optimizer.pt"))
        self.scheduler.load_state_dict(read_part(d, "scheduler.pt"))
        self.st = read_part(d, "train_state.json")
        check_format("train state", self.st.get("format_version"), TRAIN_STATE_VERSION, f"{d}/train_state.json")
        self.loader_state = read_part(d, "loader.pt")
        if self.st["world0"] != self.ctx.world_size or self.loader_state["world_size"] != self.ctx.world_size:
            _log.info("resuming step %d on %d ranks (checkpoint from %d, run started on %d)", self.st["step"],
                      self.ctx.world_size, self.loader_state["world_size"], self.st["world0"])

    # -- fit ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, st, ds = self.cfg, self.st, self.loader.dataset
        self.trace = Tracer(cfg, self.ctx.rank, st["step"], self.ctx.world_size,
                            share=lambda a: _gather_objects(a, self.ctx.world_size)[0])
        self.val = {"val_loss": None, "val_masked_accuracy": None, "val_step": None,
                    **S.val_baselines(self.val_set, self.ctx)}
        self.model.train()
        while not self._budget_spent() and st["epoch"] < cfg.train.epochs:
            ds.set_epoch(st["epoch"])
            if self.loader_state is not None:  # the epoch's rest, re-cut for this world if it changed
                self.loader.load_state_dict(self.loader_state)
                self.loader_state = None
            left = ds.batches_left  # the same on every rank
            if left and not self._epoch(iter(self.loader), left):
                break  # the step budget ended inside the epoch
            st["epoch"], st["micro_in_epoch"] = st["epoch"] + 1, 0
        return st

    def _epoch(self, it, left: int) -> bool:
        """Micro-batches until the epoch (``left`` more) or the step budget ends; an optimizer step
        every grad_accum. True when the epoch ended."""
        cfg, st = self.cfg, self.st
        n_acc = n_done = 0
        while n_done < left and not self._budget_spent():
            t0 = time.perf_counter()
            batch = next(it)
            wait = time.perf_counter() - t0
            st["micro_in_epoch"] += 1
            n_acc, n_done = n_acc + 1, n_done + 1
            boundary = n_acc == cfg.optim.grad_accum or n_done == left
            self._micro_step(batch, wait, sync=boundary)
            if not boundary:
                self.window.time(time.perf_counter() - t0)
                continue
            n_acc = 0
            self._optimizer_step()
            self.window.time(time.perf_counter() - t0)
            self._maybe_fail(st["step"])
            last = self._budget_spent() or (n_done == left and st["epoch"] + 1 >= cfg.train.epochs)
            due = (cfg.train.log_every, cfg.train.ckpt_every) + ((cfg.train.eval_every,) if self.val_set else ())
            if last or any(st["step"] % k == 0 for k in due):
                self.report(final=last)
        return n_done == left

    def _micro_step(self, batch, wait: float, sync: bool) -> None:
        """Mask, pack, forward and backward one micro-batch (gradients synced only at a boundary)."""
        cfg, st, ctx, model = self.cfg, self.st, self.ctx, self.model
        self.trace.log(st, batch)
        masked = S.prepare_batch(cfg, batch, masking_generator(cfg.data.seed, st["epoch"], st["micro_in_epoch"],
                                                               ctx.rank), self.n_tokens, self.model_meta["gene_end"])
        inputs = model_inputs(masked, pack=cfg.data.pack)
        inputs = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}
        no_sync = not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, stats = model(inputs)
            (loss / cfg.optim.grad_accum).backward()  # outside autocast: backward ops take the forward's dtypes
        cell_base = None
        if "cell_loss" in stats:
            ids = original_ids(inputs, cfg.objective.kind, get_encoding(cfg.data.tokenizer))
            cell_base = S.cell_baseline(self.baselines, ids, inputs["segment_ids"], self.model_meta["gene_end"])
        self.window.add(stats["mlm_loss"], stats, batch, inputs, wait,
                        S.batch_baselines(self.baselines, inputs), cell_base)
        st["cells_seen"] += int(batch["soma_joinid"].shape[0])
        st["tokens_seen"] += inputs["n_tokens"]

    def _optimizer_step(self) -> None:
        clip_at = self.cfg.optim.grad_clip
        if clip_at > 0:  # FSDP(1) must clip over the full, sharded gradient: its own method
            clip = getattr(self.model, "clip_grad_norm_", None)
            clip(clip_at) if clip else torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_at)
        self.optimizer.step()
        self.st["step"] += 1
        self.st["rank_steps"] += self.ctx.world_size
        self.scheduler.step()  # the LR for the next step, at the new progress
        self.optimizer.zero_grad(set_to_none=True)

    def _maybe_fail(self, step: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.run.fail_at_step and step == cfg.run.fail_at_step and ctx.rank == cfg.run.fail_rank:
            marker = Path(cfg.run.trace_dir or os.path.join(cfg.run.storage_path, cfg.run.name))
            marker = marker / f".failure_injected_at_step{step}"
            if not marker.exists():  # once per run: the restarted attempt goes past this step
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(time.time()))
                raise InjectedFailure(f"injected failure at step {step} on rank {ctx.rank} ({FAIL_ENV})")

    # -- report / checkpoint -----------------------------------------------------------------
    def report(self, final: bool) -> None:
        cfg, st, ctx = self.cfg, self.st, self.ctx
        metrics = self.window.metrics(st, self.optimizer, ctx)
        if self.val_set is not None and (final or st["step"] % cfg.train.eval_every == 0):
            self.val.update(S.evaluate(self.model, self.val_set, ctx, self.amp), val_step=st["step"])
        metrics.update(self.val)
        if ctx.rank == 0:
            st["history"].append(metrics)
        if final or st["step"] % cfg.train.ckpt_every == 0:
            self.checkpoint(metrics)
        elif ctx.rank == 0:
            # Not a Ray report: Ray Train V2 keeps one unconsumed report per worker and its controller
            # takes it every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per step blocked each
            # step for up to 2 s (40 of the debug preset's 70 s). Logged metrics go to the history
            # (saved with the next checkpoint) and rank 0's stdout; Ray gets them at checkpoints.
            # not print(): Ray Train patches it into a logger that also echoes it (twice per line)
            sys.stdout.write(f"atlasflow train: {json.dumps(metrics)}\n")
            sys.stdout.flush()

    def checkpoint(self, metrics: dict) -> None:
        """Rank 0 writes the named parts; every rank reports. The loader state is one for all ranks
        (the epoch's phase and the batches each rank delivered: equal, since ranks step together)."""
        msd, osd = _state_dicts(self.model, self.optimizer)
        loader_states = _gather_objects(self.loader.state_dict(), self.ctx.world_size)
        positions = {s["position"] for s in loader_states}
        if len(positions) != 1:
            raise RuntimeError(f"checkpoint: ranks delivered different batch counts {sorted(positions)}; "
                               f"the loader state would not be exact")
        if self.ctx.rank != 0:
            self.ctx.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="atlasflow-ckpt-") as tmp:
            save_checkpoint(tmp, model_state=msd, optimizer_state=osd, scheduler_state=self.scheduler.state_dict(),
                            loader_state=loader_states[0], train_state=self.st, config=self.cfg,
                            vocab=self.vocab.to_dict(), model_meta=self.model_meta,
                            baselines=self.baselines.state_dict())
            self.ctx.report(metrics, tmp)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``runtime.fit_on_ray(train_loop_per_worker, cfg.to_dict(), ...)``)."""
    run_worker(Config.from_dict(config), ray_worker_context())
