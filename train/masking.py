"""On-the-fly, seeded MLM masking of a loader batch (done on the CPU before packing).

Only gene tokens (id >= 4) are ever selected: <cls>, <eos> and padding are never masked and never
enter the loss. The random stream is a pure function of (seed, epoch, step, rank), so a resumed
run masks a replayed batch exactly as the original attempt did.
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
               n_bins: int = 51) -> dict:
    """A copy of ``batch`` with masked inputs plus ``mlm_mask`` (bool [B, L]) and ``targets``.

    rank: targets = original gene ids; of the selected tokens replace_prob become <mask>,
          random_prob a random gene, the rest stay (BERT / Geneformer).
    bin:  targets = original bins; every selected bin input becomes the mask bin ``n_bins``.
    value: targets = original values; every selected value input becomes ``cfg.mask_value``.
    The gene identity stays visible for bin/value (the model predicts expression of a known gene).
    """
    ids = batch["input_ids"]
    sel = (torch.rand(ids.shape, generator=gen) < cfg.mask_prob) & (ids >= N_SPECIAL)
    out = dict(batch)
    out["mlm_mask"] = sel
    if tokenizer == "rank":
        r = torch.rand(ids.shape, generator=gen)
        rand_ids = torch.randint(N_SPECIAL, n_tokens, ids.shape, generator=gen)
        new = torch.where(sel & (r < cfg.replace_prob), torch.full_like(ids, MASK), ids)
        new = torch.where(sel & (r >= cfg.replace_prob) & (r < cfg.replace_prob + cfg.random_prob), rand_ids, new)
        out["input_ids"] = new
        out["targets"] = ids
    elif tokenizer == "bin":
        bins = batch["bins"]
        out["bins"] = torch.where(sel, torch.full_like(bins, n_bins), bins)
        out["targets"] = bins
    elif tokenizer == "value":
        vals = batch["values"]
        out["values"] = torch.where(sel, torch.full_like(vals, cfg.mask_value), vals)
        out["targets"] = vals
    else:
        raise ValueError(f"tokenizer: must be rank|bin|value, got {tokenizer!r}")
    return out
