"""Loss curve PNG from the metric history kept in the checkpoint (train_state.json)."""

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
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [h["loss"] for h in hist], marker="o", ms=2, lw=1.2, label="MLM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
