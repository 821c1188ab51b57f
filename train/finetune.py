"""``atlasflow finetune``: a cell-type classification head on a pretrained encoder, under Ray Train.

Cells are tokenized with the checkpoint's vocabulary (genes not in it are reported and dropped).
A store or a local Census mirror (or a query of one by obs filter) is streamed: each worker reads
its own partition with ``atlasflow.loader`` (see ``finetune_data``). An .h5ad file, a remote Census
query or a subsampled query is tokenized once on the driver and handed to the workers through the
Ray object store; rank r trains on cells r, r + world, ... (such sets must fit in memory).

``mode="frozen"`` trains the head only (encoder in eval mode, no gradients); ``"full"`` also
updates the encoder with its own, smaller learning rate. The result is a regular training
checkpoint of the (possibly updated) encoder, so ``atlasflow embed`` reads it, plus
``classifier.pt`` (head weights) and ``classes.json``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

FINETUNE_FORMAT = "atlasflow.finetune"
FINETUNE_FORMAT_VERSION = 1
MODES = ("frozen", "full")


@dataclass(frozen=True)
class FinetuneConfig:
    label: str = "cell_type"
    mode: str = "frozen"
    pooling: str = "cls"
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-2  # head
    encoder_lr: float = 1e-4  # full mode only
    weight_decay: float = 0.01
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    storage_path: str = "./atlasflow_runs"
    name: str = "finetune"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"FinetuneConfig.mode: must be one of {MODES}, got {self.mode!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"FinetuneConfig.pooling: must be 'cls' or 'mean', got {self.pooling!r}")
        if not self.label:
            raise ValueError("FinetuneConfig.label: name the obs column holding the labels")
        for name in ("steps", "batch_size", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FinetuneConfig.{name}: must be an int >= 1, got {v!r}")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinetuneConfig.{name}: must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"FinetuneConfig.weight_decay: must be >= 0, got {self.weight_decay}")
        if not self.name or "/" in self.name:
            raise ValueError(f"FinetuneConfig.name: a non-empty name without '/', got {self.name!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"FinetuneConfig.{bad[0]}: unknown setting")
        return cls(**d)


class CellClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int, pooling: str = "cls", frozen: bool = True):
        super().__init__()
        self.encoder, self.pooling, self.frozen = encoder, pooling, frozen
        d = encoder.cfg.d_model
        # Pooled states of a lightly trained encoder share a large common component; standardizing
        # each feature over the batch (running stats at inference) lets a linear head see the rest.
        self.head = nn.Sequential(nn.BatchNorm1d(d), nn.Linear(d, n_classes))
        for name, p in self.encoder.named_parameters():
            # The MLM output head takes no part in classification; under DDP a trainable parameter
            # without a gradient would stall the gradient all-reduce.
            if frozen or name.startswith(("head_bias", "head.")):
                p.requires_grad_(False)

    def forward(self, batch: dict) -> torch.Tensor:
        from .model import N_SPECIAL
        from .pack import model_inputs

        inputs = model_inputs(batch, pack=False)
        if self.frozen:
            self.encoder.eval()
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            h = self.encoder(inputs)
            if self.pooling == "cls":
                z = h[:, 0]
            else:
                g = (inputs["input_ids"] >= N_SPECIAL).unsqueeze(-1).to(h.dtype)
                z = (h * g).sum(1) / g.sum(1).clamp(min=1)
        return self.head(z.float())


# -- data ----------------------------------------------------------------------------------
def block_to_arrays(block) -> dict:
    return {"offsets": block.offsets, "ids": block.ids, "joinids": block.joinids,
            "values": block.values, "bins": block.bins}


def arrays_to_block(d: dict):
    from atlasflow.loader import TokenBlock

    return TokenBlock(d["offsets"], d["ids"], d["joinids"], d.get("values"), d.get("bins"))


def labelled_tokens(model, source, label: str, block_cells: int = 4096, label_map: dict | None = None):
    """(TokenBlock, labels as str array) for every labelled cell of a store / .h5ad / QueryConfig."""
    from atlasflow.loader import TokenBlock

    from .embed import iter_input, tokenize

    blocks, labels = [], []
    tok = seen = None
    for ids, obs, X, fids in iter_input(source, block_cells, obs_columns=(label,)):
        if label not in obs.columns:
            raise ValueError(f"FinetuneConfig.label: input has no obs column {label!r} "
                             f"(columns: {', '.join(map(str, obs.columns))})")
        if fids is not seen:
            tok, dropped = model.tokenizer_for(fids)
            seen = fids
            if dropped:
                missing = [f for f in fids if f not in model.token_of][:5]
                print(f"[atlasflow finetune] {dropped} of {len(fids)} input genes are not in the checkpoint "
                      f"vocabulary and are dropped (e.g. {', '.join(missing)})")
        lab = obs[label].astype(str).to_numpy(dtype=object)
        if label_map is not None:
            lab = np.array([label_map.get(v) for v in lab], dtype=object)
        keep = np.array([v is not None for v in lab], dtype=bool)
        if keep.any():
            blk = tokenize(tok, X[keep], ids[keep])
            blocks.append(blk)
            labels.append(lab[keep].astype(str))
    if not blocks:
        raise ValueError(f"finetune: the input has no labelled cells in column {label!r}")
    return TokenBlock.concat(blocks), np.concatenate(labels)


# -- the per-worker loop -------------------------------------------------------------------
def finetune_worker(cfg: FinetuneConfig, base_checkpoint: str, data, classes: list[str], ctx) -> dict:
    """Train the head (and encoder in full mode) on this rank's share of the cells.

    ``data``: a tokenized set (dict of arrays, see ``run_finetune_tokens``) or a ``StreamSpec``
    (this rank streams its partition of a store).
    """
    from .checkpoint import load_checkpoint, read_part, save_checkpoint
    from .finetune_data import StreamSpec, memory_batches, stream_batches

    torch.manual_seed(cfg.seed)
    encoder, tcfg, vocab = load_checkpoint(base_checkpoint)
    model = CellClassifier(encoder, len(classes), cfg.pooling, frozen=cfg.mode == "frozen").to(ctx.device)
    if cfg.mode == "full":
        encoder.train()
    model = ctx.wrap(model, "ddp")
    groups = [{"params": [p for p in _core(model).head.parameters()], "lr": cfg.lr}]
    if cfg.mode == "full":
        groups.append({"params": [p for p in _core(model).encoder.parameters() if p.requires_grad],
                       "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if isinstance(data, StreamSpec):
        if list(data.classes) != list(classes):
            raise ValueError(f"finetune: stream classes {list(data.classes)} differ from {classes}")
        counts = np.asarray(data.counts, dtype=np.float64)
        batches = stream_batches(data, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
    else:
        counts = np.bincount(data["y"], minlength=len(classes)).astype(np.float64)
        batches = memory_batches(data, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
    # Class-balanced loss: fine-tuning sets are often dominated by one or two cell types.
    weight = torch.as_tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(classes), 0.0),
                             dtype=torch.float32, device=ctx.device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    history, n_seen = [], 0
    for step in range(1, cfg.steps + 1):
        batch, y = next(batches)
        labelled = y >= 0
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        logits = model(batch)
        if labelled.any():
            loss = loss_fn(logits[labelled.to(ctx.device)], y[labelled].to(ctx.device))
        else:  # every rank must still take part in the step's gradient all-reduce
            loss = logits.sum() * 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_seen += int(labelled.sum())
        acc = float((logits.argmax(1).cpu()[labelled] == y[labelled]).float().mean()) if labelled.any() else 0.0
        if step % 20 == 0 or step == cfg.steps:
            m = {"step": step, "loss": float(loss.item()), "batch_accuracy": acc, "cells_seen": n_seen}
            history.append(m)
            if step < cfg.steps:
                ctx.report(m, None)
    n_cells = int(sum(counts))
    core = _core(model)
    if ctx.rank == 0:
        with tempfile.TemporaryDirectory(prefix="atlasflow-ft-") as tmp:
            meta = read_part(base_checkpoint, "model.json")
            save_checkpoint(tmp, model_state={k: v.cpu() for k, v in core.encoder.state_dict().items()},
                            config=tcfg, vocab=vocab.to_dict(), model_meta=meta,
                            train_state={"step": cfg.steps, "history": history, "format_version": 1})
            torch.save({k: v.cpu() for k, v in core.head.state_dict().items()}, Path(tmp) / "classifier.pt")
            (Path(tmp) / "classes.json").write_text(json.dumps(classes))
            (Path(tmp) / "finetune.json").write_text(json.dumps(
                {"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "config": asdict(cfg),
                 "base_checkpoint": str(base_checkpoint), "n_cells": n_cells}, indent=1))
            ctx.report(history[-1], tmp)
    else:
        ctx.report(history[-1], None)
    return {"history": history}


def _core(model):
    return model.module if hasattr(model, "module") else model


def _ray_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from .loop import WorkerContext

    rc = ray.train.get_context()

    def report(metrics, ckpt_dir):
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    def wrap(m, strategy):
        return ray.train.torch.prepare_model(m) if rc.get_world_size() > 1 else m.to(ray.train.torch.get_device())

    ctx = WorkerContext(rc.get_world_rank(), rc.get_world_size(), ray.train.torch.get_device(),
                        lambda: contextlib.nullcontext(None), report, wrap)
    data = ray.get(config["data_ref"])
    finetune_worker(FinetuneConfig(**config["cfg"]), config["base"], data, config["classes"], ctx)


def run_finetune_tokens(base_checkpoint: str, block, labels: np.ndarray, cfg: FinetuneConfig) -> dict:
    """Fine-tune on already tokenized cells under Ray Train; returns {checkpoint, classes, history}."""
    classes = sorted(set(labels.tolist()))
    code = {c: i for i, c in enumerate(classes)}
    data = {**block_to_arrays(block), "y": np.array([code[v] for v in labels], dtype=np.int64)}
    return _fit(base_checkpoint, data, classes, cfg, int(len(block)))


def _fit(base_checkpoint: str, data, classes: list[str], cfg: FinetuneConfig, n_cells: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from atlasflow.infra.ray_env import init_ray

    if len(classes) < 2:
        raise ValueError(f"FinetuneConfig.label: a classifier needs >= 2 classes, found {classes}")
    init_ray(None)
    storage = str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path else cfg.storage_path
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"cfg": asdict(cfg), "base": str(Path(base_checkpoint).resolve()),
                           "classes": classes, "data_ref": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=cfg.name, storage_path=storage))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune {cfg.name}: finished without a checkpoint (error: {result.error})")
    return {"checkpoint": result.checkpoint.path, "classes": classes, "metrics": dict(result.metrics or {}),
            "n_cells": n_cells}


def run_finetune(base_checkpoint: str, source, cfg: FinetuneConfig, label_map: dict | None = None,
                 medians_store: str | None = None) -> dict:
    """Fine-tune on the labelled cells of ``source`` (tokenized with the checkpoint's vocabulary).

    A store or a local Census mirror, or a query of one selecting by obs filter, is streamed by
    every worker (``finetune_data``); .h5ad files, remote Census queries and subsampled queries are
    tokenized on the driver first (sets that fit in memory).
    """
    from .embed import PretrainedModel
    from .finetune_data import plan_stream, streamable

    model = PretrainedModel(base_checkpoint, medians_store)
    if streamable(source):
        spec = plan_stream(model, source, cfg.label, label_map)
        return {**_fit(base_checkpoint, spec, list(spec.classes), cfg, int(sum(spec.counts))), "streamed": True}
    block, labels = labelled_tokens(model, source, cfg.label, label_map=label_map)
    return {**run_finetune_tokens(base_checkpoint, block, labels, cfg), "streamed": False}


def load_classifier(path: str, map_location="cpu") -> tuple[CellClassifier, list[str], dict]:
    from .checkpoint import load_checkpoint

    p = Path(path)
    meta_f = p / "finetune.json"
    if not meta_f.is_file():
        raise FileNotFoundError(f"{path}: not a fine-tuned checkpoint (no finetune.json)")
    meta = json.loads(meta_f.read_text())
    if meta.get("format") != FINETUNE_FORMAT or meta.get("format_version") != FINETUNE_FORMAT_VERSION:
        raise ValueError(f"{path}: finetune.json format {meta.get('format')!r} v{meta.get('format_version')!r} "
                         f"unsupported (this atlasflow reads {FINETUNE_FORMAT} v{FINETUNE_FORMAT_VERSION})")
    encoder, _, _ = load_checkpoint(p, map_location)
    classes = json.loads((p / "classes.json").read_text())
    cfg = FinetuneConfig(**meta["config"])
    clf = CellClassifier(encoder, len(classes), cfg.pooling, frozen=True)
    clf.head.load_state_dict(torch.load(p / "classifier.pt", map_location=map_location, weights_only=True))
    return clf.eval(), classes, meta


@torch.no_grad()
def predict(clf: CellClassifier, classes: list[str], block, batch_size: int = 128) -> np.ndarray:
    from atlasflow.loader.batching import collate

    clf.eval()
    dev = next(clf.parameters()).device
    out = []
    for a in range(0, len(block), batch_size):
        batch = {k: v.to(dev) for k, v in collate(block, np.arange(a, min(len(block), a + batch_size))).items()}
        out.append(clf(batch).argmax(1).cpu().numpy())
    return np.asarray(classes, dtype=object)[np.concatenate(out)] if out else np.zeros(0, dtype=object)
