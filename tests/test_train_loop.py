"""The training loop without Ray (world size 1): real store, real loader, real torch.

A run that fails at step k and restarts from its last checkpoint ends bitwise identical to an
uninterrupted run, and consumes exactly the loader's own sequence of cells.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import numpy as np
import torch

from atlasflow.loader.batching import collate
from atlasflow.loader.encodings import ENCODINGS

from atlasflow.store import open_store
from atlasflow.train.checkpoint import load_checkpoint, read_part
from atlasflow.train.config import load_preset
from atlasflow.train.loop import InjectedFailure, loader_config, run_worker
from atlasflow.train.runtime import WorkerContext

loader_mod = pytest.importorskip("atlasflow.loader")
if not hasattr(loader_mod, "make_loader"):
    pytest.skip("atlasflow.loader.make_loader not available yet", allow_module_level=True)


def make_store(path: Path, n_cells: int, n_genes: int = 300, seed: int = 0) -> str:
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats

    synthesize(str(path), n_cells, n_genes, 2, seed, layout="store")
    compute_gene_stats(str(path))
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("train_loop") / "store", n_cells=72)


def local_context(root: Path):
    """A WorkerContext keeping checkpoints in root/ckpt_<step> (what Ray Train does with storage_path)."""
    root.mkdir(parents=True, exist_ok=True)
    reports: list[dict] = []

    @contextlib.contextmanager
    def restore():
        ckpts = sorted(root.glob("ckpt_*"), key=lambda p: int(p.name[5:]))
        yield ckpts[-1] if ckpts else None

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if ckpt_dir:
            shutil.copytree(ckpt_dir, root / f"ckpt_{metrics['step']}")

    return WorkerContext(0, 1, torch.device("cpu"), restore, report), reports


def config(store: str, **over):
    base = {"data.store": store, "data.batch_size": 8, "data.max_len": 64, "train.max_steps": 12, "train.epochs": 2,
            "train.ckpt_every": 2, "run.num_workers": 1, "model.d_model": 32, "model.d_ff": 64}
    return load_preset("debug").with_overrides({**base, **over})


def expected_joinids(cfg, epochs) -> list[tuple[int, int, list[int]]]:
    """The loader's own sequence, read independently of the training loop."""
    loader = loader_mod.make_loader(cfg.data.store, loader_config(cfg, 0, 1))
    out = []
    for e in range(epochs):
        loader.dataset.set_epoch(e)
        for i, b in enumerate(loader):
            out.append((e, i + 1, b["soma_joinid"].tolist()))
    return out


def test_failure_and_restart_is_exact(store, tmp_path):
    cfg = config(store, **{"data.pack": True})  # packed rows, block-diagonal attention on CPU
    ctx, reports = local_context(tmp_path / "a")
    st = run_worker(cfg, ctx)
    assert st["step"] == 12
    assert [r["step"] for r in reports] == list(range(2, 13, 2))  # Ray reports only with checkpoints ...
    history = read_part(tmp_path / "a" / "ckpt_12", "train_state.json")["history"]
    assert [h["step"] for h in history] == list(range(1, 13))  # ... metrics are logged every step
    # fails right after the last step of epoch 0 (9 batches of 8 cells): resume crosses the boundary
    bad = config(store, **{"run.fail_at_step": 9, "run.trace_dir": str(tmp_path / "trace"), "data.pack": True})
    ctx, _ = local_context(tmp_path / "b")
    with pytest.raises(InjectedFailure):
        run_worker(bad, ctx)
    ctx, _ = local_context(tmp_path / "b")
    st_b = run_worker(bad, ctx)  # restart: restores step 8, replays 9, does not fail again
    assert st_b["step"] == 12 and st_b["cells_seen"] == st["cells_seen"]
    a, b = read_part(tmp_path / "a" / "ckpt_12", "model.pt"), read_part(tmp_path / "b" / "ckpt_12", "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = read_part(tmp_path / "a" / "ckpt_12", "optimizer.pt")["state"]
    ob = read_part(tmp_path / "b" / "ckpt_12", "optimizer.pt")["state"]
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)

    recs = [json.loads(x) for x in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    attempts = list(dict.fromkeys(r["attempt"] for r in recs))
    assert len(attempts) == 2
    second = [r for r in recs if r["attempt"] == attempts[1]]
    assert second[0]["resumed_from"] == 8 and (second[0]["epoch"], second[0]["micro"]) == (0, 9)
    final = {}
    for r in recs:  # the last attempt's record of each (epoch, micro-batch) is the one that counts
        final[(r["epoch"], r["micro"])] = r["joinids"]
    first = {(r["epoch"], r["micro"]): r["joinids"] for r in recs if r["attempt"] == attempts[0]}
    for key, ids in final.items():  # replayed batches are the very same cells
        if key in first:
            assert first[key] == ids
    pinned = read_part(tmp_path / "b" / "ckpt_12", "config.json")["data"]["timestamp_ms"]
    assert pinned == read_part(tmp_path / "b" / "ckpt_4", "config.json")["data"]["timestamp_ms"]
    expected = expected_joinids(cfg.with_overrides({"data.timestamp_ms": pinned}), 2)
    want = [(e, m, ids) for e, m, ids in expected if (e, m) in final]
    assert len(want) == len(final) == 12
    assert [final[(e, m)] for e, m, _ in want] == [ids for _, _, ids in want]
    epoch0 = [j for (e, _), ids in final.items() if e == 0 for j in ids]
    assert len(epoch0) == len(set(epoch0))  # no cell twice within the epoch ...
    assert set(epoch0) == {j for e, _, ids in expected if e == 0 for j in ids}  # ... and none skipped


def test_checkpoint_loads_for_embedding(store, tmp_path):
    cfg = config(store, **{"train.max_steps": 2})
    ctx, _ = local_context(tmp_path / "run")
    run_worker(cfg, ctx)
    enc, cfg2, vocab = load_checkpoint(tmp_path / "run" / "ckpt_2")
    assert cfg2.data.timestamp_ms > 0  # the snapshot the run pinned travels with the checkpoint
    assert cfg2 == cfg.with_overrides({"data.timestamp_ms": cfg2.data.timestamp_ms})
    assert isinstance(vocab, loader_mod.Vocab) and vocab.expressed_only
    stats = open_store(store).gene_stats()
    assert list(vocab.gene_joinids) == stats.index[stats["nnz"] > 0].tolist()  # exactly the expressed genes
    med = stats["nonzero_median"].reindex(vocab.gene_joinids).to_numpy()
    loader = loader_mod.make_loader(store, loader_config(cfg, 0, 1), vocab=vocab, gene_medians=med)
    loader.dataset.set_epoch(0)
    batch = next(iter(loader))
    emb = enc.embed(batch)
    assert emb.shape == (batch["soma_joinid"].shape[0], 32) and torch.isfinite(emb).all()
    assert enc.n_tokens == 4 + len(vocab.gene_joinids) == 4 + int((stats["nnz"] > 0).sum())


def test_a_checkpoint_from_before_elastic_resume_is_refused_by_name(store, tmp_path):
    cfg = config(store, **{"train.max_steps": 2})
    ctx, _ = local_context(tmp_path / "run")
    run_worker(cfg, ctx)
    # what a version-1 checkpoint holds: per-rank loader parts, no loader.pt
    ck = tmp_path / "run" / "ckpt_2"
    meta = json.loads((ck / "format.json").read_text())
    meta["parts"] = [p if p != "loader.pt" else "loader_rank0.pt" for p in meta["parts"]]
    meta["format_version"] = 1
    (ck / "format.json").write_text(json.dumps(meta))
    ctx, _ = local_context(tmp_path / "run")
    with pytest.raises(ValueError, match="before elastic resume"):
        run_worker(config(store, **{"train.max_steps": 4}), ctx)
    enc, _, _ = load_checkpoint(ck)  # its weights still load (embed / fine-tune)
    assert enc.n_tokens > 4


@pytest.mark.parametrize("tokenizer,objective", [("bin", "mlm"), ("value", "mlm"), ("ebin", "mlm"),
                                                 ("rank_value", "mlm"), ("uce", "mlm"), ("rank", "ntp"),
                                                 ("uce", "ntp"), ("rank", "mlm+meta")])
def test_other_encodings_and_objectives_train_from_the_loader(store, tmp_path, tokenizer, objective):
    meta = objective.endswith("+meta")
    objective = objective.removesuffix("+meta")
    cfg = config(store, **{"data.tokenizer": tokenizer, "objective.kind": objective, "train.max_steps": 3,
                           "train.ckpt_every": 3, "optim.grad_accum": 2,
                           "data.meta_columns": ["dataset_id"] if meta else []})
    ctx, reports = local_context(tmp_path / "run")
    st = run_worker(cfg, ctx)
    assert st["step"] == 3 and st["micro_in_epoch"] == 6  # 3 optimizer steps x 2 accumulated batches
    for r in reports:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0
        assert r["unigram_loss"] is not None and torch.isfinite(torch.tensor(r["unigram_loss"]))
    enc, _, vocab = load_checkpoint(tmp_path / "run" / "ckpt_3")
    assert enc.tokenizer == tokenizer and enc.causal == (objective == "ntp")
    extra = len(ENCODINGS[tokenizer].extra_tokens)
    n_meta = 3 if meta else 0  # <unk:dataset_id> + the store's 2 datasets
    assert enc.gene_end == 4 + len(vocab.gene_joinids) and enc.n_tokens == enc.gene_end + extra + n_meta
    if meta:
        from atlasflow.train.tasks.pretrained import PretrainedModel

        for mode, n_prefix in (("keep", 1), ("drop", 0)):
            m = PretrainedModel(str(tmp_path / "run" / "ckpt_3"), meta_tokens=mode)
            tok, _ = m.tokenizer_for(vocab.gene_feature_ids[:20])
            blk = tok(np.array([0, 3]), np.array([0, 1, 2], dtype=np.int32), np.array([1, 2, 3], np.float32),
                      np.array([0]), 0)
            assert blk.lengths[0] == 2 + 3 + n_prefix  # <cls> (<unk:dataset_id>) 3 genes <eos>
            if n_prefix:
                assert blk.ids[1] == m.meta_vocab.base  # the column's <unk>
            assert m.encoder.embed(collate(blk, np.arange(1))).shape == (1, m.encoder.cfg.d_model)


def test_bench_smoke(store):
    from atlasflow.infra.bench.train import run

    out = run(store, max_len=64, batch_size=8, steps=2, live_workers=(0,))
    lay = out["layouts"]
    assert max(lay["packed"]["pad_fraction"], lay["bucketed"]["pad_fraction"]) < lay["pad_to_max_len"]["pad_fraction"]
    assert all(v["tokens_per_s"] > 0 for v in lay.values())
    assert 0 <= out["live"][0]["loader_wait_share"] <= 1


SIGNAL_KEYS = ("loss", "unigram_loss", "position_unigram_loss", "masked_accuracy", "val_loss")


def test_cpu_small_leaves_the_unigram_plateau(tmp_path):
    """A short real run of the cpu-small recipe (narrowed to fit a test) ends below its baselines,
    on the training stream and on the held-out datasets."""
    from atlasflow.ingest.synth import synthesize
    from atlasflow.loader.split import split_of
    from atlasflow.store.stats import compute_gene_stats

    uri = str(tmp_path / "store")
    s = synthesize(uri, 1600, 300, 4, 0, layout="store")
    compute_gene_stats(uri)
    assert {"train", "val"} <= {split_of(d["dataset_id"]) for d in s["datasets"]}
    cfg = load_preset("cpu-small").with_overrides({
        "data.store": uri, "run.num_workers": 1, "model.d_model": 64, "model.n_layers": 2, "model.d_ff": 128,
        "data.max_len": 256, "train.max_steps": 120, "train.log_every": 10, "train.eval_every": 60,
        "train.eval_cells": 64, "train.baseline_cells": 256, "data.batch_size": 16, "train.ckpt_every": 120, "optim.warmup_steps": 10})
    ctx, _ = local_context(tmp_path / "run")
    st = run_worker(cfg, ctx)
    hist = st["history"]
    assert all(all(k in h for k in SIGNAL_KEYS) for h in hist)
    assert [h["val_step"] for h in hist if h["val_step"] == h["step"]] == [60, 120]
    last = hist[-2:]
    loss = sum(h["loss"] for h in last) / 2
    assert loss < sum(h["unigram_loss"] for h in last) / 2
    assert loss < sum(h["position_unigram_loss"] for h in last) / 2
    assert hist[-1]["val_loss"] < hist[-1]["val_unigram_loss"]
    assert read_part(tmp_path / "run" / "ckpt_120", "baselines.pt")["tokenizer"] == "rank"
