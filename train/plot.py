"""Loss curve PNG from the metric history kept in the checkpoint (train_state.json).

Left: the MLM loss with the unigram and per-position-unigram baselines of the same masked tokens
and the held-out (val split) loss at the steps it was measured, and with ``objective.cell_weight`` the
cell term and its gene-frequency baseline, with ``objective.contrast_weight`` the contrastive
term and its chance level; right: masked accuracy (train, val).
Histories written before the baselines existed plot the loss alone.
"""

from __future__ import annotations

from pathlib import Path


def dedupe_history(history: list[dict]) -> list[dict]:
    """One record per step, the latest one: steps replayed after a restart replace the lost ones."""
    by_step: dict[int, dict] = {}
    for rec in history:
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(history: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    hist = dedupe_history(history)
    if not hist:
        raise ValueError("history: no logged steps to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in hist]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(steps, [h["loss"] for h in hist], marker="o", ms=2, lw=1.2, label="MLM loss (train)")
    for key, label, style in (("unigram_loss", "unigram baseline", "--"),
                              ("position_unigram_loss", "per-position unigram", ":")):
        if all(h.get(key) is not None for h in hist):
            ax.plot(steps, [h[key] for h in hist], style, lw=1.2, label=label)
    if all(h.get("cell_loss") is not None for h in hist):
        ax.plot(steps, [h["cell_loss"] for h in hist], lw=1.2, label="cell term (genes from the cell vector)")
        if all(h.get("cell_unigram_loss") is not None for h in hist):
            ax.plot(steps, [h["cell_unigram_loss"] for h in hist], "-.", lw=1.0, label="cell term's frequency baseline")
    if all(h.get("contrast_loss") is not None for h in hist):
        ax.plot(steps, [h["contrast_loss"] for h in hist], lw=1.2, label="contrastive term (two views)")
        ax.plot(steps, [h["contrast_chance"] for h in hist], "-.", lw=1.0, label="contrastive term at chance")
    val = [h for h in hist if h.get("val_loss") is not None and h.get("val_step") == h["step"]]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "s-", ms=4, lw=1.2,
                label=f"held-out loss ({val[-1].get('val_cells', '?')} val cells)")
        if val[-1].get("val_unigram_loss") is not None:
            ax.axhline(val[-1]["val_unigram_loss"], color="grey", lw=0.8, ls="--", label="held-out unigram")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title or "pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if all(h.get("masked_accuracy") is not None for h in hist):
        ax2.plot(steps, [h["masked_accuracy"] for h in hist], lw=1.2, label="train")
    if val and val[-1].get("val_masked_accuracy") is not None:
        ax2.plot([h["step"] for h in val], [h["val_masked_accuracy"] for h in val], "s-", ms=4, label="held-out")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("masked accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
