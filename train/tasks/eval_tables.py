"""The evaluation's tables: rows of every seed aggregated (mean ± sd), the reference rows, the
within-test-set and scib tables against PCA, and their markdown (``eval.md``)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

EVAL_FORMAT_VERSION = 2  # v2: seeds (mean/sd rows), control rows, cv / clustering / scib tables


def assemble(cfg, ckpts, source_names, es, tr, te, test_groups, unseen_label, ytr, yte, shared, n_tok, binfo, leakage,
              per_seed, brows, mrow, ft_info, pca_all) -> dict:
    from .eval_metrics import aggregate_seeds, clustering_scores, cv_label_prediction, scib_available, scib_scores

    agg = {k: aggregate_seeds([s[k] for s in per_seed], cfg.seeds, keys) for k, keys in
           (("transfer", ("accuracy", "macro_f1")), ("cv", ("accuracy", "macro_f1")),
            ("cluster", ("ari", "nmi")), ("scib", ("bio_conservation", "batch_correction", "total")))}
    det = {"n_seeds": 1, "deterministic": True}
    pfeat = f"PCA({pca_all.shape[1]}) of log1p HVG counts (all cells)"
    cv = agg["cv"] + ([{"features": pfeat, **r, **det} for r in cv_label_prediction(pca_all[te], yte, cfg.cv_folds,
                                                                                     cfg.seed)]
                      if cfg.cv_folds else [])
    cluster = agg["cluster"] + ([{"features": pfeat, "classifier": "clustering", **det,
                                  **clustering_scores(pca_all[te], yte, cfg.seed)}] if cfg.cluster else [])
    scib = None
    if cfg.scib:
        if scib_available():
            both = np.concatenate([tr, te])
            scib = agg["scib"] + [{"features": pfeat, "classifier": "scib-metrics", **det,
                                   **scib_scores(pca_all[both], es.labels[both], es.sources[both])}]
        else:
            scib = "skipped: scib-metrics is not installed (pip install 'atlasflow[eval]')"
    rows = agg["transfer"] + [{**r, **det} for r in brows] + [{**mrow, **det}]
    return {
        "format_version": EVAL_FORMAT_VERSION, "checkpoint": ckpts[0], "checkpoints": ckpts, "seeds": list(cfg.seeds),
        "pretraining_seeds": len(set(ckpts)), "sources": list(source_names), "label": cfg.label,
        "split_by": cfg.split_by, "train_groups": sorted(set(es.groups[tr].tolist())),
        "test_groups": sorted(test_groups), "n_train": int(len(tr)), "n_test": int(len(te)),
        "test_cells_dropped_unseen_label": int(unseen_label.sum()), "cells_dropped_unlabelled": es.dropped_unlabelled,
        "labels_train": _counts(ytr), "labels_test": _counts(yte),
        "genes_shared_train_test": int(len(shared)), "genes_tokenized": n_tok, "n_hvg": binfo["n_hvg"],
        "n_pcs": binfo["n_pcs"], "leakage": leakage, "finetune": ft_info or None,
        "config": {k: v for k, v in asdict(cfg).items()}, "rows": rows,
        "cv_test_cells": cv, "clustering_test_cells": cluster, "scib_all_cells": scib,
    }


def _counts(y) -> dict:
    u, c = np.unique(np.asarray(y, dtype=str), return_counts=True)
    return {str(a): int(b) for a, b in zip(u, c)}


def _pm(r: dict, key: str) -> str:
    if r.get("n_seeds", 1) > 1:
        return f"{r[key]:.3f} ± {r[key + '_sd']:.3f}"
    return f"{r[key]:.3f}"


def to_markdown(table: dict) -> str:
    seeds = table.get("seeds", [0])
    lines = [f"Test groups ({table['split_by']}): {', '.join(table['test_groups'])}; "
             f"train: {len(table['train_groups'])} group(s). Cells: {table['n_train']} train, {table['n_test']} test. "
             f"Genes: {table.get('genes_shared_train_test')} detected on both sides, "
             f"{table.get('genes_tokenized')} of them tokenized. Trained rows: mean ± sd over seeds {seeds} "
             f"({table.get('pretraining_seeds', 1)} pretraining checkpoint(s)).",
             "", "| features | classifier | accuracy | macro-F1 | seeds |", "|---|---|---:|---:|---:|"]
    for r in table["rows"]:
        lines.append(f"| {r['features']} | {r['classifier']} | {_pm(r, 'accuracy')} | {_pm(r, 'macro_f1')} | "
                     f"{r.get('n_seeds', 1)} |")
    if table.get("cv_test_cells"):
        lines += ["", "Label prediction on the test cells' embeddings (cz-benchmarks protocol: stratified CV):", "",
                  "| features | classifier | accuracy | macro-F1 |", "|---|---|---:|---:|"]
        lines += [f"| {r['features']} | {r['classifier']} | {_pm(r, 'accuracy')} | {_pm(r, 'macro_f1')} |"
                  for r in table["cv_test_cells"]]
    if table.get("clustering_test_cells"):
        m = table["clustering_test_cells"][0].get("method", "")
        lines += ["", f"Clustering of the test cells ({m}) against the labels:", "", "| features | ARI | NMI |",
                  "|---|---:|---:|"]
        lines += [f"| {r['features']} | {_pm(r, 'ari')} | {_pm(r, 'nmi')} |" for r in table["clustering_test_cells"]]
    sc = table.get("scib_all_cells")
    if isinstance(sc, list) and sc:
        lines += ["", "scib-metrics on all cells (batch = source; unscaled; total = 0.6 bio + 0.4 batch):", "",
                  "| features | bio conservation | batch correction | total |", "|---|---:|---:|---:|"]
        lines += [f"| {r['features']} | {_pm(r, 'bio_conservation')} | {_pm(r, 'batch_correction')} | "
                  f"{_pm(r, 'total')} |" for r in sc]
    elif isinstance(sc, str):
        lines += ["", f"scib-metrics: {sc}"]
    warn = table["leakage"].get("warning")
    if warn:
        lines += ["", f"**Leakage warning:** {warn}"]
    return "\n".join(lines) + "\n"
