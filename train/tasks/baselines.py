"""Simple baselines and the scoring shared by every row of the evaluation table.

Everything is fitted on the training cells only (HVG selection, PCA, scaling, classifiers) and
applied to the test cells: nothing about the held-out groups leaks into the features.

- normalized counts: log1p(x / cell total * 1e4) (the cell total over all genes the cell has)
- HVGs: ``scanpy.pp.highly_variable_genes`` (flavor "seurat" on log-normalized training cells)
- PCA(50) of the HVG matrix (centered, sklearn), kNN (k=15, euclidean) and logistic regression
- macro-F1 averages over the labels present in the test set (a label the test set lacks would
  add a meaningless 0 or 1).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp


def log1p_normalize(X: sp.csr_matrix, totals: np.ndarray | None = None) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    t = np.asarray(X.sum(axis=1)).ravel() if totals is None else np.asarray(totals, dtype=np.float64)
    scale = np.where(t > 0, 1e4 / np.maximum(t, 1e-12), 0.0)
    X = sp.csr_matrix(sp.diags(scale) @ X)
    X.data = np.log1p(X.data)
    return X


def highly_variable(Xn_train: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Column indices of the top HVGs of log-normalized training cells (scanpy, flavor seurat)."""
    import anndata as ad
    import scanpy as sc

    n_top = int(min(n_top, Xn_train.shape[1]))
    a = ad.AnnData(X=sp.csr_matrix(Xn_train, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
    return np.flatnonzero(a.var["highly_variable"].to_numpy())


def pca_features(Xtr: sp.csr_matrix, Xte: sp.csr_matrix, n_pcs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    dtr, dte = np.asarray(Xtr.todense()), np.asarray(Xte.todense())
    n = int(min(n_pcs, dtr.shape[0] - 1, dtr.shape[1]))
    pca = PCA(n_components=n, random_state=seed, svd_solver="full" if dtr.shape[1] <= 500 else "auto").fit(dtr)
    return pca.transform(dtr), pca.transform(dte)


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    labels = sorted(set(y_true.tolist()))
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}


def knn_predict(Ztr, ytr, Zte, k: int) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    k = int(min(k, len(ytr)))
    return KNeighborsClassifier(n_neighbors=k).fit(Ztr, ytr).predict(Zte)


def logreg_predict(Ztr, ytr, Zte, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sparse = sp.issparse(Ztr)
    scaler = StandardScaler(with_mean=not sparse).fit(Ztr)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny sets: the score says enough
        clf.fit(scaler.transform(Ztr), ytr)
    return clf.predict(scaler.transform(Zte))


def baseline_rows(Xtr_counts: sp.csr_matrix, Xte_counts: sp.csr_matrix, ytr, yte, *, totals_tr=None,
                  totals_te=None, n_hvg: int = 2000, n_pcs: int = 50, k: int = 15, seed: int = 0) -> tuple[list, dict]:
    """Rows (b) PCA(50)+kNN, PCA(50)+LR and (c) LR on normalized HVG counts; plus the features used."""
    ntr, nte = log1p_normalize(Xtr_counts, totals_tr), log1p_normalize(Xte_counts, totals_te)
    hvg = highly_variable(ntr, n_hvg)
    htr, hte = ntr[:, hvg], nte[:, hvg]
    ptr, pte = pca_features(htr, hte, n_pcs, seed)
    pcs = ptr.shape[1]
    rows = [
        {"features": f"PCA({pcs}) of log1p HVG counts", "classifier": f"kNN (k={k})",
         **scores(yte, knn_predict(ptr, ytr, pte, k))},
        {"features": f"PCA({pcs}) of log1p HVG counts", "classifier": "logistic regression",
         **scores(yte, logreg_predict(ptr, ytr, pte, seed))},
        {"features": f"log1p-normalized counts, {len(hvg)} HVGs", "classifier": "logistic regression",
         **scores(yte, logreg_predict(htr, ytr, hte, seed))},
    ]
    return rows, {"n_hvg": int(len(hvg)), "n_pcs": int(pcs), "pca_test": pte, "pca_train": ptr}


def embedding_rows(Etr, Ete, ytr, yte, name: str, k: int = 15, seed: int = 0) -> list:
    """(a) kNN and logistic regression on model embeddings."""
    return [{"features": name, "classifier": f"kNN (k={k})", **scores(yte, knn_predict(Etr, ytr, Ete, k))},
            {"features": name, "classifier": "logistic regression", **scores(yte, logreg_predict(Etr, ytr, Ete, seed))}]
