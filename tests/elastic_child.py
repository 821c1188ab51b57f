"""Child process of test_train_elastic.py: an elastic Ray Train run that loses a node.

A local Ray cluster of two nodes (head: 2 CPUs, a second node: 1 CPU) runs `run.num_workers = "2-3"`
with one CPU per worker. Once Ray Train has committed a checkpoint at step >= LOSE_AT (its checkpoint
manager snapshot says so), this driver removes the second node, as a preemptible node vanishes: the
rank on it dies mid-step. Ray Train restarts the group on the 2 workers that still fit, from the last
committed checkpoint. (Waiting for a commit makes the test deterministic: Ray commits a checkpoint
only once every rank's report is collected, so a failure right after a report can lose it.) Prints one
JSON line: the run's result.

    python elastic_child.py STORE RUNS TRACE
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

# Quick failure handling (Ray's defaults wait 60 s per placement attempt and poll every 2 s).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

LOSE_AT = 4


def main(store: str, runs: str, trace: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from atlasflow.train.config import load_preset
    from atlasflow.train.trainer import run_training

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2,
        # the cluster declares a killed node dead within ~1 s (defaults: tens of seconds)
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                           "health_check_timeout_ms": 500, "health_check_initial_delay_ms": 0}})
    victim = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    snapshot = Path(runs) / "elastic" / "checkpoint_manager_snapshot.json"
    removed: list[int] = []

    def committed_step() -> int:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return -1
        return int((latest.get("metrics") or {}).get("step", -1))

    def lose_node():
        while (step := committed_step()) < LOSE_AT:
            time.sleep(0.05)
        cluster.remove_node(victim, allow_graceful=False)
        removed.append(step)

    threading.Thread(target=lose_node, daemon=True).start()
    cfg = load_preset("debug").with_overrides({
        "data.store": store, "data.batch_size": 8, "data.max_len": 64, "model.d_model": 32, "model.d_ff": 64,
        "train.max_steps": 1000, "train.epochs": 1, "train.ckpt_every": 2, "train.log_every": 2,
        "run.storage_path": runs, "run.name": "elastic", "run.num_workers": "2-3", "run.cpus_per_worker": 1.0,
        "run.max_failures": 4, "run.trace_dir": trace})
    t0 = time.time()
    out = run_training(cfg, plot=False)
    print(json.dumps({"step": out["step"], "checkpoint": out["checkpoint"], "seconds": time.time() - t0,
                      "node_removed_after_step": removed[0] if removed else None}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
