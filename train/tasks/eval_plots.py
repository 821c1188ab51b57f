"""PNGs of the evaluation: a 2-D map of the embeddings coloured by label, and the score bar chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_PLOT_CELLS = 2000  # t-SNE cost grows fast; a seeded subsample shows the structure just as well


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def embed_2d(emb: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    z = emb if emb.shape[1] <= 50 else PCA(50, random_state=seed).fit_transform(emb)
    if len(z) < 10:
        return PCA(2, random_state=seed).fit_transform(z) if len(z) > 2 else np.zeros((len(z), 2))
    return TSNE(2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=seed).fit_transform(z)


def plot_embedding(emb: np.ndarray, labels: np.ndarray, is_test: np.ndarray, path: Path, seed: int = 0,
                   title: str = "atlasflow embedding (t-SNE), by label") -> Path:
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    idx = np.arange(len(emb)) if len(emb) <= MAX_PLOT_CELLS else np.sort(rng.choice(len(emb), MAX_PLOT_CELLS, False))
    xy = embed_2d(emb[idx], seed)
    lab, test = np.asarray(labels)[idx], np.asarray(is_test)[idx]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(sorted(set(lab.tolist()))):
        m = lab == c
        axes[0].scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(i % 20), label=f"{c} ({int(m.sum())})")
    axes[0].legend(markerscale=3, fontsize=7, loc="best")
    axes[0].set_title(title)
    for m, name, col in ((~test, "train", "#999999"), (test, "test (held-out groups)", "#d62728")):
        axes[1].scatter(xy[m, 0], xy[m, 1], s=4, color=col, label=f"{name} ({int(m.sum())})")
    axes[1].legend(markerscale=3, fontsize=8)
    axes[1].set_title("by split")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_scores(rows: list[dict], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    names = [f"{r['features']}\n{r['classifier']}" for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(rows) + 1.5))
    # error bars: sd over seeds (0 for deterministic rows)
    ax.barh(y - 0.2, [r["accuracy"] for r in rows], 0.4, xerr=[r.get("accuracy_sd", 0.0) for r in rows],
            label="accuracy", capsize=2)
    ax.barh(y + 0.2, [r["macro_f1"] for r in rows], 0.4, xerr=[r.get("macro_f1_sd", 0.0) for r in rows],
            label="macro-F1", capsize=2)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title(title[:120], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
