"""The evaluation protocol of issue 11: CV label prediction, seeds, the random-init control, the
LayerNorm head, early stopping that restores the best validation step, shared-gene tokens.

References are computed independently: sklearn's cross_val_score for the CV, the stdlib's
statistics for mean/sd, a dense torch cross-entropy for the validation loss, zeroed columns for
the shared-gene tokens.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from test_embed_eval import make_checkpoint, make_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_protocol")
    store = make_store(root / "store", seed=21, n_cells=200, n_genes=160, n_datasets=3)
    return store, make_checkpoint(root / "ckpt", store), root


def test_cv_label_prediction_matches_cross_val_score():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from atlasflow.train.tasks.eval_metrics import cv_label_prediction

    rng = np.random.default_rng(3)
    y = np.repeat(np.array(["a", "b", "c", "rare"]), [60, 50, 40, 4])
    Z = rng.normal(size=(len(y), 8)) + (np.unique(y, return_inverse=True)[1][:, None] == np.arange(8)) * 1.5
    rows = {r["classifier"]: r for r in cv_label_prediction(Z, y, n_folds=5, seed=7)}
    keep = y != "rare"  # fewer than 10 cells: left out, as cz-benchmarks' min_class_size does
    cv = StratifiedKFold(5, shuffle=True, random_state=7)
    for name, clf in (("logistic regression, 5-fold CV", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
                      ("kNN (k=5), 5-fold CV", make_pipeline(StandardScaler(), KNeighborsClassifier(5)))):
        acc = cross_val_score(clf, Z[keep], y[keep], cv=cv, scoring="accuracy").mean()
        f1 = cross_val_score(clf, Z[keep], y[keep], cv=cv, scoring="f1_macro").mean()
        assert rows[name]["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert rows[name]["macro_f1"] == pytest.approx(f1, abs=1e-12)
        assert rows[name]["n_cells"] == 150 and rows[name]["n_classes"] == 3


def test_aggregate_seeds_mean_sd():
    from atlasflow.train.tasks.eval_metrics import aggregate_seeds

    acc = [0.91, 0.85, 0.88]
    f1 = [0.8, 0.7, 0.75]
    per_seed = [[{"features": "m", "classifier": "c", "accuracy": a, "macro_f1": f},
                 {"features": "m2", "classifier": "c", "accuracy": 1 - a, "macro_f1": 1 - f}] for a, f in zip(acc, f1)]
    rows = aggregate_seeds(per_seed, seeds=(0, 1, 2))
    assert [r["features"] for r in rows] == ["m", "m2"]
    assert rows[0]["accuracy"] == pytest.approx(statistics.mean(acc))
    assert rows[0]["accuracy_sd"] == pytest.approx(statistics.stdev(acc))
    assert rows[0]["macro_f1_sd"] == pytest.approx(statistics.stdev(f1))
    assert rows[1]["accuracy"] == pytest.approx(1 - statistics.mean(acc))
    assert rows[0]["per_seed"]["accuracy"] == acc and rows[0]["n_seeds"] == 3 and rows[0]["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="differs between seeds"):
        aggregate_seeds([[{"features": "a", "classifier": "c", "accuracy": 1, "macro_f1": 1}],
                         [{"features": "b", "classifier": "c", "accuracy": 1, "macro_f1": 1}]], (0, 1))


def test_random_init_control_same_architecture_other_weights(setup, tmp_path):
    from atlasflow.train import load_checkpoint, read_part
    from atlasflow.train.tasks.eval_metrics import random_init_checkpoint

    _, ckpt, _ = setup
    base, _, vocab = load_checkpoint(ckpt)
    c1 = random_init_checkpoint(ckpt, str(tmp_path / "c1"), seed=1)
    c1b = random_init_checkpoint(ckpt, str(tmp_path / "c1b"), seed=1)
    c2 = random_init_checkpoint(ckpt, str(tmp_path / "c2"), seed=2)
    e1, _, v1 = load_checkpoint(c1)
    sb, s1, s1b, s2 = (m.state_dict() for m in (base, e1, load_checkpoint(c1b)[0], load_checkpoint(c2)[0]))
    assert sb.keys() == s1.keys() and all(sb[k].shape == s1[k].shape for k in sb)
    assert v1.gene_feature_ids == vocab.gene_feature_ids
    assert read_part(c1, "model.json") == read_part(ckpt, "model.json")
    assert read_part(c1, "config.json") == read_part(ckpt, "config.json")
    weights = [k for k in sb if k.endswith("weight") and sb[k].dim() == 2]
    assert weights and all(not torch.equal(sb[k], s1[k]) for k in weights)  # the base is seed 0
    assert all(not torch.equal(s1[k], s2[k]) for k in weights)
    assert all(torch.equal(s1[k], s1b[k]) for k in s1)  # seeded
    assert read_part(c1, "train_state.json")["random_init_seed"] == 1


def test_head_is_layernorm_and_per_cell(setup):
    from atlasflow.train.tasks.finetune import CellClassifier
    from atlasflow.train import load_checkpoint

    _, ckpt, _ = setup
    enc, _, _ = load_checkpoint(ckpt)
    clf = CellClassifier(enc, 3, "mean", head_dropout=0.0)
    kinds = [type(m).__name__ for m in clf.head]
    assert kinds[0] == "LayerNorm" and "BatchNorm1d" not in kinds
    clf.head.train()  # training mode: a BatchNorm head would standardize with the batch's statistics
    z = torch.randn(16, enc.cfg.d_model) * 3 + 5
    torch.testing.assert_close(clf.head(z[:1]), clf.head(z)[:1])
    ln = clf.head[0]
    ref = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + ln.eps)
    torch.testing.assert_close(clf.head(z), clf.head[2](ref * ln.weight + ln.bias))


def test_early_stopping_restores_the_best_validation_step(setup, tmp_path):
    import torch.nn.functional as F

    from atlasflow.train.tasks.pretrained import PretrainedModel, tokenize
    from atlasflow.train.tasks.finetune import FinetuneConfig, finetune_worker, load_classifier, predict
    from atlasflow.train.tasks.finetune_data import labelled_counts, memory_set, tokenizer_spec, validation_split
    from atlasflow.train.runtime import WorkerContext
    from atlasflow.loader.batching import collate

    store, ckpt, _ = setup
    model = PretrainedModel(ckpt)
    X, fids, labels, groups = labelled_counts(store, "cell_type")
    classes = sorted(set(labels))
    cfg = FinetuneConfig(steps=30, eval_every=3, patience=100, batch_size=16, lr=3e-2, encoder_lr=3e-3,
                         val_fraction=0.3, thin_range=None, head_dropout=0.0)
    split = validation_split(labels, groups, cfg.val_fraction, cfg.seed)
    assert split["how"].startswith("by group")  # three datasets: whole groups are held out
    assert set(groups[split["val"]]).isdisjoint(groups[split["train"]])
    spec, _ = tokenizer_spec(model, fids)
    data = memory_set(X, labels, spec, classes, split)
    dest = tmp_path / "clf"

    def report(metrics, d):
        if d:
            shutil.copytree(d, dest)

    ctx = WorkerContext(0, 1, torch.device("cpu"), lambda: contextlib.nullcontext(None), report)
    res = finetune_worker(cfg, ckpt, data, classes, ctx)
    evals = [h for h in res["history"] if "val_loss" in h]
    assert [h["step"] for h in evals] == list(range(0, 31, 3))
    best = min(evals, key=lambda h: h["val_loss"])
    assert res["best_step"] == best["step"] and res["stopped_at"] == 30
    # the saved classifier's validation loss, recomputed from scratch, is the best one, not the last
    clf, cl, meta = load_classifier(str(dest))
    assert meta["best_step"] == best["step"] and cl == classes
    tok, _ = model.tokenizer_for(fids)
    vi = split["val"]
    blk = tokenize(tok, X[vi], vi)
    counts = np.bincount([classes.index(v) for v in labels[split["train"]]], minlength=len(classes))
    w = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(classes), 0.0), dtype=torch.float32)
    y = torch.tensor([classes.index(v) for v in labels[vi]])
    with torch.no_grad():
        logits = clf(collate(blk, np.arange(len(vi))))
    loss = float((F.cross_entropy(logits, y, reduction="none") * w[y]).sum() / w[y].sum())
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)
    if best["step"] != 30:
        assert loss < evals[-1]["val_loss"]
    assert len(predict(clf, cl, blk)) == len(vi)


def test_validation_split_single_group_is_stratified():
    from atlasflow.train.tasks.finetune_data import validation_split

    y = np.repeat(["a", "b", "c"], [40, 20, 10])
    s = validation_split(y, np.full(len(y), "one"), 0.2, 0)
    assert "stratified" in s["how"]
    assert sorted(np.concatenate([s["train"], s["val"]]).tolist()) == list(range(len(y)))
    u, c = np.unique(y[s["val"]], return_counts=True)
    assert dict(zip(u, c)) == {"a": 8, "b": 4, "c": 2}


def _h5ad(path, store, ids, cols):
    import anndata as ad
    import scipy.sparse as sp

    from atlasflow.store import open_store
    from test_query import dense_x

    s = open_store(store)
    var, obs = s.var(), s.obs(["cell_type"])
    X = dense_x(store, ids, len(var))[:, cols]
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": obs.loc[ids, "cell_type"].to_numpy()},
                                                          index=[str(i) for i in ids]),
                   var=pd.DataFrame(index=list(var["feature_id"].to_numpy()[cols])))
    a.write_h5ad(path)
    return X, list(var["feature_id"].to_numpy()[cols]), obs.loc[ids, "cell_type"].to_numpy().astype(str)


def test_shared_gene_tokens_and_protocol_tables(setup, tmp_path):
    import scipy.sparse as sp

    from atlasflow.train.tasks.pretrained import PretrainedModel, tokenize
    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    store, ckpt, _ = setup
    a_ids, b_ids = np.arange(0, 120), np.arange(120, 200)
    Xa, fa, la = _h5ad(tmp_path / "a.h5ad", store, a_ids, np.arange(0, 110))
    Xb, fb, lb = _h5ad(tmp_path / "b.h5ad", store, b_ids, np.arange(40, 160))
    detected_a = {f for f, k in zip(fa, (Xa > 0).any(0)) if k}
    kept_b = np.isin(lb, la)
    detected_b = {f for f, k in zip(fb, (Xb[kept_b] > 0).any(0)) if k}
    inter = detected_a & detected_b
    model = PretrainedModel(ckpt)
    # tokens over the shared genes: a subset of the intersection, and exactly the tokens of the
    # cells with every other gene zeroed out
    tok, dropped = model.tokenizer_for(fb, inter)
    assert dropped == len(fb) - len(inter & set(model.token_of))
    blk = tokenize(tok, sp.csr_matrix(Xb), b_ids)
    allowed = {model.token_of[f] for f in inter}
    genes_in_tokens = set(blk.ids[blk.ids >= 4].tolist())
    assert genes_in_tokens and genes_in_tokens <= allowed
    Xz = Xb * np.isin(fb, list(inter))[None, :]
    full_tok, _ = model.tokenizer_for(fb)
    ref = tokenize(full_tok, sp.csr_matrix(Xz), b_ids)
    assert np.array_equal(blk.ids, ref.ids) and np.array_equal(blk.offsets, ref.offsets)

    cfg = EvalConfig(test_groups=("b.h5ad",), seeds=(0, 1), finetune_steps=0, n_pcs=5, plot=False, cv_folds=3,
                     scib=False, embedding_poolings=("mean",))
    tab = run_eval(ckpt, [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")], str(tmp_path / "ev"), cfg)
    assert tab["genes_shared_train_test"] == len(inter) and tab["genes_tokenized"] == len(inter & set(model.token_of))
    names = [(r["features"], r["classifier"], r["n_seeds"]) for r in tab["rows"]]
    assert names[:4] == [("atlasflow embedding (mean pooling)", "kNN (k=15)", 2),
                         ("atlasflow embedding (mean pooling)", "logistic regression", 2),
                         ("random-init control embedding (mean pooling)", "kNN (k=15)", 2),
                         ("random-init control embedding (mean pooling)", "logistic regression", 2)]
    ctrl = tab["rows"][2]
    assert len(ctrl["per_seed"]["accuracy"]) == 2 and ctrl["accuracy"] == pytest.approx(
        statistics.mean(ctrl["per_seed"]["accuracy"]))
    cv = {(r["features"].split(" (")[0], r["classifier"]) for r in tab["cv_test_cells"]}
    assert ("atlasflow embedding", "logistic regression, 3-fold CV") in cv
    assert ("random-init control embedding", "kNN (k=5), 3-fold CV") in cv
    assert any(r["features"].startswith("PCA(") for r in tab["cv_test_cells"])
    assert all(0 <= r["ari"] <= 1 or r["ari"] < 0 for r in tab["clustering_test_cells"])
    assert len(tab["clustering_test_cells"]) == 3
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "±" in md and "cz-benchmarks" in md


def test_scib_table_when_installed(setup, tmp_path):
    pytest.importorskip("scib_metrics", reason="scib-metrics not installed (the 'eval' extra)")
    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    store, ckpt, _ = setup
    tab = run_eval(ckpt, store, str(tmp_path / "ev"), EvalConfig(finetune_steps=0, n_pcs=5, plot=False, cv_folds=0,
                                                                  cluster=False, control=False,
                                                                  embedding_poolings=("mean",)))
    rows = tab["scib_all_cells"]
    assert [r["features"].split(" (")[0] for r in rows] == ["atlasflow embedding", "PCA(5) of log1p HVG counts"]
    for r in rows:
        assert r["total"] == pytest.approx(0.6 * r["bio_conservation"] + 0.4 * r["batch_correction"])
        assert r["bio_conservation"] == pytest.approx(statistics.mean(
            [r[k] for k in ("isolated_labels", "kmeans_nmi", "kmeans_ari", "silhouette_label", "clisi")]))


def test_scib_batch_silhouette_undefined_when_no_label_spans_two_batches():
    pytest.importorskip("scib_metrics", reason="scib-metrics not installed (the 'eval' extra)")
    import math

    from atlasflow.train.tasks.eval_metrics import scib_scores

    rng = np.random.default_rng(0)
    Z = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(5, 1, (30, 4))])
    labels = np.array(["a"] * 30 + ["b"] * 30)
    batches = np.array(["x"] * 30 + ["y"] * 30)  # label a only in batch x, b only in y
    r = scib_scores(Z, labels, batches, n_neighbors=10)
    assert math.isnan(r["silhouette_batch"])
    assert r["batch_correction"] == pytest.approx((r["ilisi"] + r["graph_connectivity"]) / 2)


def test_control_finetune_off_keeps_the_frozen_control_rows_and_logs_each_finetune(setup, tmp_path, caplog):
    import logging

    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    store, ckpt, _ = setup
    cfg = EvalConfig(seeds=(0,), finetune_steps=2, finetune_in_process=True, finetune_control=False, n_pcs=5,
                     plot=False, cv_folds=0, cluster=False, scib=False, embedding_poolings=("mean",))
    with caplog.at_level(logging.INFO, logger="atlasflow"):
        tab = run_eval(ckpt, store, str(tmp_path / "ev"), cfg)
    feats = [r["features"] for r in tab["rows"]]
    assert "random-init control embedding (mean pooling)" in feats
    tuned = [r for r in tab["rows"] if r["features"].startswith("fine-tuned")]
    assert [r["features"].split(" (")[0] for r in tuned] == ["fine-tuned atlasflow"]
    assert [f["model"] for f in tab["finetune"]] == ["atlasflow"]
    logged = [m for m in caplog.messages if m.startswith("fine-tuned atlasflow, seed 0: test accuracy")]
    assert logged == [f"fine-tuned atlasflow, seed 0: test accuracy {tuned[0]['accuracy']:.3f}, macro-F1 "
                      f"{tuned[0]['macro_f1']:.3f} (best step {tab['finetune'][0]['best_step']} of 2)"]
    assert tab["config"]["finetune_control"] is False
