"""On-the-fly, seeded MLM masking of a loader batch (done on the CPU before packing), and the
next-token targets of the NTP objective.

Only gene tokens (ids in [4, gene_end)) are ever selected: <cls>, <eos>, padding and an encoding's
own tokens (UCE's chromosome tokens) are never masked and never enter the MLM loss. The random stream
is a pure function of (seed, epoch, step, rank), so a resumed run masks a replayed batch exactly as
the original attempt did. What a masked token's targets are follows the encoding's declaration
(``loader.encodings``), not its name.
"""

from __future__ import annotations

import hashlib

import torch

from .config import MaskingConfig
from .model import MASK, N_SPECIAL


def masking_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    digest = hashlib.blake2b(f"mask:{seed}:{epoch}:{step}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def mask_batch(batch: dict, tokenizer: str, cfg: MaskingConfig, gen: torch.Generator, n_tokens: int,
               n_bins: int = 51, gene_end: int | None = None) -> dict:
    """A copy of ``batch`` with masked inputs plus ``mlm_mask`` (bool [B, L]) and ``targets``.

    gene target (rank, uce): targets = original gene ids; of the selected tokens replace_prob become
          <mask>, random_prob a random gene, the rest stay (BERT / Geneformer).
    bin target (bin, ebin): targets = original bins; every selected bin input becomes the mask bin ``n_bins``.
    value target (value): targets = original values; every selected value input becomes ``cfg.mask_value``.
    gene + value (rank_value, GeneCompass): the gene-id recipe on the ids, ``targets`` = ids, and every
          selected value input becomes ``cfg.mask_value`` with ``value_targets`` = the values.
    The gene identity stays visible for bin/value (the model predicts expression of a known gene).
    """
    from atlasflow.loader.encodings import get_encoding

    enc = get_encoding(tokenizer)
    gene_end = n_tokens if gene_end is None else gene_end
    ids = batch["input_ids"]
    sel = (torch.rand(ids.shape, generator=gen) < cfg.mask_prob) & (ids >= N_SPECIAL) & (ids < gene_end)
    out = dict(batch)
    out["mlm_mask"] = sel
    if "gene" in enc.targets:
        r = torch.rand(ids.shape, generator=gen)
        rand_ids = torch.randint(N_SPECIAL, gene_end, ids.shape, generator=gen)
        new = torch.where(sel & (r < cfg.replace_prob), torch.full_like(ids, MASK), ids)
        new = torch.where(sel & (r >= cfg.replace_prob) & (r < cfg.replace_prob + cfg.random_prob), rand_ids, new)
        out["input_ids"] = new
        out["targets"] = ids
    if "bin" in enc.targets:
        bins = batch["bins"]
        out["bins"] = torch.where(sel, torch.full_like(bins, n_bins), bins)
        out["targets"] = bins
    if "value" in enc.targets:
        vals = batch["values"]
        out["values"] = torch.where(sel, torch.full_like(vals, cfg.mask_value), vals)
        out["value_targets" if "gene" in enc.targets else "targets"] = vals
    return out


def keep_genes(batch: dict, keep: tuple[float, float], gen: torch.Generator, gene_end: int) -> dict:
    """A copy of ``batch`` where each cell keeps a random subset of its gene tokens, in order: the cell
    draws a keep rate q uniformly from ``keep``, every gene token stays with probability q, and the kept
    tokens close up behind the ones before them (so a ranked cell keeps its order and its ranks renumber,
    roughly what a shallower read of the same cell tokenizes to). Specials and an encoding's own tokens
    always stay. Every per-token field ([B, L] like ``input_ids``) moves with its token; L is unchanged."""
    ids = batch["input_ids"]
    b, n = ids.shape
    real = batch["attention_mask"].bool()
    gene = (ids >= N_SPECIAL) & (ids < gene_end) & real
    lo, hi = keep
    rate = lo + (hi - lo) * torch.rand(b, 1, generator=gen)
    stay = real & ~(gene & (torch.rand(ids.shape, generator=gen) >= rate))
    # kept tokens first, each group in its original order (a stable sort on the dropped flag)
    order = torch.sort((~stay).to(torch.int8), dim=1, stable=True).indices
    kept = stay.gather(1, order)  # the new attention mask
    out = dict(batch)
    for k, v in batch.items():
        if torch.is_tensor(v) and v.shape == ids.shape and k != "attention_mask":
            moved = v.gather(1, order)
            out[k] = torch.where(kept, moved, torch.zeros_like(moved))
    out["attention_mask"] = kept.to(batch["attention_mask"].dtype)
    if "lengths" in batch:
        out["lengths"] = stay.sum(1).to(batch["lengths"].dtype)
    return out


def two_views(batch: dict, keep: tuple[float, float], gen: torch.Generator, gene_end: int) -> dict:
    """The contrastive objective's input: ``keep_genes`` twice (independent draws) stacked as one batch of
    2B cells, cell i's second view at row B + i; ``views`` = 2 tells the objective they pair up."""
    n_cells, n = batch["input_ids"].shape
    a, b = keep_genes(batch, keep, gen, gene_end), keep_genes(batch, keep, gen, gene_end)
    width = int(torch.cat([a["attention_mask"], b["attention_mask"]]).sum(1).max()) if n_cells else n
    out = {}
    for k, v in a.items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n_cells:
            v = torch.cat([v, b[k]])
            out[k] = v[:, :width] if v.dim() == 2 and v.shape[1] == n else v  # columns both views left empty go
        else:
            out[k] = v
    out["views"] = 2
    return out


def next_token_batch(batch: dict) -> dict:
    """NTP targets: position t of a cell predicts its token t + 1 (``targets``), scored wherever that
    next token exists (``mlm_mask``): <cls> predicts the first gene, the last gene predicts <eos>."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    out = dict(batch)
    tgt = torch.zeros_like(ids)
    tgt[:, :-1] = ids[:, 1:]
    sel = torch.zeros_like(real)
    sel[:, :-1] = real[:, 1:]
    out["targets"], out["mlm_mask"] = tgt, sel
    return out
