"""The contrastive term of pretraining (``objective.contrast_weight``): the views keep exactly the genes an
independent replay of the random draws keeps, in order, with every per-token field moved along; the loss
equals a by-hand NT-Xent on padded and packed batches (packing reorders cells, the pairing must not
change); it trains; and a run with it logs the term beside its chance level, scores the held-out set on
one view, and checkpoints an encoder that loads and embeds."""

from __future__ import annotations

import math

import pytest
import torch

from atlasflow.train.checkpoint import load_checkpoint, read_part
from atlasflow.train.config import MaskingConfig, ObjectiveConfig
from atlasflow.train.masking import keep_genes, mask_batch, masking_generator, two_views
from atlasflow.train.model import CellEncoder
from atlasflow.train.objective import PretrainObjective
from atlasflow.train.pack import model_inputs

from test_train_loop import config, local_context, store  # noqa: F401  (the module's store fixture)
from test_train_model import N_TOKENS, SMALL, contract_batch

LENGTHS = [12, 9, 7, 11, 5, 10]


def _replayed_keep(batch: dict, keep: tuple[float, float], seed: int, gene_end: int) -> list[list[int]]:
    """The positions each cell keeps, from the same two draws ``keep_genes`` documents, in plain Python."""
    gen = torch.Generator().manual_seed(seed)
    b, n = batch["input_ids"].shape
    rate = (keep[0] + (keep[1] - keep[0]) * torch.rand(b, 1, generator=gen)).tolist()
    u = torch.rand((b, n), generator=gen).tolist()
    ids, real = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    out = []
    for i in range(b):
        out.append([j for j in range(n) if real[i][j]
                    and not (4 <= ids[i][j] < gene_end and u[i][j] >= rate[i][0])])
    return out


@pytest.mark.parametrize("keep", [(0.3, 1.0), (0.5, 0.5)])
def test_kept_genes_equal_an_independent_replay(keep):
    batch = contract_batch(LENGTHS, seed=1)
    got = keep_genes(batch, keep, torch.Generator().manual_seed(7), N_TOKENS)
    want = _replayed_keep(batch, keep, 7, N_TOKENS)
    assert sum(len(w) for w in want) < sum(LENGTHS)  # some genes dropped, else the test shows nothing
    for i, pos in enumerate(want):
        n = len(pos)
        assert got["lengths"][i] == n and got["attention_mask"][i].tolist() == [True] * n + [False] * (
            batch["input_ids"].shape[1] - n)
        for k in ("input_ids", "bins", "values"):
            assert got[k][i, :n].tolist() == batch[k][i, pos].tolist()
            assert (got[k][i, n:] == 0).all()
        assert got["input_ids"][i, 0] == 2 and got["input_ids"][i, n - 1] == 3  # <cls> ... <eos> stay
    assert got["soma_joinid"].tolist() == batch["soma_joinid"].tolist()
    whole = keep_genes(batch, (1.0, 1.0), torch.Generator().manual_seed(7), N_TOKENS)
    for k in ("input_ids", "attention_mask", "bins", "values", "lengths"):
        assert torch.equal(whole[k], batch[k])


def test_two_views_stack_the_same_cells_and_drop_empty_columns():
    batch = contract_batch(LENGTHS, seed=2)
    v = two_views(batch, (0.3, 0.6), torch.Generator().manual_seed(3), N_TOKENS)
    b = len(LENGTHS)
    assert v["views"] == 2 and v["input_ids"].shape[0] == 2 * b
    assert v["soma_joinid"].tolist() == batch["soma_joinid"].tolist() * 2
    assert v["input_ids"].shape[1] == int(v["lengths"].max()) < max(LENGTHS)
    assert not torch.equal(v["input_ids"][:b], v["input_ids"][b:, :])  # independent draws per view


def _nt_xent_by_hand(z: torch.Tensor, tau: float) -> float:
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + n // 2) % n
        others = [k for k in range(n) if k != i]
        logits = torch.stack([z[i] @ z[k] / tau for k in others]).double()
        total += -(logits[others.index(j)] - torch.logsumexp(logits, 0)).item()
    return total / n


@pytest.mark.parametrize("pack", [False, True])
def test_contrast_loss_equals_a_by_hand_nt_xent(pack):
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, contrast_head=True).eval()
    v = two_views(contract_batch(LENGTHS, seed=4), (0.4, 1.0), torch.Generator().manual_seed(5), N_TOKENS)
    m = mask_batch(v, "rank", MaskingConfig(mask_prob=0.3), masking_generator(0, 0, 1, 0), N_TOKENS)
    inputs = model_inputs(m, pack=pack, row_len=int(m["lengths"].max()) + 6 if pack else None)
    if pack:
        assert inputs["segment_ids"].amax() > 1  # several cells share a row: cell order differs from the batch
    obj = PretrainObjective(enc, contrast_weight=0.5, contrast_temperature=0.2)
    with torch.no_grad():
        loss, stats = obj(inputs)
        hidden = enc(inputs)
    zs = []
    for i, n in enumerate(m["lengths"].tolist()):  # each view's gene-token states, found through cell_pos
        r, off = inputs["cell_pos"][i].tolist()
        zs.append(torch.nn.functional.normalize(enc.contrast_proj(hidden[r, off + 1:off + n - 1].mean(0)), dim=0))
    want = _nt_xent_by_hand(torch.stack(zs), 0.2)
    assert stats["contrast_loss"] == pytest.approx(want, rel=1e-5)
    assert stats["contrast_chance"] == pytest.approx(math.log(2 * len(LENGTHS) - 1))
    assert float(loss) == pytest.approx(stats["mlm_loss"] + 0.5 * stats["contrast_loss"], rel=1e-5)
    one_view = model_inputs(mask_batch(contract_batch(LENGTHS, seed=4), "rank", MaskingConfig(),
                                       masking_generator(0, 0, 1, 0), N_TOKENS), pack=pack)
    _, stats1 = obj(one_view)  # a batch without views (the held-out set): no contrastive term
    assert "contrast_loss" not in stats1


def test_contrast_term_trains_and_is_validated():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, contrast_head=True)
    obj = PretrainObjective(enc, contrast_weight=1.0)
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    batch = contract_batch(LENGTHS, seed=6)
    first = None
    for step in range(40):
        v = two_views(batch, (0.3, 1.0), masking_generator(0, 0, step, 0), N_TOKENS)
        inputs = model_inputs(mask_batch(v, "rank", MaskingConfig(), masking_generator(1, 0, step, 0), N_TOKENS),
                              pack=False)
        loss, stats = obj(inputs)
        first = stats["contrast_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert enc.contrast_proj[0].weight.grad.abs().sum() > 0
    assert stats["contrast_loss"] < 0.5 * stats["contrast_chance"] < first  # six cells told apart from their views
    with pytest.raises(ValueError, match="contrast_head"):
        PretrainObjective(CellEncoder(SMALL, "rank", N_TOKENS, max_len=32), contrast_weight=1.0)
    for bad in ({"contrast_weight": -1.0}, {"contrast_temperature": 0.0}, {"contrast_keep": (0.0, 1.0)},
                {"contrast_keep": (0.9, 0.5)}, {"contrast_weight": 1.0, "kind": "ntp"}):
        with pytest.raises(ValueError, match="objective.contrast"):
            ObjectiveConfig(**bad)
    assert not hasattr(CellEncoder(SMALL, "rank", N_TOKENS, max_len=32), "contrast_proj")  # off by default


def test_a_run_with_the_contrast_term_logs_it_and_its_checkpoint_embeds(store, tmp_path):  # noqa: F811
    from atlasflow.train.loop import run_worker

    cfg = config(store, **{"objective.contrast_weight": 1.0, "train.max_steps": 6, "train.ckpt_every": 6,
                           "data.split": "train", "train.eval_every": 3, "train.eval_cells": 16,
                           "train.epochs": 20})
    ctx, _ = local_context(tmp_path / "run")
    run_worker(cfg, ctx)
    hist = read_part(tmp_path / "run" / "ckpt_6", "train_state.json")["history"]
    last = hist[-1]
    assert last["contrast_chance"] == pytest.approx(math.log(2 * 8 - 1))  # batches of 8 cells: 16 views
    assert 0 < last["contrast_loss"] < 2 * last["contrast_chance"]
    assert last["cells_seen"] == 6 * 8  # cells, not views
    assert last["val_loss"] is not None and last["val_loss"] > 0  # the held-out set: one view, MLM alone
    enc, cfg2, _ = load_checkpoint(tmp_path / "run" / "ckpt_6")
    assert cfg2.objective.contrast_weight == 1.0 and enc.has_contrast_head
    assert cfg2.objective.contrast_keep == (0.3, 1.0)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert enc.embed({"input_ids": ids, "attention_mask": ids != 0}, "mean").shape == (1, 32)
