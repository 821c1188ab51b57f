"""Connecting to Ray the same way from the CLI, tests and `ray job submit`."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one.

    Idempotent: a process that already called ray.init (a test session, a Ray job) keeps it.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
             configure_logging=False)
