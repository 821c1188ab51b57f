"""The pretraining driver: ``run_training(config) -> result dict`` (used by the CLI and the README job)
runs the loop on Ray Train through ``runtime.fit_on_ray``, the runtime fine-tuning uses too.

Re-running with the same ``run.storage_path``/``run.name`` resumes: Ray Train restores the latest
checkpoint of that run and the loop continues from its step and loader positions.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .loop import FAIL_ENV, train_loop_per_worker
from .runtime import RayRun, fit_on_ray


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def resolve(cfg: Config) -> Config:
    """Driver-side completion: absolute local paths, fault-injection env var, store check."""
    over: dict = {}
    if not cfg.data.store:
        raise ValueError("data.store: no store given (use --store or --set data.store=URI)")
    if _is_local(cfg.data.store):
        store = Path(cfg.data.store.removeprefix("file://")).resolve()
        if not store.exists():
            raise FileNotFoundError(f"data.store: {store} does not exist")
        over["data.store"] = str(store)
        from atlasflow.store import open_store

        open_store(str(store)).require_counts("data.store: pretraining")
    if _is_local(cfg.run.storage_path):
        # Ray Train wants an absolute local storage path; workers may run in another cwd.
        over["run.storage_path"] = str(Path(cfg.run.storage_path.removeprefix("file://")).resolve())
    if os.environ.get(FAIL_ENV) and not cfg.run.fail_at_step:
        try:
            over["run.fail_at_step"] = int(os.environ[FAIL_ENV])
        except ValueError:
            raise ValueError(f"{FAIL_ENV}: must be an integer step, got {os.environ[FAIL_ENV]!r}") from None
    if cfg.run.fail_at_step or over.get("run.fail_at_step"):
        if not (_is_local(cfg.run.storage_path) or cfg.run.trace_dir):
            raise ValueError("run.fail_at_step: fault injection needs a local run.storage_path or run.trace_dir")
    return cfg.with_overrides(over) if over else cfg


def ray_run(cfg: Config) -> RayRun:
    """The run's placement. Elastic (min < max): Ray Train starts, and after a failure restarts, as many
    workers as the cluster can place, at least min_workers; the loop resumes the epoch exactly on the new
    count."""
    r = cfg.run
    return RayRun(name=r.name, storage_path=r.storage_path, num_workers=r.num_workers, min_workers=r.min_workers,
                  use_gpu=r.use_gpu, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                  max_failures=r.max_failures, num_to_keep=r.num_to_keep)


def run_training(config: Config, plot: bool = True) -> dict:
    """Train (or resume) and return {metrics, checkpoint, loss_png, history, run_dir}."""
    from .checkpoint import read_part

    cfg = resolve(config)
    result = fit_on_ray(train_loop_per_worker, cfg.to_dict(), ray_run(cfg))
    with result.checkpoint.as_directory() as d:
        state = read_part(d, "train_state.json")
    run_dir = os.path.join(cfg.run.storage_path, cfg.run.name)
    out = {"metrics": state["history"][-1] if state["history"] else dict(result.metrics or {}),
           "step": state["step"], "checkpoint": result.checkpoint.path, "history": state["history"],
           "run_dir": run_dir, "loss_png": None}
    if plot and state["history"]:
        from .plot import plot_loss

        png_dir = Path(run_dir) if _is_local(run_dir) else Path.cwd()
        out["loss_png"] = str(plot_loss(state["history"], png_dir / "loss.png", title=cfg.run.name))
    return out
