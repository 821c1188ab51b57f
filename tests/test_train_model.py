"""Encoder, packing, masking, objective and checkpoint format (no Ray, CPU, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from atlasflow.train.checkpoint import load_checkpoint, read_part, save_checkpoint
from atlasflow.train.config import Config, MaskingConfig, ModelConfig
from atlasflow.train.masking import mask_batch, masking_generator
from atlasflow.train.model import CellEncoder, _cu_seqlens
from atlasflow.train.objective import MLMObjective
from atlasflow.train.pack import first_fit_decreasing, model_inputs, pack_row_len, pad_fraction

N_TOKENS = 40
SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64)


def contract_batch(lengths, n_tokens=N_TOKENS, seed=0, n_bins=51):
    """A batch shaped like the loader contract: <cls> genes... <eos>, padded to the longest cell."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    ids = torch.zeros(b, n, dtype=torch.long)
    bins = torch.zeros(b, n, dtype=torch.long)
    vals = torch.zeros(b, n)
    for i, m in enumerate(lengths):
        ids[i, 0], ids[i, m - 1] = 2, 3
        ids[i, 1:m - 1] = torch.randperm(n_tokens - 4, generator=g)[:m - 2] + 4
        # expression is a function of the gene: learnable from the visible gene identity
        bins[i, 1:m - 1] = ids[i, 1:m - 1] % (n_bins - 1) + 1
        vals[i, 1:m - 1] = (ids[i, 1:m - 1] % 7).float() / 2
    return {"soma_joinid": torch.arange(100, 100 + b), "input_ids": ids, "attention_mask": ids != 0,
            "lengths": torch.tensor(lengths), "bins": bins, "values": vals}


def test_first_fit_decreasing_places_by_hand():
    # rows of 10: 8 -> row0@0; 6 -> row1@0; 4 -> row1@6; 2 -> row0@8; 3 -> row2@0
    assert first_fit_decreasing([2, 8, 4, 6, 3], 10) == [(0, 8), (0, 0), (1, 6), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="max_len"):
        first_fit_decreasing([11], 10)


def test_packed_tokens_positions_segments():
    batch = contract_batch([6, 3, 5, 4])
    p = model_inputs(batch, pack=True, row_len=10)
    # FFD: 6 -> r0@0, 5 -> r1@0, 4 -> r0@6, 3 -> r1@5
    assert p["cell_pos"].tolist() == [[0, 0], [1, 5], [1, 0], [0, 6]]
    assert p["input_ids"].shape == (2, 10)
    for i, (r, o) in enumerate(p["cell_pos"].tolist()):
        m = int(batch["lengths"][i])
        assert torch.equal(p["input_ids"][r, o:o + m], batch["input_ids"][i, :m])
        assert torch.equal(p["bins"][r, o:o + m], batch["bins"][i, :m])
        assert p["position_ids"][r, o:o + m].tolist() == list(range(m))
    assert p["segment_ids"].tolist() == [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [0] * 2]
    assert pad_fraction(p) == pytest.approx(1 - 18 / 20)
    u = model_inputs(batch, pack=False)
    assert pad_fraction(u) == pytest.approx(1 - 18 / 24)
    assert pad_fraction(model_inputs(batch, pack=False, pad_to=32)) == pytest.approx(1 - 18 / 128)


@pytest.mark.parametrize("tokenizer", ["rank", "bin", "value"])
def test_packed_equals_padded_equals_alone(tokenizer):
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, tokenizer, N_TOKENS, max_len=32).eval()
    lengths = [12, 3, 7, 9, 5]
    batch = contract_batch(lengths)
    with torch.no_grad():
        hp = enc(model_inputs(batch, pack=True, row_len=16))
        hu = enc(model_inputs(batch, pack=False))
        hm = enc(model_inputs(batch, pack=False, pad_to=32))
        cp = model_inputs(batch, pack=True, row_len=16)["cell_pos"].tolist()
        for i, m in enumerate(lengths):
            alone = {k: (v[i:i + 1, :m] if v.dim() == 2 else v[i:i + 1]) for k, v in batch.items()}
            ha = enc(model_inputs(alone, pack=False))[0]
            r, o = cp[i]
            torch.testing.assert_close(hp[r, o:o + m], ha, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(hu[i, :m], ha, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(hm[i, :m], ha, atol=2e-5, rtol=1e-4)


def test_no_attention_leak_between_packed_cells_or_from_padding():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32).eval()
    batch = contract_batch([6, 4])
    p = model_inputs(batch, pack=True, row_len=12)  # both in row 0: cell0 @0..5, cell1 @6..9, pad 10..11
    q = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in p.items()}
    q["input_ids"][0, 7:9] = torch.tensor([30, 31])  # change cell 1's genes
    q["input_ids"][0, 10:] = 17  # garbage in the padding
    with torch.no_grad():
        a, b = enc(p), enc(q)
    torch.testing.assert_close(a[0, :6], b[0, :6], atol=0, rtol=0)  # cell 0 unaffected
    assert not torch.allclose(a[0, 6:10], b[0, 6:10])  # the change itself is seen by cell 1


def test_masking_rules_and_determinism():
    batch = contract_batch([40] * 64, n_tokens=1000)
    cfg = MaskingConfig(mask_prob=0.15, replace_prob=0.8, random_prob=0.1)
    m = mask_batch(batch, "rank", cfg, masking_generator(0, 0, 1, 0), n_tokens=1000)
    ids, sel = batch["input_ids"], m["mlm_mask"]
    assert not sel[ids < 4].any()  # specials and pad never selected
    n_genes = int((ids >= 4).sum())
    assert abs(int(sel.sum()) / n_genes - 0.15) < 0.02
    assert torch.equal(m["targets"][sel], ids[sel])
    assert torch.equal(m["input_ids"][~sel], ids[~sel])
    frac_mask = float((m["input_ids"][sel] == 1).float().mean())
    frac_kept = float((m["input_ids"][sel] == ids[sel]).float().mean())
    assert abs(frac_mask - 0.8) < 0.05 and abs(frac_kept - 0.1) < 0.04
    again = mask_batch(batch, "rank", cfg, masking_generator(0, 0, 1, 0), n_tokens=1000)
    other = mask_batch(batch, "rank", cfg, masking_generator(0, 0, 2, 0), n_tokens=1000)
    assert torch.equal(again["input_ids"], m["input_ids"]) and torch.equal(again["mlm_mask"], sel)
    assert not torch.equal(other["mlm_mask"], sel)
    b = mask_batch(batch, "bin", cfg, masking_generator(0, 0, 1, 0), n_tokens=1000, n_bins=51)
    assert (b["bins"][b["mlm_mask"]] == 51).all() and torch.equal(b["targets"], batch["bins"])
    assert torch.equal(b["input_ids"], ids)  # gene identity stays visible
    v = mask_batch(batch, "value", cfg, masking_generator(0, 0, 1, 0), n_tokens=1000)
    assert (v["values"][v["mlm_mask"]] == -1.0).all()
    assert torch.equal(v["values"][~v["mlm_mask"]], batch["values"][~v["mlm_mask"]])


def test_rank_loss_is_cross_entropy_over_masked_tokens_only():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32).eval()
    batch = mask_batch(contract_batch([10, 6, 8]), "rank", MaskingConfig(mask_prob=0.4),
                       masking_generator(1, 0, 0, 0), N_TOKENS)
    inputs = model_inputs(batch, pack=True, row_len=16)
    loss, stats = MLMObjective(enc)(inputs)
    # independent: per-token log-softmax over the tied embedding, averaged by hand over masked tokens
    h = enc(inputs)
    total, count = 0.0, 0
    for r in range(h.shape[0]):
        for c in range(h.shape[1]):
            if inputs["mlm_mask"][r, c]:
                logits = h[r, c] @ enc.gene_emb.weight.t() + enc.head_bias
                total += -torch.log_softmax(logits, -1)[inputs["targets"][r, c]].item()
                count += 1
    assert stats["n_masked"] == count == int(batch["mlm_mask"].sum()) > 0
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("tokenizer", ["rank", "bin", "value"])
def test_objective_learns_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, tokenizer, N_TOKENS, max_len=32)
    obj = MLMObjective(enc)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-2)
    batch = contract_batch([14, 9, 12, 7])
    losses = []
    for _ in range(25):
        m = mask_batch(batch, tokenizer, MaskingConfig(mask_prob=0.3), masking_generator(0, 0, 0, 0), N_TOKENS)  # fixed mask: overfit
        loss, _ = obj(model_inputs(m, pack=True, row_len=16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_zero_masked_tokens_gives_zero_loss_with_grads_on_every_parameter():
    enc = CellEncoder(SMALL, "bin", N_TOKENS, max_len=32)
    batch = contract_batch([5, 4])
    batch["mlm_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    batch["targets"] = batch["bins"]
    loss, stats = MLMObjective(enc)(model_inputs(batch, pack=False))
    loss.backward()
    assert loss.item() == 0.0 and stats["n_masked"] == 0
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []


def test_embed_pooling_shapes_and_cls_vs_mean():
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32).eval()
    batch = contract_batch([6, 4, 9])
    cls, mean = enc.embed(batch, "cls"), enc.embed(batch, "mean")
    assert cls.shape == mean.shape == (3, 32)
    h = enc(model_inputs(batch, pack=False))
    torch.testing.assert_close(mean[1], h[1, 1:3].mean(0))  # genes of cell 1 are positions 1..2
    with pytest.raises(ValueError, match="pooling"):
        enc.embed(batch, "max")


def _vocab():
    from atlasflow.loader import Vocab

    return Vocab(list(range(N_TOKENS - 4)), [f"ENSG{i:011d}" for i in range(N_TOKENS - 4)])


def _save(tmp_path, enc, cfg):
    return save_checkpoint(tmp_path / "ck", model_state=enc.state_dict(), config=cfg,
                           vocab=_vocab().to_dict(),
                           model_meta={"tokenizer": "rank", "n_tokens": N_TOKENS, "max_len": 32, "n_bins": 51},
                           train_state={"step": 7}, loader_state={"position": 4})


def test_checkpoint_roundtrip_and_safety(tmp_path):
    torch.manual_seed(0)
    cfg = Config(model=SMALL)
    enc = CellEncoder(SMALL, "rank", N_TOKENS, max_len=32).eval()
    path = _save(tmp_path, enc, cfg)
    loaded, cfg2, vocab = load_checkpoint(path)
    assert cfg2 == cfg and vocab.gene_feature_ids == _vocab().gene_feature_ids
    assert len(vocab) == N_TOKENS == loaded.n_tokens
    batch = contract_batch([6, 4])
    torch.testing.assert_close(loaded.embed(batch), enc.embed(batch), atol=0, rtol=0)
    assert read_part(path, "loader.pt") == {"position": 4}
    assert read_part(path, "train_state.json") == {"step": 7}
    with pytest.raises(KeyError, match="optimizer.pt"):
        read_part(path, "optimizer.pt")
    # arbitrary pickles are refused (weights_only=True)
    torch.save({"evil": Config()}, path / "model.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
    meta = json.loads((path / "format.json").read_text())
    meta["format_version"] = 99
    (path / "format.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(path)
    (path / "format.json").unlink()
    with pytest.raises(FileNotFoundError, match="format.json"):
        load_checkpoint(path)


def test_cu_seqlens_for_the_varlen_kernel():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [1, 2, 3, 3, 3, 3]])
    cu, max_len = _cu_seqlens(seg)
    # cells in row-major order of real tokens: 3, 2 | 4 | 1, 1, 4
    assert cu.tolist() == [0, 3, 5, 9, 10, 11, 15] and max_len == 4 and cu.dtype == torch.int32


def _dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """Independent varlen kernel on CPU: dense softmax attention with an explicit block mask from cu."""
    cell = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff().long())
    scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(cell[None, :, None] != cell[None, None, :], float("-inf"))
    assert max_q == max_k == int(cu_q.diff().max()) and torch.equal(cu_q, cu_k)
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("path", ["auto", "varlen_reference", "varlen_kernel"])
def test_packed_paths_equal_each_cell_alone(path, monkeypatch):
    """Every attention path for packed rows gives each cell the output it gets alone."""
    from atlasflow.train import model as model_mod

    torch.manual_seed(0)
    attention = "auto" if path == "auto" else "varlen"
    if path == "varlen_kernel":  # the CUDA kernel's plumbing (flatten, cu_seqlens, scatter back), on CPU
        monkeypatch.setattr(model_mod, "varlen_kernel", lambda x, causal=False: _dense_varlen)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, attention=attention)
    enc = CellEncoder(cfg, "rank", N_TOKENS, max_len=32).eval()
    lengths = [12, 3, 7, 9, 5, 2, 11]
    batch = contract_batch(lengths, seed=3)
    p = model_inputs(batch, pack=True)  # default rows: just above the longest cell
    assert p["segment_ids"].shape[0] < len(lengths) and p["segment_ids"].max() > 1  # really packed
    with torch.no_grad():
        hp = enc(p)
        for i, m in enumerate(lengths):
            alone = {k: (v[i:i + 1, :m] if v.dim() == 2 else v[i:i + 1]) for k, v in batch.items()}
            r, o = p["cell_pos"][i].tolist()
            torch.testing.assert_close(hp[r, o:o + m], enc(model_inputs(alone, pack=False))[0], atol=2e-5, rtol=1e-4)
    assert (hp[p["segment_ids"] == 0] == 0).all() or path == "auto"  # varlen leaves pad slots at zero


def test_block_diagonal_path_gradients_ignore_padding_and_other_cells():
    torch.manual_seed(0)
    enc = CellEncoder(SMALL, "value", N_TOKENS, max_len=32)
    batch = mask_batch(contract_batch([6, 4, 5]), "value", MaskingConfig(mask_prob=0.5),
                       masking_generator(0, 0, 0, 0), N_TOKENS)
    p = model_inputs(batch, pack=True, row_len=16)  # first-fit: 6 @0, 5 @6, 4 @11, one pad slot
    assert p["segment_ids"].shape[0] == 1 and int((p["segment_ids"] == 0).sum()) == 1
    vals = p["values"].clone().requires_grad_(True)
    loss, _ = MLMObjective(enc)({**p, "values": vals})
    loss.backward()
    assert vals.grad[p["segment_ids"] == 0].abs().sum() == 0  # the pad slot influences nothing
    # only cell 1 (segment 2) carries masked targets -> its loss never depends on the other cells' inputs
    q = {**p, "mlm_mask": p["mlm_mask"] & (p["segment_ids"] == 2)}
    vals2 = p["values"].clone().requires_grad_(True)
    loss2, _ = MLMObjective(enc)({**q, "values": vals2})
    loss2.backward()
    assert vals2.grad[(p["segment_ids"] != 2)].abs().sum() == 0 and vals2.grad.abs().sum() > 0


def test_cu_seqlens_equals_an_independent_computation_from_the_packing():
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        lengths = (torch.randint(2, 30, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)).tolist()
        p = model_inputs(contract_batch(lengths, n_tokens=64, seed=trial), pack=True)
        cu, max_len = _cu_seqlens(p["segment_ids"])
        # independent: cells ordered by (row, offset) of their first token, lengths accumulated
        order = sorted(range(len(lengths)), key=lambda i: tuple(p["cell_pos"][i].tolist()))
        want = [0]
        for i in order:
            want.append(want[-1] + lengths[i])
        assert cu.tolist() == want and max_len == max(lengths)


def test_pack_row_len_by_hand_and_bounds():
    # longest 10: rows of 10 hold 10 | 6 | 5 (30 slots); rows of 11 hold 10 | 6+5 (22 slots)
    assert pack_row_len([10, 6, 5]) == 11
    assert pack_row_len([8, 8, 8]) == 8  # nothing to gain from longer rows: the shortest wins ties
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 500, (32,), generator=g).tolist()
        n = pack_row_len(lengths)
        assert max(lengths) <= n <= -(-max(lengths) * 40 // 32)
        rows = max(r for r, _ in first_fit_decreasing(lengths, n)) + 1
        base = max(r for r, _ in first_fit_decreasing(lengths, max(lengths))) + 1
        assert rows * n <= base * max(lengths)


def test_varlen_kernel_only_for_cuda_half_precision():
    from atlasflow.train.model import varlen_kernel

    x = torch.zeros(2, 3)
    assert varlen_kernel(x) is None and varlen_kernel(x.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert varlen_kernel(x) is None


def test_fsdp_wraps_each_block():
    from atlasflow.train.runtime import parallel_kwargs
    from atlasflow.train.model import Block

    assert parallel_kwargs("ddp") is None
    kw = parallel_kwargs("fsdp")
    assert kw["use_orig_params"] is True and kw["auto_wrap_policy"]._module_classes == {Block}
