"""The classifier a fine-tune trains: a pretrained encoder, a pooling, and a LayerNorm head; its
optimizer groups (head / blocks / embeddings), validation loss, early stopping and batch prediction."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn


def make_head(d: int, n_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """LayerNorm -> dropout -> linear. LayerNorm normalizes each cell by its own statistics, so a
    shifted dataset is not pushed through training-set means and variances."""
    return nn.Sequential(nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, n_classes))


class CellClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int, pooling: str = "mean", frozen: bool = False,
                 head_dropout: float = 0.0):
        super().__init__()
        self.encoder, self.pooling, self.frozen = encoder, pooling, frozen
        self.head = make_head(encoder.cfg.d_model, n_classes, head_dropout)
        for name, p in self.encoder.named_parameters():
            # The MLM output head takes no part in classification; under DDP a trainable parameter
            # without a gradient would stall the gradient all-reduce.
            if frozen or name.startswith(("head_bias", "head.")):
                p.requires_grad_(False)

    def forward(self, batch: dict) -> torch.Tensor:
        from ..pack import model_inputs

        inputs = model_inputs(batch, pack=False)
        if self.frozen:
            self.encoder.eval()
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            z = self.encoder.pool(self.encoder(inputs), inputs, self.pooling)
        return self.head(z.float())


def param_groups(clf: CellClassifier, cfg) -> list[dict]:
    """``cfg``: a FinetuneConfig. Head at ``lr``; in full mode, block i at encoder_lr * layer_decay ** (n_layers - 1 - i), the
    final LayerNorm at encoder_lr, the input embeddings one decay step below the lowest block."""
    groups = [{"params": list(clf.head.parameters()), "lr": cfg.lr, "name": "head"}]
    if cfg.mode == "frozen":
        return groups
    enc = clf.encoder
    n = len(enc.blocks)
    seen = set()
    for i, blk in enumerate(enc.blocks):
        ps = [p for p in blk.parameters() if p.requires_grad]
        seen |= {id(p) for p in ps}
        groups.append({"params": ps, "lr": cfg.encoder_lr * cfg.layer_decay ** (n - 1 - i), "name": f"block{i}"})
    top = [p for p in enc.ln_f.parameters() if p.requires_grad]
    seen |= {id(p) for p in top}
    groups.append({"params": top, "lr": cfg.encoder_lr, "name": "ln_f"})
    rest = [p for p in enc.parameters() if p.requires_grad and id(p) not in seen]
    groups.append({"params": rest, "lr": cfg.encoder_lr * cfg.layer_decay ** n, "name": "embeddings"})
    return [g for g in groups if g["params"]]


@torch.no_grad()
def validation_loss(model, batches, loss_fn, device) -> tuple[float, float]:
    """(mean class-weighted cross-entropy, accuracy) over fixed validation batches."""
    was = model.training
    model.eval()
    num = den = correct = n = 0.0
    for batch, y in batches:
        logits = model({k: v.to(device) for k, v in batch.items()})
        y = y.to(device)
        w = loss_fn.weight[y] if loss_fn.weight is not None else torch.ones_like(y, dtype=torch.float32)
        num += float((nn.functional.cross_entropy(logits, y, reduction="none") * w).sum())
        den += float(w.sum())
        correct += float((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return num / max(den, 1e-12), correct / max(n, 1)


class EarlyStopping:
    """Keeps the weights of the best validation loss; ``stop`` after ``patience`` evaluations without one."""

    def __init__(self, patience: int):
        self.patience, self.since_best = patience, 0
        self.step, self.val_loss, self.val_accuracy, self.state = 0, float("inf"), None, None

    def offer(self, step: int, val_loss: float, val_accuracy: float, model) -> None:
        if val_loss < self.val_loss:
            self.step, self.val_loss, self.val_accuracy = step, val_loss, val_accuracy
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.since_best = 0
        else:
            self.since_best += 1

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience


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
