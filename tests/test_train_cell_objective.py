"""The cell term of pretraining (``objective.cell_weight``): its loss equals an independent computation on
padded and packed batches, it trains the very vector ``mean`` pooling embeds, its baseline equals a numpy
computation, and a run with it logs both, checkpoints the cell head and loads for embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.train.checkpoint import load_checkpoint, read_part
from atlasflow.train.config import MaskingConfig, ObjectiveConfig
from atlasflow.train.masking import mask_batch, masking_generator
from atlasflow.train.model import CellEncoder, mean_pool_cells
from atlasflow.train.objective import PretrainObjective
from atlasflow.train.pack import model_inputs
from atlasflow.train.signals import Baselines, cell_baseline

from test_train_loop import config, local_context, store  # noqa: F401  (the module's store fixture)
from test_train_model import N_TOKENS, SMALL, contract_batch

LENGTHS = [12, 9, 7, 11, 5]


def _by_hand(enc: CellEncoder, hidden_rows: list[torch.Tensor], gene_sets: list[torch.Tensor]) -> torch.Tensor:
    """Per cell: mean of its gene tokens' states, logits over genes 4..n_tokens, mean NLL of its genes."""
    losses = []
    for h, genes in zip(hidden_rows, gene_sets):
        c = h.mean(0)
        logits = enc.cell_proj(c) @ enc.gene_emb.weight[4:].t() + enc.cell_bias
        logp = torch.log_softmax(logits.double(), -1)
        losses.append(-logp[genes - 4].mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("tokenizer", ["rank", "bin"])
@pytest.mark.parametrize("pack", [False, True])
def test_cell_loss_equals_an_independent_computation(tokenizer, pack):
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, tokenizer, N_TOKENS, max_len=32, cell_head=True).eval()
    torch.nn.init.normal_(enc.cell_bias, std=0.5)  # a non-zero bias must enter the logits
    batch = contract_batch(LENGTHS, seed=3)
    m = mask_batch(batch, tokenizer, MaskingConfig(mask_prob=0.4), masking_generator(0, 0, 1, 0), N_TOKENS)
    inputs = model_inputs(m, pack=pack, row_len=20 if pack else None)
    if pack:
        assert inputs["segment_ids"].amax() > 1  # several cells share a row
    obj = PretrainObjective(enc, cell_weight=0.7)
    with torch.no_grad():
        loss, stats = obj(inputs)
        hidden = enc(inputs)
    # each cell's states and its ORIGINAL genes (masked or replaced ones included), read from the batch
    rows, genes = [], []
    for i, n in enumerate(LENGTHS):
        r, off = inputs["cell_pos"][i].tolist()
        rows.append(hidden[r, off + 1:off + n - 1])  # between <cls> and <eos>
        genes.append(batch["input_ids"][i, 1:n - 1])
    want = _by_hand(enc, rows, genes)
    assert stats["cell_loss"] == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(loss) == pytest.approx(stats["mlm_loss"] + 0.7 * stats["cell_loss"], rel=1e-5)


def test_the_cell_vector_is_what_mean_pooling_embeds():
    torch.manual_seed(1)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, cell_head=True).eval()
    batch = contract_batch(LENGTHS, seed=4)
    inputs = model_inputs(batch, pack=False)
    with torch.no_grad():
        h = enc(inputs)
        ids = inputs["input_ids"]
        cells, cid = mean_pool_cells(h, inputs["segment_ids"], (ids >= 4) & (ids < enc.gene_end))
        torch.testing.assert_close(cells, enc.pool(h, inputs, "mean"))
        torch.testing.assert_close(cells, enc.embed(batch, "mean"))
    assert cid[0, 0] == 0 and cid[4, 0] == 4 and (cid[4, LENGTHS[4]:] == -1).all()


def test_cell_term_trains_the_head_and_is_validated():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, cell_head=True)
    obj = PretrainObjective(enc, cell_weight=1.0)
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    m = mask_batch(contract_batch(LENGTHS, seed=5), "rank", MaskingConfig(), masking_generator(0, 0, 0, 0), N_TOKENS)
    inputs = model_inputs(m, pack=False)
    first = None
    for _ in range(60):
        loss, stats = obj(inputs)
        first = stats["cell_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert enc.cell_proj.weight.grad is not None and enc.cell_bias.grad.abs().sum() > 0
    assert stats["cell_loss"] < 0.6 * first  # five cells' gene sets: learnable from their own vectors
    with pytest.raises(ValueError, match="cell_head"):
        PretrainObjective(CellEncoder(SMALL, "rank", N_TOKENS, max_len=32), cell_weight=1.0)
    with pytest.raises(ValueError, match="objective.cell_weight"):
        ObjectiveConfig(cell_weight=-1.0)
    plain = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32)
    assert not hasattr(plain, "cell_proj")  # off by default: checkpoints without the head are unchanged
    _, stats = PretrainObjective(plain)(inputs)
    assert "cell_loss" not in stats and stats["mlm_loss"] > 0


def test_cell_baseline_matches_numpy():
    g = np.random.default_rng(0)
    uni = torch.log(torch.tensor(g.dirichlet(np.ones(N_TOKENS))))  # over every token, specials included
    base = Baselines("rank", uni, torch.zeros(3, N_TOKENS), {})
    batch = contract_batch(LENGTHS, seed=6)
    for pack in (False, True):
        inputs = model_inputs(batch, pack=pack, row_len=20 if pack else None)
        got = cell_baseline(base, inputs["input_ids"], inputs["segment_ids"], N_TOKENS)
        p = np.exp(uni.numpy()[4:])
        p = p / p.sum()
        want = np.mean([-np.log(p[batch["input_ids"][i, 1:n - 1].numpy() - 4]).mean() for i, n in enumerate(LENGTHS)])
        assert got == pytest.approx(want, rel=1e-9)
    assert cell_baseline(Baselines("bin", uni, uni, {}), inputs["input_ids"], inputs["segment_ids"], N_TOKENS) is None


def test_a_run_with_the_cell_term_logs_it_and_its_checkpoint_embeds(store, tmp_path):  # noqa: F811
    from atlasflow.train.loop import run_worker

    runs = {}
    for w in (0.0, 1.0):
        cfg = config(store, **{"objective.cell_weight": w, "train.max_steps": 6, "train.ckpt_every": 6})
        ctx, _ = local_context(tmp_path / f"run{w}")
        run_worker(cfg, ctx)
        runs[w] = read_part(tmp_path / f"run{w}" / "ckpt_6", "train_state.json")["history"]  # every logged step
    last = runs[1.0][-1]
    assert last["cell_loss"] > 0 and last["cell_unigram_loss"] > 0
    assert "cell_loss" not in runs[0.0][-1]
    # "loss" is the MLM term alone, the one its unigram baselines describe: at step 1 (same seed, same
    # weights apart from the cell head, same batch and masks) it equals the run without the cell term
    first = {w: next(r for r in rs if r["step"] == 1) for w, rs in runs.items()}
    assert first[1.0]["loss"] == pytest.approx(first[0.0]["loss"], rel=1e-6)
    assert first[1.0]["unigram_loss"] == pytest.approx(first[0.0]["unigram_loss"], rel=1e-9)
    assert first[1.0]["cell_loss"] == pytest.approx(first[1.0]["cell_unigram_loss"], rel=0.2)  # untrained: ~baseline
    enc, cfg2, _ = load_checkpoint(tmp_path / "run1.0" / "ckpt_6")
    assert cfg2.objective.cell_weight == 1.0 and enc.has_cell_head
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    batch = {"input_ids": ids, "attention_mask": ids != 0}
    assert enc.embed(batch, "mean").shape == (1, 32)
