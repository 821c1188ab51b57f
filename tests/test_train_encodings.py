"""The model, masking and objectives read the encoding's declarations: every encoding trains, the joint
gene + value loss and the next-token loss equal independent computations, and a causal model is
exactly causal on every attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atlasflow.loader.encodings import ENCODINGS, NAMES
from atlasflow.train.config import Config, MaskingConfig, ModelConfig
from atlasflow.train.masking import mask_batch, masking_generator, next_token_batch
from atlasflow.train.model import CellEncoder
from atlasflow.train.objective import PretrainObjective
from atlasflow.train.pack import model_inputs

from test_train_model import N_TOKENS, SMALL, contract_batch

GENE_END = N_TOKENS - 6  # the last 6 ids stand for an encoding's own tokens (UCE's chromosome tokens)


def with_extra_tokens(batch):
    """Put an "own" token (id >= GENE_END) in every cell: they must never be masked or pooled."""
    b = {k: v.clone() for k, v in batch.items()}
    ids = b["input_ids"]
    ids[ids >= GENE_END] = 4
    ids[:, 1] = GENE_END + 1
    return b


@pytest.mark.parametrize("tokenizer", NAMES)
def test_every_encoding_builds_its_heads_masks_only_genes_and_learns(tokenizer):
    enc_decl = ENCODINGS[tokenizer]
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, tokenizer, N_TOKENS, max_len=32, gene_end=GENE_END)
    assert hasattr(enc, "pos_emb") == enc_decl.positional
    assert hasattr(enc, "bin_emb") == (enc_decl.side == "bins")
    assert hasattr(enc, "value_proj") == (enc_decl.side == "values")
    assert set(enc.predict(torch.zeros(2, SMALL.d_model))) == set(enc_decl.targets)
    obj = PretrainObjective(enc)
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    batch = with_extra_tokens(contract_batch([12, 9, 7, 11], seed=1))
    m = mask_batch(batch, tokenizer, MaskingConfig(mask_prob=0.4), masking_generator(0, 0, 0, 0), N_TOKENS,
                   gene_end=GENE_END)
    ids = batch["input_ids"]
    assert m["mlm_mask"].any() and not m["mlm_mask"][(ids < 4) | (ids >= GENE_END)].any()
    if "gene" in enc_decl.targets:  # random replacements are genes, never an own token
        changed = m["input_ids"] != ids
        assert ((m["input_ids"][changed] < GENE_END)).all()
    inputs = model_inputs(m, pack=False)
    losses = []
    for _ in range(60):
        loss, _ = obj(inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (tokenizer, losses[0], losses[-1])


def test_rank_value_joint_loss_is_ce_plus_weighted_mse():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank_value", N_TOKENS, max_len=32).eval()
    batch = contract_batch([10, 8, 6], seed=2)
    m = mask_batch(batch, "rank_value", MaskingConfig(mask_prob=0.5), masking_generator(0, 0, 3, 0), N_TOKENS)
    sel = m["mlm_mask"]
    assert torch.equal(m["targets"][sel], batch["input_ids"][sel])
    assert torch.equal(m["value_targets"][sel], batch["values"][sel])
    assert (m["values"][sel] == MaskingConfig().mask_value).all()
    inputs = model_inputs(m, pack=False)
    with torch.no_grad():
        loss, stats = PretrainObjective(enc, value_weight=0.25)(inputs)
        h = enc(inputs)[sel]
        logits = h @ enc.gene_emb.weight.t() + enc.head_bias
        ce = F.cross_entropy(logits, batch["input_ids"][sel])
        mse = ((enc.head(h).squeeze(-1) - batch["values"][sel]) ** 2).mean()
    torch.testing.assert_close(loss, ce + 0.25 * mse)
    assert stats["value_mse"] == pytest.approx(float(mse), rel=1e-5)


def test_next_token_targets_and_loss():
    batch = contract_batch([6, 4], seed=4)
    nt = next_token_batch(batch)
    ids = batch["input_ids"]
    # positions 0..n-2 of each cell predict tokens 1..n-1 (<cls> -> first gene, last gene -> <eos>)
    assert nt["mlm_mask"].tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3]
    assert torch.equal(nt["targets"][0, :5], ids[0, 1:6]) and torch.equal(nt["targets"][1, :3], ids[1, 1:4])
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, causal=True).eval()
    inputs = model_inputs(nt, pack=False)
    with torch.no_grad():
        loss, _ = PretrainObjective(enc, "ntp")(inputs)
        h = enc(inputs)
        want = []
        for i, n in enumerate([6, 4]):
            logits = h[i, : n - 1] @ enc.gene_emb.weight.t() + enc.head_bias
            want.append(F.cross_entropy(logits, ids[i, 1:n], reduction="none"))
    torch.testing.assert_close(loss, torch.cat(want).mean())


@pytest.mark.parametrize("path", ["padded", "packed_sdpa", "varlen_reference"])
def test_causal_model_never_sees_later_tokens(path):
    """Changing a cell's tokens after position t leaves every output at <= t unchanged, on each
    attention path; and packed cells equal the same cells alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, attention="varlen" if path == "varlen_reference" else "sdpa")
    enc = CellEncoder(cfg, "rank", N_TOKENS, max_len=32, causal=True).eval()
    lengths = [12, 5, 9, 3]
    a = contract_batch(lengths, seed=5)
    b = {k: v.clone() for k, v in a.items()}
    t = 4
    b["input_ids"][0, t + 1: 11] = torch.randint(4, N_TOKENS, (11 - t - 1,))
    pack = path != "padded"
    with torch.no_grad():
        pa, pb = model_inputs(a, pack=pack), model_inputs(b, pack=pack)
        ha, hb = enc(pa), enc(pb)
        r, o = pa["cell_pos"][0].tolist()
        torch.testing.assert_close(ha[r, o:o + t + 1], hb[r, o:o + t + 1], atol=1e-6, rtol=0)
        assert (ha[r, o + t + 1:o + 12] - hb[r, o + t + 1:o + 12]).abs().max() > 1e-4  # the later ones do see it
        for i, m in enumerate(lengths):
            alone = {k: (v[i:i + 1, :m] if v.dim() == 2 else v[i:i + 1]) for k, v in a.items()}
            r, o = pa["cell_pos"][i].tolist()
            torch.testing.assert_close(ha[r, o:o + m], enc(model_inputs(alone, pack=False))[0], atol=2e-5, rtol=1e-4)


def test_causal_cls_pooling_is_the_last_token_and_mean_skips_own_tokens():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "uce", N_TOKENS, max_len=64, causal=True, gene_end=GENE_END).eval()
    batch = with_extra_tokens(contract_batch([7, 5], seed=6))
    inputs = model_inputs(batch, pack=False)
    with torch.no_grad():
        h = enc(inputs)
        cls = enc.embed(batch, pooling="cls")
        mean = enc.embed(batch, pooling="mean")
    torch.testing.assert_close(cls, torch.stack([h[0, 6], h[1, 4]]))
    ids = batch["input_ids"]
    for i, n in enumerate([7, 5]):
        genes = (ids[i, :n] >= 4) & (ids[i, :n] < GENE_END)
        torch.testing.assert_close(mean[i], h[i, :n][genes].mean(0))


def test_ntp_needs_an_ordered_encoding():
    with pytest.raises(ValueError, match="next-token prediction"):
        CellEncoder(SMALL, "bin", N_TOKENS, max_len=32, causal=True)
    with pytest.raises(ValueError, match="objective.kind"):
        Config().with_overrides({"objective.kind": "clm"})
    with pytest.raises(ValueError, match="objective.kind: ntp needs an ordered encoding"):
        Config().with_overrides({"objective.kind": "ntp", "data.tokenizer": "value"})
    with pytest.raises(ValueError, match="data.max_len"):
        Config().with_overrides({"data.tokenizer": "uce", "data.max_len": 32})


def test_rank_mean_pooling_weighs_genes_by_their_rank_and_needs_a_ranked_encoding():
    import numpy as np

    torch.manual_seed(0)
    lengths = [9, 6, 12]
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32, gene_end=GENE_END).eval()
    batch = with_extra_tokens(contract_batch(lengths, seed=7))  # an own token at position 1 of every cell
    with torch.no_grad():
        h = enc(model_inputs(batch, pack=False)).double().numpy()
        got = enc.embed(batch, pooling="rank_mean").double().numpy()
    ids = batch["input_ids"].numpy()
    for i, n in enumerate(lengths):
        pos = [t for t in range(n) if 4 <= ids[i, t] < GENE_END]  # genes only: <cls>, <eos>, own token out
        w = 1.0 / np.sqrt(np.arange(1, len(pos) + 1))  # the first gene is rank 1
        np.testing.assert_allclose(got[i], (w[:, None] * h[i, pos]).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    for name in ("bin", "value", "uce"):
        with pytest.raises(ValueError, match="rank_mean"):
            CellEncoder(SMALL, name, N_TOKENS, max_len=32).embed(batch, pooling="rank_mean")


@pytest.mark.parametrize("tokenizer,causal", [("rank", False), ("uce", True)])
def test_embed_poolings_is_the_encoders_own_pooling(tokenizer, causal):
    """The evaluation's one-pass embedding of several poolings equals ``CellEncoder.embed`` per pooling
    (it used to take <cls> for a causal model and count an encoding's own tokens in the mean)."""
    import numpy as np

    from atlasflow.loader.tokenize import TokenBlock
    from atlasflow.train.tasks.pretrained import PretrainedModel

    torch.manual_seed(0)
    enc = CellEncoder(SMALL, tokenizer, N_TOKENS, max_len=32, causal=causal, gene_end=GENE_END).eval()
    lengths = [9, 6, 12]
    batch = with_extra_tokens(contract_batch(lengths, seed=8))
    ids = batch["input_ids"].numpy()
    block = TokenBlock(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       np.concatenate([ids[i, :n] for i, n in enumerate(lengths)]).astype(np.int32),
                       np.arange(3, dtype=np.int64))
    model = PretrainedModel.__new__(PretrainedModel)
    model.encoder = enc
    pools = ("cls", "mean") + (("rank_mean",) if tokenizer == "rank" else ())
    got = model.embed_poolings(block, pools)
    for p in pools:
        torch.testing.assert_close(torch.from_numpy(got[p]), enc.embed(batch, pooling=p), rtol=1e-5, atol=1e-6)
