"""Pretraining objectives over the encoder, one forward that returns the loss (what DDP/FSDP wrap).

MLM (BERT; Geneformer, scGPT, scBERT, GeneCompass, UCE-as-used-here): only the masked tokens are
scored, per target of the encoding: cross-entropy on the gene id, cross-entropy on the bin, squared
error on the value; a joint encoding (``rank_value``, GeneCompass) sums L_id + value_weight * L_value.
The vocabulary head is [N_masked, n_tokens], never [B, L, n_tokens].

NTP (next-token prediction, tGPT, Shen et al. iScience 2023): a causal model reads the ordered
sequence and every token predicts the next token of its cell, L = -(1/N) sum_t log p(x_{t+1} | x_<=t),
over the positions ``next_token_batch`` selects. The same ``mlm_mask`` / ``targets`` fields carry the
scored positions and their targets, so packing and the loop need no second path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import CellEncoder

OBJECTIVES = ("mlm", "ntp")


class PretrainObjective(nn.Module):
    def __init__(self, encoder: CellEncoder, kind: str = "mlm", value_weight: float = 1.0):
        super().__init__()
        if kind not in OBJECTIVES:
            raise ValueError(f"objective.kind: must be one of {'|'.join(OBJECTIVES)}, got {kind!r}")
        if (kind == "ntp") != encoder.causal:
            raise ValueError(f"objective.kind={kind!r} needs {'a causal' if kind == 'ntp' else 'a bidirectional'} "
                             "encoder")
        self.encoder, self.kind, self.value_weight = encoder, kind, float(value_weight)

    def forward(self, inputs: dict) -> tuple[torch.Tensor, dict]:
        hidden = self.encoder(inputs)
        sel = inputs["mlm_mask"]
        n = int(sel.sum())
        if n == 0:
            # Keep every parameter in the graph so DDP's gradient all-reduce matches on all ranks.
            pred = self.encoder.predict(hidden[:1, :1].reshape(1, -1))
            zero = sum(p.float().sum() for p in pred.values()) * 0.0
            return zero, {"n_masked": 0, "n_correct": 0}
        pred = self.encoder.predict(hidden[sel])
        loss, stats = 0.0, {"n_masked": n, "n_correct": 0}
        if "gene" in pred:
            logits = pred["gene"].float()
            target = inputs["targets"][sel]
            loss = F.cross_entropy(logits, target)
            stats["n_correct"] = int((logits.argmax(-1) == target).sum())
        if "bin" in pred:
            logits = pred["bin"].float()
            target = inputs["targets"][sel]
            loss = F.cross_entropy(logits, target)
            stats["n_correct"] = int((logits.argmax(-1) == target).sum())
        if "value" in pred:
            key = "value_targets" if "gene" in pred else "targets"
            mse = F.mse_loss(pred["value"].float(), inputs[key][sel].float())
            if "gene" in pred:
                stats["value_mse"] = float(mse.detach())
                loss = loss + self.value_weight * mse
            else:
                loss = mse
        return loss, stats


MLMObjective = PretrainObjective  # the name earlier code and checkpoints' users know
