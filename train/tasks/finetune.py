"""``atlasflow finetune``: a cell-type classification head on a pretrained encoder, under Ray Train.

Cells are tokenized with the checkpoint's vocabulary (genes not in it are reported and dropped);
``genes`` restricts tokens further, e.g. to the genes a target dataset shares with the training
set (a gene the target never measures only teaches the head a feature it will not see).
A store or a local Census mirror (or a query of one by obs filter) is streamed: each worker reads
its own partition with ``atlasflow.loader`` (see ``finetune_data``). An .h5ad file, a remote Census
query or a subsampled query is read once on the driver (counts, not tokens) and handed to the
workers through the Ray object store; rank r trains on cells r, r + world, ... (such sets must fit
in memory) and tokenizes each batch when drawn, so depth augmentation thins every epoch afresh.

Defaults are the ones that held up under dataset shift (issue 11): ``mode="full"`` (the encoder is
updated, at ``encoder_lr``, optionally decayed layer by layer towards the embeddings), a LayerNorm
head (per-cell statistics: a BatchNorm head standardizes with training-set statistics, and shifted
cells then collapse onto one class), depth augmentation (binomial thinning of counts) on, and early
stopping on a held-out validation split (by group where there are >= 2 groups, else a stratified
cell split): the best validation step is restored, not the last. The result is a regular training
checkpoint of the (possibly updated) encoder, so ``atlasflow embed`` reads it, plus
``classifier.pt`` (head weights), ``classes.json`` and ``finetune.json`` (config, best step, split).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from atlasflow.store.schema import check_format

from .classifier import (CellClassifier, EarlyStopping, make_head, param_groups, predict,  # noqa: F401
                         validation_loss)  # (make_head, predict: re-exported)
from .finetune_config import MODES, FinetuneConfig  # noqa: F401  (re-exported)
from .finetune_resume import checkpoint_resume, read_resume

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "atlasflow.finetune"
FINETUNE_FORMAT_VERSION = 2  # v2: LayerNorm head (v1 heads were BatchNorm)


# -- the per-worker loop -------------------------------------------------------------------
def _lr_scale(step: int, warmup: int) -> float:
    return min(1.0, step / warmup) if warmup else 1.0


def finetune_worker(cfg: FinetuneConfig, base_checkpoint: str, data, classes: list[str], ctx) -> dict:
    """Train the head (and encoder in full mode) on this rank's share of the cells; early-stop on
    the validation split (every rank scores all of it, so all ranks take the same decision) and
    keep the weights of the best validation step.

    ``data``: a memory set (``finetune_data.memory_set``) or a ``StreamSpec`` (this rank streams
    its partition of a store).
    """
    from ..checkpoint import load_checkpoint

    torch.manual_seed(cfg.seed)
    encoder, tcfg, vocab = load_checkpoint(base_checkpoint)
    model = CellClassifier(encoder, len(classes), cfg.pooling, frozen=cfg.mode == "frozen",
                           head_dropout=cfg.head_dropout).to(ctx.device)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, cfg)],
                            weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    model.train()
    model = ctx.wrap(model, "ddp")
    counts, batches, val, split_how, thinned = _training_data(cfg, data, classes, ctx)
    # Class-balanced loss: fine-tuning sets are often dominated by one or two cell types.
    weight = torch.as_tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(classes), 0.0),
                             dtype=torch.float32, device=ctx.device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    core = _core(model)
    history, n_seen, step = [], 0, 0
    stopper = EarlyStopping(cfg.patience)
    with ctx.restore_dir() as d:
        resume = read_resume(d) if d is not None else None
    if resume is not None:  # a restart: weights, optimizer, early stopping, stream position, RNG
        core.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        stopper.__dict__.update(resume["stopper"])
        batches.load_state_dict(resume["batches"])
        torch.set_rng_state(resume["rng"])
        step, n_seen, history = resume["step"], resume["cells_seen"], resume["history"]
        log.info("finetune: resuming at step %d on %d workers", step, ctx.world_size)
    elif val:
        vl, va = validation_loss(core, val, loss_fn, ctx.device)
        stopper.offer(0, vl, va, core)
        history.append({"step": 0, "val_loss": vl, "val_accuracy": va})
    for step in range(step + 1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * _lr_scale(step, cfg.warmup_steps)
        batch, y = next(batches)
        loss, acc, labelled = _train_step(model, opt, loss_fn, batch, y, ctx.device)
        n_seen += labelled
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = {"step": step, "loss": loss, "batch_accuracy": acc, "cells_seen": n_seen}
            if val:
                m["val_loss"], m["val_accuracy"] = validation_loss(core, val, loss_fn, ctx.device)
                stopper.offer(step, m["val_loss"], m["val_accuracy"], core)
            history.append(m)
            if val and stopper.stop:
                break
            if step < cfg.steps and cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint_resume(ctx, m, {"model": core.state_dict(), "optimizer": opt.state_dict(),
                                            "stopper": dict(stopper.__dict__), "batches": batches.state_dict(),
                                            "rng": torch.get_rng_state(), "step": step, "cells_seen": n_seen,
                                            "history": history})
            elif step < cfg.steps:
                ctx.report(m, None)
    if stopper.state is not None:
        core.load_state_dict(stopper.state)
    summary = {"best_step": stopper.step if val else step, "best_val_loss": stopper.val_loss if val else None,
               "best_val_accuracy": stopper.val_accuracy, "stopped_at": step, "validation": split_how,
               "n_val": int(sum(len(y) for _, y in val)), "thinning": thinned}
    final = {**history[-1], **{k: v for k, v in summary.items() if k != "validation"}}
    if ctx.rank == 0:
        with tempfile.TemporaryDirectory(prefix="atlasflow-ft-") as tmp:
            _save_finetuned(tmp, cfg, core, classes, base_checkpoint, tcfg, vocab, history, summary, int(sum(counts)))
            ctx.report(final, tmp)
    else:
        ctx.report(final, None)
    return {"history": history, **summary}


def _training_data(cfg: FinetuneConfig, data, classes: list[str], ctx) -> tuple:
    """(class counts, this rank's training batches, validation batches, how the split was made, thinning on)."""
    from .finetune_data import (StreamSpec, make_tokenizer, memory_batches, stream_batches, stream_validation,
                                validation_batches)

    thinned = cfg.thin is not None
    if isinstance(data, StreamSpec):
        if list(data.classes) != list(classes):
            raise ValueError(f"finetune: stream classes {list(data.classes)} differ from {classes}")
        counts = np.asarray(data.counts, dtype=np.float64)
        batches = stream_batches(data, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size, cfg.thin)
        split_how = f"loader hash split by {data.val_by}" if data.val_fractions else "none"
        return counts, batches, stream_validation(data), split_how, thinned
    counts = np.bincount(data["y"][data["train_idx"]], minlength=len(classes)).astype(np.float64)
    tok = make_tokenizer(data["tok"], *(cfg.thin or (None,)))
    if tok is None:
        log.warning("finetune: this loader has no depth augmentation (thinning); training without it")
        tok, thinned = make_tokenizer(data["tok"]), False
    batches = memory_batches(data, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size, tok)
    return counts, batches, validation_batches(data, make_tokenizer(data["tok"])), data["split_how"], thinned


def _train_step(model, opt, loss_fn, batch, y, device) -> tuple[float, float, int]:
    """One optimizer step on the labelled cells of a batch: (loss, batch accuracy, labelled cells)."""
    labelled = y >= 0
    logits = model({k: v.to(device) for k, v in batch.items()})
    if labelled.any():
        loss = loss_fn(logits[labelled.to(device)], y[labelled].to(device))
    else:  # every rank must still take part in the step's gradient all-reduce
        loss = logits.sum() * 0.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    acc = float((logits.argmax(1).cpu()[labelled] == y[labelled]).float().mean()) if labelled.any() else 0.0
    return float(loss.item()), acc, int(labelled.sum())


def _save_finetuned(tmp: str, cfg: FinetuneConfig, core, classes, base_checkpoint, tcfg, vocab, history, summary,
                    n_cells: int) -> None:
    """The fine-tuned checkpoint: the encoder as a checkpoint, plus classifier.pt, classes.json, finetune.json."""
    from ..checkpoint import read_part, save_checkpoint

    meta = read_part(base_checkpoint, "model.json")
    save_checkpoint(tmp, model_state={k: v.cpu() for k, v in core.encoder.state_dict().items()},
                    config=tcfg, vocab=vocab.to_dict(), model_meta=meta,
                    train_state={"step": summary["best_step"], "history": history, "format_version": 1})
    torch.save({k: v.cpu() for k, v in core.head.state_dict().items()}, Path(tmp) / "classifier.pt")
    (Path(tmp) / "classes.json").write_text(json.dumps(classes))
    (Path(tmp) / "finetune.json").write_text(json.dumps(
        {"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "config": asdict(cfg),
         "base_checkpoint": str(base_checkpoint), "n_cells": n_cells, **summary}, indent=1))


def _core(model):
    return model.module if hasattr(model, "module") else model


def _ray_loop(config: dict) -> None:
    import ray

    from ..runtime import ray_worker_context

    data = ray.get(config["data_ref"])
    finetune_worker(FinetuneConfig(**config["cfg"]), config["base"], data, config["classes"], ray_worker_context())


def run_finetune_counts(base_checkpoint: str, counts, feature_ids, labels: np.ndarray, cfg: FinetuneConfig,
                        groups: np.ndarray | None = None, genes: set | None = None, model=None,
                        medians_store: str | None = None) -> dict:
    """Fine-tune on in-memory cells: CSR ``counts`` over ``feature_ids`` with their labels (and
    groups, for the validation split); tokens only over ``genes`` when given.

    Returns {checkpoint, classes, n_cells, genes_tokenized, validation, ...}.
    """
    from .pretrained import PretrainedModel
    from .finetune_data import memory_set, tokenizer_spec, validation_split

    labels = np.asarray(labels).astype(str)
    classes = sorted(set(labels.tolist()))
    model = model or PretrainedModel(base_checkpoint, medians_store)
    spec, dropped = tokenizer_spec(model, feature_ids, genes)
    n_tok = int((spec["lut"] >= 0).sum())
    log.info("finetune: tokens over %d of %d input genes (%d outside the vocabulary or the shared genes)",
             n_tok, len(feature_ids), dropped)
    split = validation_split(labels, groups, cfg.val_fraction, cfg.seed)
    data = memory_set(counts, labels, spec, classes, split)
    out = _fit(base_checkpoint, data, classes, cfg, int(len(labels)))
    return {**out, "genes_tokenized": n_tok, "genes_in_input": len(feature_ids), "validation": split["how"],
            "n_train": int(len(split["train"])), "n_val": int(len(split["val"]))}


def _fit(base_checkpoint: str, data, classes: list[str], cfg: FinetuneConfig, n_cells: int) -> dict:
    if len(classes) < 2:
        raise ValueError(f"FinetuneConfig.label: a classifier needs >= 2 classes, found {classes}")
    storage = str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path else cfg.storage_path
    if cfg.in_process:
        return _fit_here(base_checkpoint, data, classes, cfg, n_cells, Path(storage) / cfg.name)
    import ray

    from atlasflow.store.ray_env import init_ray

    from ..runtime import RayRun, fit_on_ray

    init_ray()  # before ray.put
    run = RayRun(name=cfg.name, storage_path=storage, num_workers=cfg.num_workers, min_workers=cfg.min_workers,
                 use_gpu=cfg.use_gpu, max_failures=cfg.max_failures)
    config = {"cfg": asdict(cfg), "base": str(Path(base_checkpoint).resolve()), "classes": classes,
              "data_ref": ray.put(data)}
    result = fit_on_ray(_ray_loop, config, run, what="finetune")
    return {"checkpoint": result.checkpoint.path, "classes": classes, "metrics": dict(result.metrics or {}),
            "n_cells": n_cells}


def _fit_here(base_checkpoint: str, data, classes, cfg: FinetuneConfig, n_cells: int, dest: Path) -> dict:
    """One worker in this process (no Ray): for evaluations that fine-tune many small models."""
    import shutil

    from ..runtime import WorkerContext

    dev = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    out = dest / "checkpoint_final"
    shutil.rmtree(out, ignore_errors=True)
    metrics = {}

    def report(m, d):
        metrics.update(m)
        if d:
            shutil.copytree(d, out)

    ctx = WorkerContext(0, 1, dev, lambda: contextlib.nullcontext(None), report)
    finetune_worker(cfg, str(base_checkpoint), data, classes, ctx)
    return {"checkpoint": str(out), "classes": classes, "metrics": metrics, "n_cells": n_cells}


def run_finetune(base_checkpoint: str, source, cfg: FinetuneConfig, label_map: dict | None = None,
                 medians_store: str | None = None, target=None) -> dict:
    """Fine-tune on the labelled cells of ``source`` (tokenized with the checkpoint's vocabulary).

    A store or a local Census mirror, or a query of one selecting by obs filter, is streamed by
    every worker (``finetune_data``); .h5ad files, remote Census queries and subsampled queries are
    read on the driver first (sets that fit in memory). ``target``: a source the classifier is meant
    for (.h5ad or store); tokens are then restricted to the genes detected in both (in-memory only).
    """
    from .pretrained import PretrainedModel
    from .finetune_data import genes_shared_with, labelled_counts, plan_stream, streamable

    model = PretrainedModel(base_checkpoint, medians_store)
    if streamable(source) and target is None:
        spec = plan_stream(model, source, cfg.label, label_map, cfg.val_by, cfg.val_fraction)
        return {**_fit(base_checkpoint, spec, list(spec.classes), cfg, int(sum(spec.counts))), "streamed": True}
    X, fids, labels, groups = labelled_counts(source, cfg.label, label_map=label_map, group_by=cfg.val_by)
    genes = None
    if target is not None:
        genes = genes_shared_with(fids, X, target)
        log.info("%d genes detected in both the training set and the target", len(genes))
    res = run_finetune_counts(base_checkpoint, X, fids, labels, cfg, groups, genes, model)
    return {**res, "streamed": False, "genes_shared": None if genes is None else len(genes)}


def load_classifier(path: str, map_location="cpu") -> tuple[CellClassifier, list[str], dict]:
    from ..checkpoint import load_checkpoint

    p = Path(path)
    meta_f = p / "finetune.json"
    if not meta_f.is_file():
        raise FileNotFoundError(f"{path}: not a fine-tuned checkpoint (no finetune.json)")
    meta = json.loads(meta_f.read_text())
    if meta.get("format") != FINETUNE_FORMAT:
        raise ValueError(f"{path}: finetune.json format {meta.get('format')!r}, expected {FINETUNE_FORMAT!r}")
    check_format("fine-tuned head", meta.get("format_version"), FINETUNE_FORMAT_VERSION, f"{path}/finetune.json")
    encoder, _, _ = load_checkpoint(p, map_location)
    classes = json.loads((p / "classes.json").read_text())
    cfg = FinetuneConfig.from_dict(meta["config"])
    clf = CellClassifier(encoder, len(classes), cfg.pooling, frozen=True)
    clf.head.load_state_dict(torch.load(p / "classifier.pt", map_location=map_location, weights_only=True))
    return clf.eval(), classes, meta
