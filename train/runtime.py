"""One Ray Train runtime for pretraining and fine-tuning.

Both drivers hand a worker loop and its config to ``fit_on_ray`` (TorchTrainer + ScalingConfig +
RunConfig with storage, failure and checkpoint settings; elastic when a minimum worker count is given),
and both loops talk only to a ``WorkerContext``: on Ray Train ``ray_worker_context()`` builds it (rank,
world, device, the latest committed checkpoint, report, model wrapping for DDP / FSDP); a plain process
(tests, evaluations that fine-tune many small models) builds one by hand with world size 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    restore_dir: Callable[[], object]  # context manager yielding a checkpoint dir, or None
    report: Callable[[dict, str | None], None]  # (metrics, checkpoint dir or None)
    wrap: Callable[[torch.nn.Module, str], torch.nn.Module] = lambda m, strategy: m


@dataclass(frozen=True)
class RayRun:
    """Where and on how many workers a run goes (the fields pretraining's ``run`` and FinetuneConfig share)."""

    name: str
    storage_path: str
    num_workers: int
    min_workers: int = 0  # 0 < min < num: elastic (Ray Train (re)starts on as many as fit, at least min)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0 with use_gpu -> 1 GPU per worker
    max_failures: int = 0
    num_to_keep: int | None = None  # checkpoints kept (None: all)

    @property
    def workers(self) -> int | tuple[int, int]:
        return (self.min_workers, self.num_workers) if 0 < self.min_workers < self.num_workers else self.num_workers


def parallel_kwargs(strategy: str) -> dict | None:
    """Wrapper arguments for ray.train.torch.prepare_model (DDP: Ray's defaults)."""
    if strategy != "fsdp":
        return None
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from .model import Block

    # One FSDP unit per transformer block: parameters are gathered a block at a time (a root-only
    # wrap gathers the whole model for every forward); original parameters for compiled blocks.
    return {"auto_wrap_policy": ModuleWrapPolicy({Block}), "use_orig_params": True}


@contextlib.contextmanager
def ray_restore_dir():
    """The latest committed Ray Train checkpoint of this run as a local directory, or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
    else:
        with ckpt.as_directory() as d:
            yield d


def ray_worker_context() -> WorkerContext:
    """The context of this Ray Train worker."""
    import ray.train
    import ray.train.torch

    rc = ray.train.get_context()
    device = ray.train.torch.get_device()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def wrap(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
        if rc.get_world_size() == 1 and strategy != "fsdp":  # FSDP on one rank: still sharded code paths
            return model.to(device)
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy,
                                             parallel_strategy_kwargs=parallel_kwargs(strategy))

    return WorkerContext(rank=rc.get_world_rank(), world_size=rc.get_world_size(), device=device,
                         restore_dir=ray_restore_dir, report=report, wrap=wrap)


def fit_on_ray(loop: Callable[[dict], None], loop_config: dict, run: RayRun, what: str = "run"):
    """Run ``loop`` on Ray Train workers and return the Result; a run that ends without a checkpoint
    raises, naming ``what`` and the run. Re-running the same storage_path/name resumes it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from atlasflow.store.ray_env import init_ray

    init_ray()  # not TorchTrainer's implicit ray.init: see ray_env for why the State API is pinned
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=run.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run.name, storage_path=run.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=run.num_to_keep),
                             failure_config=FailureConfig(max_failures=run.max_failures)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{what} {run.name}: finished without a checkpoint (error: {result.error})")
    return result
