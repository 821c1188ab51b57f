"""MLM objective per tokenizer: cross-entropy on masked gene ids (rank) or bins (bin), MSE on
masked values (value). Predictions are computed for the masked tokens only: the vocabulary head of
the rank tokenizer is [N_masked, n_tokens], not [B, L, n_tokens].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import CellEncoder


class MLMObjective(nn.Module):
    """Wraps the encoder so that DDP/FSDP see one forward that returns the loss."""

    def __init__(self, encoder: CellEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs: dict) -> tuple[torch.Tensor, dict]:
        hidden = self.encoder(inputs)
        sel = inputs["mlm_mask"]
        n = int(sel.sum())
        if n == 0:
            # Keep every parameter in the graph so DDP's gradient all-reduce matches on all ranks.
            zero = self.encoder.predict(hidden[:1, :1].reshape(1, -1)).float().sum() * 0.0
            return zero, {"n_masked": 0, "n_correct": 0}
        pred = self.encoder.predict(hidden[sel])
        target = inputs["targets"][sel]
        if self.encoder.tokenizer == "value":
            loss = F.mse_loss(pred.float(), target.float())
            return loss, {"n_masked": n, "n_correct": 0}
        logits = pred.float()
        loss = F.cross_entropy(logits, target)
        return loss, {"n_masked": n, "n_correct": int((logits.argmax(-1) == target).sum())}
