"""Fine-tuning streams a store: each worker's loader, tokenized with the checkpoint's vocabulary.

The fine-tuning store is a query copy of the pretraining store restricted to a gene subset, so its
gene joinids differ from the checkpoint's; the checkpoint's vocabulary also lacks a third of the
store's genes. Labels are checked against the store's obs read with pandas, tokens against the
driver-side tokenization (embed's path: CSR blocks + a feature-id lookup), both by soma_joinid.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest
import torch

from test_embed_eval import MAX_LEN, make_checkpoint, make_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from atlasflow.loader import Vocab
    from atlasflow.store import open_store
    from atlasflow.train import save_checkpoint
    from atlasflow.train.checkpoint import load_checkpoint, read_part
    from atlasflow.ingest.export import to_store
    from atlasflow.store.query import QueryConfig

    root = tmp_path_factory.mktemp("ft_stream")
    base = make_store(root / "base", seed=11, n_cells=200, n_genes=120, n_datasets=3)
    full = make_checkpoint(root / "full_ckpt", base)
    # The checkpoint knows two thirds of the base store's genes.
    enc, cfg, vocab = load_checkpoint(full)
    keep = np.arange(len(vocab.gene_joinids)) % 3 != 0
    sub = Vocab(vocab.gene_joinids[keep], tuple(np.array(vocab.gene_feature_ids)[keep]))
    meta = {**read_part(full, "model.json"), "n_tokens": len(sub)}
    torch.manual_seed(1)
    from atlasflow.train import CellEncoder

    enc = CellEncoder(cfg.model, "rank", len(sub), MAX_LEN)
    ckpt = str(root / "ckpt")
    save_checkpoint(ckpt, model_state=enc.state_dict(), config=cfg, vocab=sub.to_dict(), model_meta=meta,
                    train_state={"step": 0, "history": []})
    # The fine-tuning store: the base store's cells on every other gene (new joinids 0..59).
    var = open_store(base).var()
    genes = tuple(var["feature_id"].astype(str).to_numpy()[1::2])
    ft = str(root / "ft_store")
    to_store(QueryConfig(source="store", uri=base, genes=genes), ft)
    return ft, ckpt, sub


def _store_labels(store: str) -> dict[int, str]:
    from atlasflow.store import open_store

    with open_store(store).experiment() as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "cell_type"]).concat().to_pandas()
    return dict(zip(obs["soma_joinid"].astype(int), obs["cell_type"].astype(str)))


def test_stream_labels_and_tokens_match_the_store(stores, caplog):
    from atlasflow.store import open_store
    from atlasflow.train.tasks.pretrained import PretrainedModel, iter_input, tokenize
    from atlasflow.train.tasks.finetune_data import plan_stream, stream_batches, streamable

    ft, ckpt, vocab = stores
    model = PretrainedModel(ckpt)
    assert streamable(ft) and not streamable("x.h5ad")
    label_map = {"T cell": "lymphocyte", "B cell": "lymphocyte"}
    truth = _store_labels(ft)
    present = sorted(set(truth.values()))
    label_map.update({v: v for v in present if v not in label_map and v != present[-1]})  # the last: unlabelled
    with caplog.at_level("WARNING", logger="atlasflow.train.tasks.finetune_data"):
        spec = plan_stream(model, ft, "cell_type", label_map)
    out = caplog.text
    var = open_store(ft).var()
    n_unknown = int((~var["feature_id"].isin(vocab.gene_feature_ids)).sum())
    assert n_unknown > 0 and f"{n_unknown} of {len(var)} input genes are not in the checkpoint" in out
    expected = {j: label_map.get(v) for j, v in truth.items()}
    assert list(spec.classes) == sorted({v for v in expected.values() if v is not None})
    assert dict(zip(spec.classes, spec.counts)) == {c: sum(v == c for v in expected.values()) for c in spec.classes}

    # Driver-side tokens of the same cells (feature-id lookup over CSR blocks): the reference.
    ref = {}
    for ids, _, X, fids in iter_input(ft, 64):
        tok, dropped = model.tokenizer_for(fids)
        assert dropped == n_unknown
        blk = tokenize(tok, X, ids)
        for i, j in enumerate(blk.joinids):
            ref[int(j)] = blk.ids[blk.offsets[i]:blk.offsets[i + 1]]

    seen = set()
    per_epoch = None
    for rank in range(2):
        it = stream_batches(spec, 16, 0, rank, 2)
        n_batches = None
        for k, (batch, y) in enumerate(it):
            from atlasflow.train.tasks.finetune_data import stream_loader

            if n_batches is None:
                n_batches = len(stream_loader(spec, 16, 0, rank, 2))
            if k == n_batches:
                break
            for row, j in enumerate(batch["soma_joinid"].tolist()):
                want = expected[j]
                assert y[row].item() == (-1 if want is None else spec.classes.index(want)), j
                n = int(batch["lengths"][row])
                assert np.array_equal(batch["input_ids"][row, :n].numpy(), ref[j]), j
                seen.add(j)
        per_epoch = n_batches
    assert per_epoch and seen == set(truth)  # both ranks together: every cell of the store


def test_finetune_worker_trains_from_the_stream(stores, tmp_path):
    from atlasflow.train.tasks.pretrained import PretrainedModel
    from atlasflow.train.tasks.finetune import FinetuneConfig, finetune_worker, load_classifier
    from atlasflow.train.tasks.finetune_data import StreamSpec, plan_stream
    from atlasflow.train.runtime import WorkerContext

    ft, ckpt, _ = stores
    spec = plan_stream(PretrainedModel(ckpt), ft, "cell_type")
    assert isinstance(spec, StreamSpec) and spec.gene_medians is not None
    dest = tmp_path / "clf"

    def report(metrics, d):
        if d:
            shutil.copytree(d, dest)

    ctx = WorkerContext(0, 1, torch.device("cpu"), lambda: contextlib.nullcontext(None), report)
    res = finetune_worker(FinetuneConfig(steps=5, batch_size=16), ckpt, spec, list(spec.classes), ctx)
    assert res["history"][-1]["step"] == 5 and res["history"][-1]["cells_seen"] == 5 * 16
    clf, classes, meta = load_classifier(str(dest))
    assert classes == list(spec.classes) and meta["n_cells"] == len(_store_labels(ft))
    with pytest.raises(ValueError, match="FinetuneConfig.label"):
        plan_stream(PretrainedModel(ckpt), ft, "no_such_column")


def test_stream_from_a_census_mirror_in_place(tmp_path):
    import cellxgene_census

    from atlasflow.ingest.synth import synthesize
    from atlasflow.train.tasks.pretrained import PretrainedModel
    from atlasflow.train.tasks.finetune_data import plan_stream, stream_batches, streamable
    from atlasflow.ingest.export import to_store
    from atlasflow.store.query import QueryConfig

    root = str(tmp_path / "census")
    synthesize(root, 150, 90, 2, 9, layout="census")
    q = QueryConfig(source="census", uri=root, organism="Homo sapiens", obs_filter="cell_type != 'hepatocyte'")
    # the checkpoint is pretrained on a store copy of the mirror: same genes, its own joinids and medians
    to_store(QueryConfig(source="census", uri=root), str(tmp_path / "s"))
    ckpt = make_checkpoint(tmp_path / "ckpt", str(tmp_path / "s"))
    assert streamable(q) and not streamable(QueryConfig(source="census", census_version="stable"))
    spec = plan_stream(PretrainedModel(ckpt), q, "cell_type")
    assert spec.census_organism == "Homo sapiens" and spec.store == root
    with cellxgene_census.open_soma(uri=root) as c:
        obs = cellxgene_census.get_obs(c, "Homo sapiens", value_filter=q.obs_filter,
                                       column_names=["soma_joinid", "cell_type"])
    truth = dict(zip(obs["soma_joinid"].astype(int), obs["cell_type"].astype(str)))
    assert 0 < len(truth) < 150 and list(spec.classes) == sorted(set(truth.values()))
    from atlasflow.train.tasks.finetune_data import stream_loader

    seen = set()
    n_batches = len(stream_loader(spec, 8, 0, 0, 1))  # one epoch
    for _, (batch, y) in zip(range(n_batches), stream_batches(spec, 8, 0, 0, 1)):
        for r, j in enumerate(batch["soma_joinid"].tolist()):
            assert spec.classes[int(y[r])] == truth[j]
            seen.add(j)
    assert seen == set(truth)


def _ctx(root, fail_at=None):
    """A one-process WorkerContext keeping checkpoints under root/<step> (what Ray Train does); its
    report raises at step ``fail_at`` (a crash after the last checkpoint)."""
    from atlasflow.train.runtime import WorkerContext

    root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def restore():
        ckpts = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        yield ckpts[-1] if ckpts else None

    def report(metrics, d):
        if fail_at is not None and metrics.get("step") == fail_at:
            raise RuntimeError(f"crash at step {fail_at}")
        if d:
            shutil.copytree(d, root / str(metrics.get("step", 10**6) if "best_step" not in metrics else 10**6))

    return WorkerContext(0, 1, torch.device("cpu"), restore, report)


def test_a_restarted_finetune_continues_exactly(stores, tmp_path):
    """Crash after the step-4 resume checkpoint, restart: the result equals an uninterrupted run's."""
    from atlasflow.train.checkpoint import read_part
    from atlasflow.train.tasks.pretrained import PretrainedModel
    from atlasflow.train.tasks.finetune import FinetuneConfig, finetune_worker
    from atlasflow.train.tasks.finetune_data import plan_stream

    ft, ckpt, _ = stores
    spec = plan_stream(PretrainedModel(ckpt), ft, "cell_type")
    cfg = FinetuneConfig(steps=8, batch_size=16, eval_every=2, ckpt_every=4, patience=100, head_dropout=0.2)
    whole = finetune_worker(cfg, ckpt, spec, list(spec.classes), _ctx(tmp_path / "a"))
    with pytest.raises(RuntimeError, match="crash at step 6"):
        finetune_worker(cfg, ckpt, spec, list(spec.classes), _ctx(tmp_path / "b", fail_at=6))
    assert (tmp_path / "b" / "4" / "finetune_resume.json").is_file()
    again = finetune_worker(cfg, ckpt, spec, list(spec.classes), _ctx(tmp_path / "b"))
    assert again["history"] == whole["history"]  # same losses, same cells, every step
    a, b = tmp_path / "a" / str(10**6), tmp_path / "b" / str(10**6)
    for part in ("classifier.pt", "model.pt"):
        x, y = torch.load(a / part, weights_only=True), torch.load(b / part, weights_only=True)
        assert all(torch.equal(x[k], y[k]) for k in x), part
    assert read_part(b, "train_state.json")["step"] == whole["best_step"]


def test_a_finetune_stream_resumes_on_another_world_size(stores):
    """2 workers take 3 batches each, save; 3 workers stream the epoch's rest: every training cell
    of the epoch at least once (remainder="pad" repeats a few to even the shards), and no cell that
    was consumed before the resize comes back unless it is padding."""
    from atlasflow.train.tasks.pretrained import PretrainedModel
    from atlasflow.train.tasks.finetune_data import plan_stream, stream_batches

    ft, ckpt, _ = stores
    spec = plan_stream(PretrainedModel(ckpt), ft, "cell_type")
    first, states = [], []
    for rank in range(2):
        it = stream_batches(spec, 8, 0, rank, 2)
        n_epoch = len(it.loader)
        first += [j for _ in range(3) for j in next(it)[0]["soma_joinid"].tolist()]
        states.append(it.state_dict())
    assert states[0]["loader"]["position"] == states[1]["loader"]["position"] == 3
    rest, lens = [], []
    for rank in range(3):
        it = stream_batches(spec, 8, 0, rank, 3)
        it.load_state_dict(states[0])
        lens.append(len(it.loader))
        rest += [j for _ in range(lens[-1]) for j in next(it)[0]["soma_joinid"].tolist()]
        assert it.epoch == 0
        next(it)  # the next batch starts epoch 1
        assert it.epoch == 1
    assert len(set(lens)) == 1 and lens[0] < n_epoch
    train_cells = set(j for r in range(1) for j in _epoch_cells(spec))
    assert set(first) | set(rest) == train_cells
    assert len(set(first)) == len(first)
    assert len(set(first) & set(rest)) <= 3 * 8  # only the new phase's padding can repeat a cell


def _epoch_cells(spec):
    from atlasflow.train.tasks.finetune_data import stream_loader

    loader = stream_loader(spec, 8, 0, 0, 1, split="train")
    return [j for b in loader for j in b["soma_joinid"].tolist()]
