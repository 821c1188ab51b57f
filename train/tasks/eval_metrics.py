"""Metrics of the evaluation protocol beyond the train -> test table (``evaluate``).

- ``cv_label_prediction``: label prediction on an embedding the way CZI's cz-benchmarks does it
  (``MetadataLabelPredictionTask``): stratified k-fold CV (5 folds, shuffled, seeded), a
  StandardScaler + LogisticRegression pipeline and a StandardScaler + KNeighborsClassifier (k=5)
  pipeline, classes with fewer than ``min_class_size`` cells left out; mean over folds of accuracy
  and macro-F1.
- ``clustering_scores``: ARI and NMI (sklearn) of a clustering of the embedding against the labels:
  Leiden on the kNN graph (scanpy, igraph flavour; cz-benchmarks' ClusteringTask) when igraph is
  installed, else k-means with one cluster per label; the method is recorded.
- ``scib_scores``: bio-conservation and batch-correction metrics of scib-metrics (the scverse
  library; optional extra ``eval``) computed directly on a kNN graph from sklearn. kBET and PCR
  comparison are left out (minutes on 2 CPU cores for a few thousand cells); aggregates follow
  scib (bio mean, batch mean, total = 0.6 bio + 0.4 batch), unscaled.
- ``aggregate_seeds``: rows of several seeds -> one row with mean, sd (ddof=1) and the per-seed values.
- ``random_init_checkpoint``: the control model: same config, vocabulary and architecture as a
  checkpoint, freshly initialised weights (seeded).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)
METRICS = ("accuracy", "macro_f1")


def cv_label_prediction(Z, labels, n_folds: int = 5, seed: int = 42, min_class_size: int = 10, k: int = 5) -> list:
    """cz-benchmarks-style CV rows: [{classifier, accuracy, macro_f1, n_cells, n_classes}] for LR and kNN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, make_scorer
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels).astype(str)
    u, c = np.unique(y, return_counts=True)
    keep = np.isin(y, u[c >= max(min_class_size, n_folds)])
    Z, y = np.asarray(Z)[keep], y[keep]
    if len(np.unique(y)) < 2:
        return []
    scoring = {"accuracy": make_scorer(accuracy_score),
               "macro_f1": make_scorer(f1_score, average="macro", zero_division=0)}
    clfs = {"logistic regression": Pipeline([("scaler", StandardScaler()), ("lr", LogisticRegression(max_iter=1000))]),
            f"kNN (k={k})": Pipeline([("scaler", StandardScaler()), ("knn", KNeighborsClassifier(n_neighbors=k))])}
    rows = []
    for name, clf in clfs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = cross_validate(clf, Z, y, cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed), scoring=scoring)
        rows.append({"classifier": f"{name}, {n_folds}-fold CV", "accuracy": float(r["test_accuracy"].mean()),
                     "macro_f1": float(r["test_macro_f1"].mean()), "n_cells": int(len(y)),
                     "n_classes": int(len(np.unique(y)))})
    return rows


def clustering_scores(Z, labels, seed: int = 42) -> dict:
    """{ari, nmi, method, n_clusters} of a clustering of ``Z`` against ``labels``."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y = np.asarray(labels).astype(str)
    Z = np.asarray(Z, dtype=np.float32)
    try:
        import igraph  # noqa: F401  (scanpy's leiden, igraph flavour)

        import anndata as ad
        import scanpy as sc

        a = ad.AnnData(X=np.zeros((len(y), 1), np.float32))
        a.obsm["emb"] = Z
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.neighbors(a, use_rep="emb", random_state=seed)
            sc.tl.leiden(a, flavor="igraph", n_iterations=2, random_state=seed, directed=False)
        pred, method = a.obs["leiden"].astype(str).to_numpy(), "leiden (scanpy, igraph, resolution 1)"
    except ImportError:
        from sklearn.cluster import KMeans

        pred = KMeans(len(np.unique(y)), n_init=10, random_state=seed).fit_predict(Z).astype(str)
        method = "k-means (one cluster per label)"
    return {"ari": float(adjusted_rand_score(y, pred)), "nmi": float(normalized_mutual_info_score(y, pred)),
            "method": method, "n_clusters": int(len(np.unique(pred)))}


def scib_available() -> bool:
    try:
        import scib_metrics  # noqa: F401
    except ImportError:
        return False
    return True


def scib_scores(Z, labels, batches, n_neighbors: int = 90) -> dict:
    """scib-metrics bio-conservation / batch-correction scores of one embedding (unscaled)."""
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    Z = np.asarray(Z, dtype=np.float32)
    lab = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]
    bat = np.unique(np.asarray(batches).astype(str), return_inverse=True)[1]
    k = int(min(n_neighbors, len(Z) - 1))
    d, i = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors(Z)
    nn = NeighborsResults(indices=i, distances=d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = sm.nmi_ari_cluster_labels_kmeans(Z, lab)
        bio = {"isolated_labels": float(sm.isolated_labels(Z, lab, bat)), "kmeans_nmi": float(km["nmi"]),
               "kmeans_ari": float(km["ari"]), "silhouette_label": float(sm.silhouette_label(Z, lab)),
               "clisi": float(sm.clisi_knn(nn, lab))}
        # scib's batch silhouette is defined per label over the batches that label occurs in; with no
        # label seen in two batches it has nothing to average (pandas raises): NaN, left out of the mean.
        shared = any(len(np.unique(bat[lab == c])) > 1 for c in np.unique(lab))
        batch = {"silhouette_batch": float(sm.silhouette_batch(Z, lab, bat)) if shared else float("nan"),
                 "ilisi": float(sm.ilisi_knn(nn, bat)), "graph_connectivity": float(sm.graph_connectivity(nn, lab))}
    b, c = float(np.nanmean(list(bio.values()))), float(np.nanmean(list(batch.values())))
    return {**bio, **batch, "bio_conservation": b, "batch_correction": c, "total": 0.6 * b + 0.4 * c}


def aggregate_seeds(per_seed: list[list[dict]], seeds, keys=METRICS) -> list[dict]:
    """Rows of each seed (same order of (features, classifier)) -> mean / sd (ddof=1) / per-seed values."""
    if not per_seed:
        return []
    out = []
    for j, first in enumerate(per_seed[0]):
        rows = [rs[j] for rs in per_seed]
        ids = {(r["features"], r["classifier"]) for r in rows}
        if len(ids) != 1:
            raise ValueError(f"aggregate_seeds: row {j} differs between seeds: {sorted(ids)}")
        agg = {k: v for k, v in first.items() if k not in keys}
        for key in keys:
            v = np.array([r[key] for r in rows], dtype=np.float64)
            agg[key] = float(v.mean())
            agg[f"{key}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            agg.setdefault("per_seed", {})[key] = [float(x) for x in v]
        agg["n_seeds"], agg["seeds"] = len(rows), [int(s) for s in seeds]
        out.append(agg)
    return out


def random_init_checkpoint(base: str, dest: str, seed: int) -> str:
    """A checkpoint with ``base``'s config, vocabulary and architecture and fresh (seeded) weights."""
    import torch

    from ..checkpoint import build_encoder, read_part, save_checkpoint
    from ..config import Config

    config = Config.from_dict(read_part(base, "config.json"))
    meta = read_part(base, "model.json")
    torch.manual_seed(seed)
    enc = build_encoder(config, meta)
    save_checkpoint(dest, model_state=enc.state_dict(), config=config, vocab=read_part(base, "vocab.json"),
                    model_meta=meta, train_state={"step": 0, "history": [], "random_init_seed": int(seed),
                                                  "control_of": str(base)})
    return str(dest)
