"""Honest learning signals: what the MLM loss is worth next to predictors that know no biology.

For every masked token the loop scores two context-free baselines on the SAME token:

* ``unigram``: the target's overall frequency. rank: p(gene); bin: p(bin); value: the mean value.
* ``position_unigram``: the target's frequency given the one thing the model sees without any
  context. rank: the rank position of the masked slot (position_ids stay visible), so
  p(gene | position bucket); bin / value: the (visible) gene, so p(bin | gene) / the gene's mean.

A model that only learned frequencies sits on these numbers (the plateau); a model that reads the
cell's other genes goes below them.

Estimation (once at start-up, stored in the checkpoint part ``baselines.pt``, reloaded on resume):
a seeded sample of ``train.baseline_cells`` cells is tokenized by the training loader's own recipe
(same split, tokenizer, max_len, thinning; no length bucketing, so the sample is not length-biased).
Counts are Dirichlet-smoothed: unigram p(t) = (c_t + a q_t) / (N + a), with the prior q from the
store's gene stats (q_g proportional to the gene's nnz, so every vocabulary gene has mass; uniform
over bins for ``bin``); conditional p(t | k) = (c_kt + b p(t)) / (n_k + b). The pseudo-counts a, b
are picked from a grid by held-out likelihood (counts from the even-indexed cells scored on the
odd ones), then refit on all cells: the baselines are as good as their estimator can make them, not
straw men. Rank positions are bucketed (exact below 16, then quarter-octaves) so the table stays
[~48, n_tokens].
"""

from __future__ import annotations

import logging

import torch

from atlasflow.store.schema import check_format

from .model import N_SPECIAL, cell_index

log = logging.getLogger(__name__)

BASELINES_FORMAT_VERSION = 1
_GRID = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
_EXACT = 16  # rank positions below this get their own bucket


def position_bucket(pos: torch.Tensor) -> torch.Tensor:
    """Bucket of rank positions: p for p < 16, then 16 + floor(4 * log2(p / 16))."""
    p = pos.long().clamp(min=0)
    far = _EXACT + torch.floor(4 * torch.log2(p.clamp(min=_EXACT).double() / _EXACT)).long()
    return torch.where(p < _EXACT, p, far)


def n_buckets(max_len: int) -> int:
    return int(position_bucket(torch.tensor([max(max_len - 1, 0)]))[0]) + 1


def baseline_kind(tokenizer: str, objective: str = "mlm") -> str:
    """What the baselines predict, from the encoding's declaration: "rank" (a gene id, keyed by its
    position: rank, rank_value's id part, uce), "bin", "value", or "next" (NTP: the next token, keyed by
    its position)."""
    from atlasflow.loader.encodings import get_encoding

    if objective == "ntp":
        return "next"
    targets = get_encoding(tokenizer).targets
    return "rank" if "gene" in targets else targets[0]


def keys_and_targets(kind: str, inputs: dict, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context key, target) of the selected tokens: (position bucket, gene) for rank, (gene, bin|value);
    next: (the target's own position bucket, the next token)."""
    if kind in ("rank", "next"):
        pos = inputs["position_ids"][sel] + (1 if kind == "next" else 0)
        return position_bucket(pos), inputs["targets"][sel].long()
    target = inputs["targets"][sel]
    return inputs["input_ids"][sel].long(), (target.long() if kind == "bin" else target.double())


class Baselines:
    """Context-free predictors of masked targets; ``score`` gives their mean loss on given tokens."""

    def __init__(self, tokenizer: str, uni: torch.Tensor, cond: torch.Tensor, meta: dict):
        self.tokenizer, self.uni, self.cond, self.meta = tokenizer, uni, cond, meta

    def score(self, keys: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """(sum of unigram losses, sum of conditional losses) over these tokens (NLL in nats; SE for value)."""
        if keys.numel() == 0:
            return 0.0, 0.0
        keys = keys.clamp(max=self.cond.shape[0] - 1)
        if self.tokenizer == "value":
            t = targets.double()
            return float(((t - self.uni) ** 2).sum()), float(((t - self.cond[keys]) ** 2).sum())
        return float(-self.uni[targets].sum()), float(-self.cond[keys, targets].sum())

    def state_dict(self) -> dict:
        return {"format_version": BASELINES_FORMAT_VERSION, "tokenizer": self.tokenizer, "uni": self.uni,
                "cond": self.cond, **{f"meta_{k}": v for k, v in self.meta.items()}}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Baselines":
        check_format("baselines", d.get("format_version"), BASELINES_FORMAT_VERSION, "baselines.pt")
        meta = {k[5:]: v for k, v in d.items() if k.startswith("meta_")}
        return cls(d["tokenizer"], d["uni"], d["cond"], meta)


def collect_sample(loader, n_cells: int, gene_end: int | None = None,
                   every_token: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-cell (positions, ids, values-or-bins) of the real gene tokens (ids in [4, gene_end)) of up to
    n_cells cells; ``every_token``: every real token after <cls> (what NTP predicts)."""
    cells = []
    loader.dataset.set_epoch(0)
    for batch in loader:
        ids = batch["input_ids"]
        val = batch.get("bins", batch.get("values"))
        for i in range(ids.shape[0]):
            if every_token:
                real = batch["attention_mask"][i].bool().clone()
                real[0] = False
            else:
                real = (ids[i] >= N_SPECIAL) & (ids[i] < (gene_end if gene_end is not None else ids.max() + 1))
            pos = torch.nonzero(real).squeeze(1)
            cells.append((pos, ids[i][real].long(), None if val is None else val[i][real]))
            if len(cells) >= n_cells:
                return cells
    return cells


def _sample_tokens(tokenizer: str, cells) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, targets, cell index) of every gene token of the sample."""
    keys, tgts, owner = [], [], []
    for c, (pos, ids, val) in enumerate(cells):
        if tokenizer in ("rank", "next"):
            keys.append(position_bucket(pos))
            tgts.append(ids)
        else:
            keys.append(ids)
            tgts.append(val.long() if tokenizer == "bin" else val.double())
        owner.append(torch.full((len(ids),), c, dtype=torch.long))
    return torch.cat(keys), torch.cat(tgts), torch.cat(owner)


def _cat_fit(keys, tgts, n_keys: int, n_classes: int, prior: torch.Tensor, a: float, b: float):
    """Smoothed log p(t) [C] and log p(t | k) [K, C] from counts."""
    c = torch.bincount(tgts, minlength=n_classes).double()
    uni = (c + a * prior) / (c.sum() + a)
    ck = torch.bincount(keys * n_classes + tgts, minlength=n_keys * n_classes).double().view(n_keys, n_classes)
    cond = (ck + b * uni) / (ck.sum(1, keepdim=True) + b)
    return uni.log(), cond.log()


def _val_fit(keys, tgts, n_keys: int, a: float, b: float):
    mu = tgts.mean() if tgts.numel() else torch.tensor(0.0, dtype=torch.float64)
    s = torch.zeros(n_keys, dtype=torch.float64).index_add_(0, keys, tgts)
    n = torch.bincount(keys, minlength=n_keys).double()
    return mu, (s + b * mu) / (n + b)


def estimate(tokenizer: str, cells, n_tokens: int, n_bins: int, max_len: int,
             gene_nnz: torch.Tensor | None) -> Baselines:
    """Fit both baselines on sampled cells (see the module docstring); ``gene_nnz`` aligned with vocab genes."""
    keys, tgts, owner = _sample_tokens(tokenizer, cells)
    if tgts.numel() == 0:
        raise ValueError("baselines: the sample has no gene tokens (empty cells?)")
    n_keys = n_buckets(max_len) if tokenizer in ("rank", "next") else n_tokens
    fit_a, test_b = owner % 2 == 0, owner % 2 == 1
    if tokenizer == "value":
        def nll(a, b, uni_only):  # squared error of the smoothed means on the held-out half
            mu, m = _val_fit(keys[fit_a], tgts[fit_a], n_keys, a, b)
            pred = mu if uni_only else m[keys[test_b]]
            return float(((tgts[test_b] - pred) ** 2).mean())
        a = 0.0
    else:
        n_classes = n_tokens if tokenizer in ("rank", "next") else n_bins
        prior = torch.zeros(n_classes, dtype=torch.float64)
        if tokenizer in ("rank", "next"):  # gene tokens by their store nnz; an encoding's own tokens uniform
            n_genes = len(gene_nnz) if gene_nnz is not None else n_tokens - N_SPECIAL
            nnz = gene_nnz.double() if gene_nnz is not None else torch.ones(n_genes, dtype=torch.float64)
            prior[N_SPECIAL:N_SPECIAL + n_genes] = nnz / nnz.sum()
            if tokenizer == "next" or n_tokens > N_SPECIAL + n_genes:  # <eos>, chromosome tokens: seen in the sample
                prior[N_SPECIAL + n_genes:] += 1.0 / n_tokens
                prior[2:4] += 1.0 / n_tokens
                prior /= prior.sum()
        else:
            prior[1:] = 1.0 / (n_classes - 1)  # bins 1..n_bins-1 (0 is <cls>'s)

        def nll(a, b, uni_only):
            lu, lc = _cat_fit(keys[fit_a], tgts[fit_a], n_keys, n_classes, prior, a, b)
            t = tgts[test_b]
            return float(-(lu[t] if uni_only else lc[keys[test_b], t]).mean())
        a = min(_GRID, key=lambda g: nll(g, 1.0, True))
    b = min(_GRID, key=lambda g: nll(a, g, False))
    if tokenizer == "value":
        uni, cond = _val_fit(keys, tgts, n_keys, a, b)
    else:
        uni, cond = _cat_fit(keys, tgts, n_keys, n_classes, prior, a, b)
        uni, cond = uni.float(), cond.float()
    meta = {"n_cells": len(cells), "n_tokens": int(tgts.numel()), "alpha": a, "beta": b,
            "prior": "gene stats nnz" if tokenizer in ("rank", "next") and gene_nnz is not None else "uniform",
            "key": "rank position bucket" if tokenizer in ("rank", "next") else "gene"}
    log.info("baselines: %d cells, %d tokens, pseudo-counts a=%g b=%g", len(cells), tgts.numel(), a, b)
    return Baselines(tokenizer, uni, cond, meta)



# -- wiring for the training loop --------------------------------------------------------------------
def training_vocab(cfg, saved: dict | None):
    """The run's Vocab: the checkpoint's on resume, else the store's genes (expressed ones only by default)."""
    from atlasflow.loader import Vocab
    from atlasflow.store import open_store

    if saved is not None:
        return Vocab.from_dict(saved)
    store = open_store(cfg.data.store, cfg.data.timestamp_ms or None)
    nnz = _gene_stats(store)["nnz"] if cfg.data.expressed_only else None
    vocab = Vocab.from_var(store.var(), cfg.data.gene_filter or None, gene_nnz=nnz)
    log.info("vocabulary: %d of %d store genes%s", len(vocab.gene_joinids), store.n_genes,
             " (expressed in the store)" if nnz is not None else "")
    return vocab


def _gene_stats(store):
    try:
        return store.gene_stats()
    except Exception as exc:
        raise ValueError(f"data.expressed_only / tokenizer rank: store {store.uri} has no usable gene stats "
                         f"({type(exc).__name__}: {exc}); run `atlasflow store stats {store.uri}`") from exc


def vocab_stats(cfg, vocab, need: bool) -> tuple:
    """(nonzero medians, nnz) of the vocabulary's genes from the store's gene stats, or (None, None)."""
    from atlasflow.store import open_store

    store = open_store(cfg.data.store, cfg.data.timestamp_ms or None)
    try:
        stats = store.gene_stats().reindex(vocab.gene_joinids)
    except Exception:
        if need:
            raise
        return None, None
    return stats["nonzero_median"].to_numpy(), torch.as_tensor(stats["nnz"].to_numpy().astype("float64"))


def make_loader_for(cfg, lcfg, vocab, medians, meta_vocab=None):
    from atlasflow.loader import make_loader
    from atlasflow.loader.encodings import get_encoding

    return make_loader(cfg.data.store, lcfg, vocab=vocab, meta_vocab=meta_vocab,
                       gene_medians=medians if get_encoding(lcfg.tokenizer).needs_medians else None)


def _side_config(lcfg, n_cells: int, **over):
    """A small, unbucketed, in-process variant of the training loader's config."""
    import dataclasses

    window = max(lcfg.batch_size, min(16384, 4 * n_cells))
    return dataclasses.replace(lcfg, bucket_batches=0, num_workers=0, window_cells=window, chunk_cells=64, **over)


def fit_baselines(cfg, lcfg, vocab, medians, gene_nnz, n_tokens: int, meta_vocab=None) -> Baselines:
    n = cfg.train.baseline_cells
    kind = baseline_kind(cfg.data.tokenizer, cfg.objective.kind)
    cells = collect_sample(make_loader_for(cfg, _side_config(lcfg, n), vocab, medians, meta_vocab), n,
                           gene_end=N_SPECIAL + len(vocab.gene_joinids), every_token=kind == "next")
    # positions run over max_len + the metadata tokens
    return estimate(kind, cells, n_tokens, cfg.data.n_bins, cfg.data.max_len + len(cfg.data.meta_columns), gene_nnz)


def batch_baselines(baselines: Baselines, inputs: dict) -> tuple[float, float]:
    """Mean unigram / conditional loss of this batch's scored tokens."""
    sel = inputs["mlm_mask"]
    n = int(sel.sum())
    if n == 0:
        return 0.0, 0.0
    u, c = baselines.score(*keys_and_targets(baselines.tokenizer, inputs, sel))
    return u / n, c / n


def cell_baseline(baselines: Baselines, ids: torch.Tensor, seg: torch.Tensor, gene_end: int) -> float | None:
    """The cell term's context-free baseline on a batch: every cell's genes scored by the genes' frequency
    (the unigram, renormalized over vocabulary genes), averaged per cell then over cells like
    ``objective.cell_loss``; None where the unigram is not over gene ids (bin / value targets)."""
    if baselines.tokenizer not in ("rank", "next"):
        return None
    log_p = baselines.uni.double()[N_SPECIAL:gene_end]
    log_p = log_p - torch.logsumexp(log_p, 0)
    ids, seg = ids.cpu(), seg.cpu()
    genes = (ids >= N_SPECIAL) & (ids < gene_end) & (seg > 0)
    cid, n = cell_index(seg)
    cid = cid[genes]
    nll = -log_p[ids[genes] - N_SPECIAL]
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, cid, nll)
    cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, cid, torch.ones_like(nll))
    has = cnt > 0
    return float((tot[has] / cnt[has]).mean()) if bool(has.any()) else None


def val_inputs(cfg, lcfg, vocab, medians, n_tokens: int, baselines: Baselines, rank: int,
               meta_vocab=None) -> dict | None:
    """The fixed held-out set: masked model inputs of this rank's first val cells (same every call)."""
    from .masking import masking_generator
    from .pack import model_inputs

    if cfg.train.eval_every == 0 or cfg.train.eval_cells == 0:
        return None
    if cfg.data.split != "train":
        log.warning("held-out loss off: data.split is %r; it needs data.split = 'train' (the 'val' split "
                    "is evaluated)", cfg.data.split)
        return None
    # Natural depth (no thinning): the held-out number is the one a user's cells would get.
    vcfg = _side_config(lcfg, cfg.train.eval_cells, split="val", thin_range=None)
    try:
        loader = make_loader_for(cfg, vcfg, vocab, medians, meta_vocab)
    except ValueError as exc:
        log.warning("held-out loss off: no usable 'val' split (%s)", exc)
        return None
    world = lcfg.world_size or 1
    n_batches = min(loader.dataset.batches_per_epoch, -(-cfg.train.eval_cells // (lcfg.batch_size * world)))
    loader.dataset.set_epoch(0)
    out, uni, cond, masked = [], 0.0, 0.0, 0
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        gen = masking_generator(cfg.data.seed, -1, i, rank)  # epoch -1: a stream training never uses
        m = prepare_batch(cfg, batch, gen, n_tokens, N_SPECIAL + len(vocab.gene_joinids), views=False)
        inputs = model_inputs(m, pack=cfg.data.pack)
        sel = inputs["mlm_mask"]
        u, c = baselines.score(*keys_and_targets(baselines.tokenizer, inputs, sel))
        uni, cond, masked = uni + u, cond + c, masked + int(sel.sum())
        out.append(inputs)
    return {"inputs": out, "uni": uni, "cond": cond, "masked": masked, "cells": n_batches * lcfg.batch_size}


def prepare_batch(cfg, batch: dict, gen, n_tokens: int, gene_end: int, views: bool = True) -> dict:
    """The objective's view of a loader batch: masked (MLM) or with next-token targets (NTP); with the
    contrastive term on (and ``views``; the held-out set scores one view) two masked views of every cell."""
    from .masking import mask_batch, next_token_batch, two_views

    if cfg.objective.kind == "ntp":
        return next_token_batch(batch)
    if views and cfg.objective.contrast_weight > 0:
        batch = two_views(batch, cfg.objective.contrast_keep, gen, gene_end)
    return mask_batch(batch, cfg.data.tokenizer, cfg.masking, gen, n_tokens, cfg.data.n_bins, gene_end)


def _reduce(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def val_baselines(val_set: dict | None, ctx) -> dict:
    if val_set is None:
        return {"val_unigram_loss": None, "val_position_unigram_loss": None, "val_cells": 0}
    uni, cond, n, cells = _reduce([val_set["uni"], val_set["cond"], val_set["masked"], val_set["cells"]], ctx.device)
    return {"val_unigram_loss": uni / max(n, 1), "val_position_unigram_loss": cond / max(n, 1),
            "val_cells": int(cells)}


@torch.no_grad()
def evaluate(model, val_set: dict, ctx, amp: bool) -> dict:
    """Token-weighted MLM loss and accuracy of the model on the fixed held-out set (all ranks)."""
    model.eval()
    loss_sum = correct = masked = cell_sum = n_cell = 0.0
    try:
        for inputs in val_set["inputs"]:
            inputs = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                _, stats = model(inputs)
            loss_sum += stats["mlm_loss"] * stats["n_masked"]
            correct += stats["n_correct"]
            masked += stats["n_masked"]
            if "cell_loss" in stats:
                cell_sum += stats["cell_loss"]
                n_cell += 1
    finally:
        model.train()
    loss_sum, correct, masked, cell_sum, n_cell = _reduce([loss_sum, correct, masked, cell_sum, n_cell], ctx.device)
    out = {"val_loss": loss_sum / max(masked, 1), "val_masked_accuracy": correct / max(masked, 1)}
    if n_cell:
        out["val_cell_loss"] = cell_sum / n_cell
    return out
