"""Connecting to Ray the same way from the CLI, tests and `ray job submit`."""

from __future__ import annotations

import os
import socket

# Ray Train V2 starts a detached PlacementGroupCleaner next to every TorchTrainer controller. It asks
# the State API whether the controller is alive and removes the run's placement group when the answer
# is "dead" or "unknown". The State API finds its server by auto-detection: the GCS KV's dashboard
# address (127.0.0.1:8265 even when the dashboard is disabled) or the last `ray start` cluster on the
# machine. On a machine where another Ray runs (a `ray start --head`, another user's job), that is
# the OTHER cluster's dashboard: it has never heard of our controller, so the cleaner removes a live
# run's placement group and its workers die with "Destroying worker since its placement group was
# removed" (a race the second TorchTrainer.fit() of a process usually loses, its worker group
# starting within the cleaner's first 1 s poll). Pinning the State API of every worker and actor of
# our job (the job's runtime_env) to our own dashboard removes the ambiguity. The driver's environment
# is left alone: RAY_API_SERVER_ADDRESS would override the address of any `ray job submit` it runs.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one.

    Idempotent: a process that already called ray.init (a test session, a Ray job) keeps it.
    A local cluster gets its own dashboard on a free port, and its State API address is pinned to it
    (see API_SERVER_ENV above).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # A cluster started with `ray start` is the one auto-detection finds on its own nodes.
        ray.init(log_to_driver=log_to_driver)
        return
    port = _free_port()
    api = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, log_to_driver=log_to_driver, configure_logging=False,
             runtime_env={"env_vars": {API_SERVER_ENV: api}})
