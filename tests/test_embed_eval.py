"""embed / finetune / eval on real stores, real torch, real sklearn; one Ray test (finetune under Ray Train).

Checks are independent of the code under test: embeddings are recomputed from the loader's own
batches (a different tokenization path) and the encoder; scores by hand; splits and leakage by set
arithmetic on obs.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from atlasflow.infra.cli import main as atlasflow_main
from atlasflow.train.tasks.baselines import log1p_normalize, scores
from atlasflow.train.tasks.embed import EmbedConfig, embed
from atlasflow.train.tasks.pretrained import PretrainedModel
from atlasflow.train.tasks.evaluate import EvalConfig, choose_split, run_eval

D, MAX_LEN = 32, 64


def make_store(path, seed: int, n_cells: int = 240, n_genes: int = 200, n_datasets: int = 4) -> str:
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats

    synthesize(str(path), n_cells, n_genes, n_datasets, seed, layout="store")
    compute_gene_stats(str(path))
    return str(path)


def make_checkpoint(path, store_uri: str) -> str:
    """A real (randomly initialized, seeded) checkpoint in the training format."""
    from atlasflow.loader import Vocab
    from atlasflow.store import open_store
    from atlasflow.train import CellEncoder, load_preset, save_checkpoint

    store = open_store(store_uri)
    cfg = load_preset("debug").with_overrides({"data.store": store_uri, "data.max_len": MAX_LEN, "model.d_model": D,
                                               "model.d_ff": 64, "data.timestamp_ms": store.timestamp_ms})
    vocab = Vocab.from_var(store.var())
    torch.manual_seed(0)
    enc = CellEncoder(cfg.model, "rank", len(vocab), MAX_LEN)
    save_checkpoint(path, model_state=enc.state_dict(), config=cfg, vocab=vocab.to_dict(),
                    model_meta={"tokenizer": "rank", "n_tokens": len(vocab), "max_len": MAX_LEN, "n_bins": 51},
                    train_state={"step": 0, "history": []})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_eval")
    store = make_store(root / "store", seed=5)
    return store, make_checkpoint(root / "ckpt", store), root


def test_embed_matches_loader_batches(setup, tmp_path):
    from atlasflow.loader import LoaderConfig, make_loader
    from atlasflow.train import load_checkpoint

    store, ckpt, _ = setup
    out = embed(ckpt, store, out_h5ad=str(tmp_path / "e.h5ad"), out_parquet=str(tmp_path / "e.parquet"),
                cfg=EmbedConfig(batch_size=16, block_cells=50))
    enc, _, _ = load_checkpoint(ckpt)
    want = {}
    for b in make_loader(store, LoaderConfig(max_len=MAX_LEN, batch_size=8, shuffle=False, remainder="pad")):
        for j, e in zip(b["soma_joinid"].tolist(), enc.embed(b).numpy()):
            want[j] = e
    pq = pd.read_parquet(tmp_path / "e.parquet")
    assert out["n_cells"] == len(pq) == len(want) == 240 and out["genes_dropped"] == 0
    got = np.stack(pq["embedding"].to_numpy())
    ref = np.stack([want[j] for j in pq["soma_joinid"]])
    assert got.shape == (240, D)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    import anndata as ad

    a = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(a.obsm["X_atlasflow"], got, rtol=1e-6)
    assert a.obs.index.astype(int).tolist() == pq["soma_joinid"].tolist()
    assert a.uns["atlasflow_embed"]["format_version"] == 1


def test_h5ad_input_drops_unknown_genes_and_agrees_with_store(setup, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from atlasflow.store import gene_reference, open_store
    from test_query import dense_x

    store, ckpt, _ = setup
    s = open_store(store)
    var = s.var()
    ids = np.arange(0, 40)
    X = dense_x(store, ids, len(var))
    extra = next(g for g in gene_reference().index if g not in set(var["feature_id"]))
    # the extra gene is a real Ensembl id outside the vocabulary, zero everywhere, so cell totals agree
    a = ad.AnnData(X=sp.csr_matrix(np.hstack([X, np.zeros((len(ids), 1), np.float32)])),
                   obs=pd.DataFrame(index=[str(i) for i in ids]),
                   var=pd.DataFrame(index=list(var["feature_id"]) + [extra]))
    a.write_h5ad(tmp_path / "in.h5ad")
    out = embed(ckpt, str(tmp_path / "in.h5ad"), out_parquet=str(tmp_path / "h.parquet"),
                cfg=EmbedConfig(pooling="mean", block_cells=16))
    assert out["genes_dropped"] == 1 and out["genes_in_input"] == len(var) + 1
    ref = embed(ckpt, store, out_parquet=str(tmp_path / "s.parquet"), cfg=EmbedConfig(pooling="mean"))
    assert ref["genes_dropped"] == 0
    got = np.stack(pd.read_parquet(tmp_path / "h.parquet")["embedding"].to_numpy())
    want = np.stack(pd.read_parquet(tmp_path / "s.parquet")["embedding"].to_numpy())[ids]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scores_and_normalization_by_hand():
    s = scores(["a", "a", "b", "c"], ["a", "b", "b", "d"])
    assert s["accuracy"] == pytest.approx(0.5)
    # F1: a = 2*1*.5/1.5 = 2/3, b = 2*.5*1/1.5 = 2/3, c = 0; 'd' is not a test label
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    import scipy.sparse as sp

    X = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    n = log1p_normalize(X, totals=np.array([8.0, 0.0])).toarray()
    np.testing.assert_allclose(n[0], np.log1p(np.array([1, 3, 0]) / 8 * 1e4))
    assert (n[1] == 0).all()


def test_choose_split_prefers_unseen_groups_and_never_straddles():
    groups = np.array(["g1"] * 50 + ["g2"] * 30 + ["g3"] * 20)
    cfg = EvalConfig(test_fraction=0.3, finetune_steps=0)
    test = choose_split(groups, cfg, seen={"g1", "g2"})
    assert test == {"g3"} or (test >= {"g3"} and "g1" not in test)
    named = choose_split(groups, EvalConfig(test_groups=("g1",), finetune_steps=0), seen=set())
    assert named == {"g1"}
    with pytest.raises(ValueError, match="EvalConfig.test_groups"):
        choose_split(groups, EvalConfig(test_groups=("zzz",), finetune_steps=0), seen=set())
    with pytest.raises(ValueError, match="EvalConfig.split_by"):
        choose_split(np.array(["g"] * 5), cfg, seen=set())
    with pytest.raises(ValueError, match="EvalConfig.test_fraction"):
        EvalConfig(test_fraction=1.0)


def test_eval_table_split_and_leakage(setup, tmp_path):
    from atlasflow.store import open_store

    store, ckpt, root = setup
    tab = run_eval(ckpt, store, str(tmp_path / "ev"), EvalConfig(finetune_steps=0, n_pcs=10, control=False, cv_folds=0,
                                                                  cluster=False, scib=False))
    obs = open_store(store).obs(["dataset_id", "cell_type"])
    assert set(tab["train_groups"]).isdisjoint(tab["test_groups"])
    assert set(tab["train_groups"]) | set(tab["test_groups"]) == set(obs["dataset_id"])
    n_test_all = int(obs["dataset_id"].isin(tab["test_groups"]).sum())
    assert tab["n_train"] == len(obs) - n_test_all
    assert tab["n_test"] + tab["test_cells_dropped_unseen_label"] == n_test_all
    # baselines use the genes detected in both training and (kept) test cells
    from test_query import dense_x

    X = dense_x(store, obs.index.to_numpy(), 200)
    is_train = ~obs["dataset_id"].isin(tab["test_groups"]).to_numpy()
    kept_test = ~is_train & obs["cell_type"].isin(set(obs["cell_type"][is_train])).to_numpy()
    shared = int(((X[is_train] > 0).any(0) & (X[kept_test] > 0).any(0)).sum())
    assert tab["genes_shared_train_test"] == shared == tab["n_hvg"]  # fewer than 2000: all are "HVGs"
    assert [(r["features"].split(" (")[0], r["classifier"].split(" (")[0]) for r in tab["rows"]] == [
        *[("atlasflow embedding", "kNN"), ("atlasflow embedding", "logistic regression")] * 3,  # cls, mean, rank_mean
        ("PCA(10) of log1p HVG counts", "kNN"), ("PCA(10) of log1p HVG counts", "logistic regression"),
        (f"log1p-normalized counts, {shared} HVGs", "logistic regression"), ("none", "majority training label")]
    major = obs["cell_type"][is_train].value_counts()
    major = sorted(major.index[major == major.max()])[0]
    assert tab["rows"][-1]["accuracy"] == pytest.approx(float((obs["cell_type"][kept_test] == major).mean()))
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in tab["rows"])
    # evaluating on the pretraining store itself: every test group leaked, and it says so
    assert tab["leakage"]["test_groups_in_pretraining"] == sorted(tab["test_groups"])
    assert "warning" in tab["leakage"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"] == tab["rows"]
    assert "| features | classifier | accuracy | macro-F1 | seeds |" in (tmp_path / "ev" / "eval.md").read_text()
    for png in ("embedding.png", "scores.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a store of other datasets: no test group was pretrained on, no warning
    other = make_store(root / "other", seed=6)
    assert set(open_store(other).obs(["dataset_id"])["dataset_id"]).isdisjoint(obs["dataset_id"])
    tab2 = run_eval(ckpt, other, str(tmp_path / "ev2"), EvalConfig(finetune_steps=0, n_pcs=10, plot=False, control=False,
                                                                    cv_folds=0, cluster=False, scib=False))
    assert tab2["leakage"]["test_groups_in_pretraining"] == [] and "warning" not in tab2["leakage"]


def test_finetune_frozen_keeps_encoder_full_updates_it(setup, tmp_path):
    from atlasflow.train.tasks.finetune import FinetuneConfig, finetune_worker, load_classifier, predict
    from atlasflow.train.tasks.finetune_data import labelled_counts, memory_set, tokenizer_spec, validation_split
    from atlasflow.train.tasks.pretrained import tokenize
    from atlasflow.train.runtime import WorkerContext

    store, ckpt, _ = setup
    model = PretrainedModel(ckpt)
    X, fids, labels, groups = labelled_counts(store, "cell_type")
    classes = sorted(set(labels))
    spec, _ = tokenizer_spec(model, fids)
    data = memory_set(X, labels, spec, classes, validation_split(labels, groups, 0.0, 0))
    block = tokenize(model.tokenizer_for(fids)[0], X, np.arange(X.shape[0]))
    base = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    def run(mode):
        dest = tmp_path / mode

        def report(metrics, d):
            if d:
                shutil.copytree(d, dest)
        ctx = WorkerContext(0, 1, torch.device("cpu"), lambda: contextlib.nullcontext(None), report)
        finetune_worker(FinetuneConfig(mode=mode, steps=6, batch_size=16, val_fraction=0.0), ckpt, data, classes, ctx)
        return load_classifier(str(dest))

    for mode in ("frozen", "full"):
        clf, cl, meta = run(mode)
        assert cl == classes and meta["config"]["mode"] == mode
        same = all(torch.equal(base[k], v) for k, v in clf.encoder.state_dict().items())
        assert same == (mode == "frozen"), mode
        pred = predict(clf, cl, block)
        assert len(pred) == len(labels) and set(pred) <= set(classes)
    with pytest.raises(ValueError, match="FinetuneConfig.mode"):
        FinetuneConfig(mode="half")
    with pytest.raises(ValueError, match="FinetuneConfig.thin_range"):
        FinetuneConfig(thin_range=(0.5, 0.1))
    with pytest.raises(FileNotFoundError, match="not a fine-tuned checkpoint"):
        load_classifier(ckpt)


@pytest.mark.ray
def test_cli_eval_with_finetune_under_ray(setup, tmp_path, ray_session):
    store, ckpt, _ = setup
    rc = atlasflow_main(["eval", "--checkpoint", ckpt, "--input", store, "--out", str(tmp_path / "ev"),
                         "--finetune-steps", "4", "--no-plot", "--no-scib", "--cv-folds", "0"])
    assert rc == 0
    tab = json.loads((tmp_path / "ev" / "eval.json").read_text())
    ft = {r["features"]: r for r in tab["rows"]}
    for who in ("atlasflow", "random-init control"):  # the model and its control, each fine-tuned under Ray
        r = ft[f"fine-tuned {who} (full encoder, mean pooling)"]
        assert 0 <= r["accuracy"] <= 1 and r["n_seeds"] == 1
    assert [f["model"] for f in tab["finetune"]] == ["atlasflow", "random-init control"]
    # the fine-tuned checkpoint is a regular checkpoint: embed reads it
    rc = atlasflow_main(["embed", "--checkpoint", tab["finetune"][0]["checkpoint"], "--input", store,
                         "--out-parquet", str(tmp_path / "f.parquet")])
    assert rc == 0 and len(pd.read_parquet(tmp_path / "f.parquet")) == 240


def test_leakage_respects_pretraining_split_and_h5ad_fingerprints(setup, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from atlasflow.ingest.h5ad import fingerprint
    from atlasflow.ingest.obs import to_store_obs
    from atlasflow.loader import split_of
    from atlasflow.store import SourceEntry, StoreWriter, open_store, write_cells
    from atlasflow.store.stats import compute_gene_stats
    from test_query import dense_x

    store, _, _ = setup
    s = open_store(store)
    var, obs = s.var(), s.obs(["cell_type", "dataset_id"])
    # 1. pretraining restricted to the train split of dataset_id: only those datasets count as seen
    ck = make_checkpoint(tmp_path / "ck_split", store)
    cfg_f = tmp_path / "ck_split" / "config.json"
    c = json.loads(cfg_f.read_text())
    c["data"]["split"] = "train"
    cfg_f.write_text(json.dumps(c))
    tab = run_eval(ck, store, str(tmp_path / "ev_split"), EvalConfig(finetune_steps=0, n_pcs=5, plot=False,
                                                                      embedding_poolings=("mean",), control=False,
                                                                      cv_folds=0, cluster=False, scib=False))
    trained = {g for g in set(obs["dataset_id"]) if split_of(g) == "train"}
    assert tab["leakage"]["test_groups_in_pretraining"] == sorted(set(tab["test_groups"]) & trained)
    if set(obs["dataset_id"]) - trained:  # unseen datasets exist: they are the ones held out
        assert not set(tab["test_groups"]) & trained

    # 2. .h5ad inputs without dataset_id: the file is the group, its content fingerprint is checked
    paths = {}
    for name, ids in (("a", obs.index[:120].to_numpy()), ("b", obs.index[120:].to_numpy())):
        a = ad.AnnData(X=sp.csr_matrix(dense_x(store, ids, len(var))),
                       obs=pd.DataFrame({"cell_type": obs.loc[ids, "cell_type"].to_numpy()},
                                        index=[str(i) for i in ids]),
                       var=pd.DataFrame(index=list(var["feature_id"])))
        paths[name] = str(tmp_path / f"{name}.h5ad")
        a.write_h5ad(paths[name])
    pre = str(tmp_path / "pre")  # a pretraining store holding a.h5ad's cells, recorded with its fingerprint
    w = StoreWriter(pre)
    gj = w.register_genes(list(var["feature_id"]))
    ids = obs.index[:120].to_numpy()
    m = sp.coo_matrix(dense_x(store, ids, len(var)))
    e = w.reserve(SourceEntry(source_id="a", kind="h5ad", name="a.h5ad", fingerprint=fingerprint(paths["a"]),
                              n_cells=len(ids)))
    tbl = to_store_obs(pd.DataFrame(index=range(len(ids))), source_id="a", source_file="a", source_rows=ids,
                       nnz=np.bincount(m.row, minlength=len(ids)), raw_sum=np.asarray(m.sum(1)).ravel(),
                       default_dataset_id="a")
    write_cells(pre, e.joinid_start, tbl, m.row.astype(np.int64), gj[m.col], m.data)
    w.complete("a")
    compute_gene_stats(pre)
    ck2 = make_checkpoint(tmp_path / "ck_pre", pre)
    for test, leaked in (("a.h5ad", ["a.h5ad"]), ("b.h5ad", [])):
        t = run_eval(ck2, [paths["a"], paths["b"]], str(tmp_path / f"ev_{test}"),
                     EvalConfig(test_groups=(test,), finetune_steps=0, n_pcs=5, plot=False,
                                embedding_poolings=("mean",), control=False, cv_folds=0, cluster=False, scib=False))
        assert t["test_groups"] == [test] and t["leakage"]["test_groups_in_pretraining"] == leaked
