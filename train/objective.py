"""Pretraining objectives over the encoder, one forward that returns the loss (what DDP/FSDP wrap).

MLM (BERT; Geneformer, scGPT, scBERT, GeneCompass, UCE-as-used-here): only the masked tokens are
scored, per target of the encoding: cross-entropy on the gene id, cross-entropy on the bin, squared
error on the value; a joint encoding (``rank_value``, GeneCompass) sums L_id + value_weight * L_value.
The vocabulary head is [N_masked, n_tokens], never [B, L, n_tokens].

NTP (next-token prediction, tGPT, Shen et al. iScience 2023): a causal model reads the ordered
sequence and every token predicts the next token of its cell, L = -(1/N) sum_t log p(x_{t+1} | x_<=t),
over the positions ``next_token_batch`` selects. The same ``mlm_mask`` / ``targets`` fields carry the
scored positions and their targets, so packing and the loop need no second path.

The cell term (``cell_weight`` > 0; scGPT's GEPC, "gene expression prediction for cell modelling", for a
gene set): a cell's vector c is the mean of its gene tokens' final states (what ``mean`` pooling embeds),
and a bilinear decoder tied to the gene embedding scores every vocabulary gene from c alone:
L_cell = mean over cells of -(1/|G|) sum_{g in G} log softmax_g(W c . E_g + b), G the cell's genes (masked
ones included, as their original ids). MLM can be solved from neighbouring tokens without any summary of
the cell; this term makes the pooled vector a summary, which is what a frozen embedding is used as.
Its baseline (``cell_unigram_loss``) scores every cell's genes with the genes' frequency over all cells.

The contrastive term (``contrast_weight`` > 0; SimCLR's NT-Xent, Chen et al. 2020, over two views of each
cell, as contrastive single-cell encoders do, e.g. CLEAR, Concerto): the batch holds every cell twice
(``masking.two_views``: each view keeps its own random share of the cell's genes and is masked on its
own), z = normalize(P c) for the mean-pooled vector c of each view and a projection head P, and each view
must pick its partner out of the other 2B - 1 views: L = -(1/2B) sum_i log softmax_j(z_i . z_j / tau)[i'],
j != i. It is what MLM lacks for a frozen embedding: the pooled vector must tell a cell from the other
cells of the batch, whatever share of its genes was read. Chance level is log(2B - 1) (``contrast_chance``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import N_SPECIAL, CellEncoder, mean_pool_cells

OBJECTIVES = ("mlm", "ntp")


def original_ids(inputs: dict, kind: str, encoding) -> torch.Tensor:
    """Each position's original token id: MLM on gene ids replaced some inputs (``targets`` holds the
    originals); bin / value MLM and next-token prediction leave the ids as they were."""
    if kind == "mlm" and "gene" in encoding.targets:
        return inputs["targets"]
    return inputs["input_ids"]


class PretrainObjective(nn.Module):
    def __init__(self, encoder: CellEncoder, kind: str = "mlm", value_weight: float = 1.0, cell_weight: float = 0.0,
                 contrast_weight: float = 0.0, contrast_temperature: float = 0.1):
        super().__init__()
        if kind not in OBJECTIVES:
            raise ValueError(f"objective.kind: must be one of {'|'.join(OBJECTIVES)}, got {kind!r}")
        if (kind == "ntp") != encoder.causal:
            raise ValueError(f"objective.kind={kind!r} needs {'a causal' if kind == 'ntp' else 'a bidirectional'} "
                             "encoder")
        if cell_weight < 0:
            raise ValueError(f"objective.cell_weight: must be >= 0, got {cell_weight}")
        if cell_weight > 0 and not encoder.has_cell_head:
            raise ValueError("objective.cell_weight > 0 needs an encoder built with cell_head=True")
        if contrast_weight < 0 or contrast_temperature <= 0:
            raise ValueError(f"objective.contrast_weight must be >= 0 and contrast_temperature > 0, got "
                             f"{contrast_weight}, {contrast_temperature}")
        if contrast_weight > 0 and not encoder.has_contrast_head:
            raise ValueError("objective.contrast_weight > 0 needs an encoder built with contrast_head=True")
        self.encoder, self.kind, self.value_weight = encoder, kind, float(value_weight)
        self.cell_weight = float(cell_weight)
        self.contrast_weight, self.temperature = float(contrast_weight), float(contrast_temperature)

    def forward(self, inputs: dict) -> tuple[torch.Tensor, dict]:
        """(loss to optimize, stats): ``mlm_loss`` (the masked-token / next-token term alone, what the
        unigram baselines compare with), ``cell_loss`` with the cell term, counts of masked / correct."""
        hidden = self.encoder(inputs)
        loss, stats = self._token_loss(hidden, inputs)
        stats["mlm_loss"] = float(loss.detach())
        contrast = self.contrast_weight > 0 and inputs.get("views") == 2  # the held-out set has one view: no term
        pooled = self.pool_genes(hidden, inputs) if self.cell_weight > 0 or contrast else None  # once for both
        if self.cell_weight > 0:
            cell = self.cell_loss(pooled)
            stats["cell_loss"] = float(cell.detach())
            loss = loss + self.cell_weight * cell
        if contrast:
            con, n_views = self.contrast_loss(pooled, inputs)
            stats["contrast_loss"] = float(con.detach())
            stats["contrast_chance"] = math.log(max(n_views - 1, 1))
            loss = loss + self.contrast_weight * con
        return loss, stats

    def pool_genes(self, hidden: torch.Tensor, inputs: dict) -> tuple:
        """(original ids, gene-token mask, cell vectors [C, d], cell index): each cell's mean over its gene
        tokens (masked ones included), the vector ``mean`` pooling embeds and both cell-level terms score."""
        ids = original_ids(inputs, self.kind, self.encoder.encoding)
        genes = (ids >= N_SPECIAL) & (ids < self.encoder.gene_end)
        cells, cid = mean_pool_cells(hidden, inputs["segment_ids"], genes)
        return ids, genes, cells, cid

    def contrast_loss(self, pooled: tuple, inputs: dict) -> tuple[torch.Tensor, int]:
        """(NT-Xent over the batch's 2B views, 2B): view i pairs with view (i + B) mod 2B in batch order."""
        _, _, cells, cid = pooled
        pos = inputs["cell_pos"]
        order = cid[pos[:, 0], pos[:, 1]]  # packed rows number cells by row: back to batch order
        z = F.normalize(self.encoder.contrast_proj(cells[order]).float(), dim=-1)
        n = z.shape[0]
        if n < 2 or n % 2:
            raise ValueError(f"contrast_loss: needs two views per cell, got {n} views")
        sim = (z @ z.t()) / self.temperature
        sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))
        partner = (torch.arange(n, device=sim.device) + n // 2) % n
        return F.cross_entropy(sim, partner), n

    def cell_loss(self, pooled: tuple) -> torch.Tensor:
        ids, genes, cells, cid = pooled
        logp = F.log_softmax(self.encoder.cell_gene_logits(cells).float(), -1)
        sel = genes & (cid >= 0)
        nll = -logp[cid[sel], ids[sel] - N_SPECIAL]
        n_cells = cells.shape[0]
        per_cell = torch.zeros(n_cells, device=nll.device).index_add_(0, cid[sel], nll)
        n_genes = torch.zeros(n_cells, device=nll.device).index_add_(0, cid[sel], torch.ones_like(nll))
        has = n_genes > 0
        return (per_cell[has] / n_genes[has]).mean() if bool(has.any()) else logp.sum() * 0.0

    def _token_loss(self, hidden: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
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
