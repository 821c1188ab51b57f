"""The local Ray started by init_ray answers State API questions about its own actors.

Ray Train V2's PlacementGroupCleaner removes a run's placement group as soon as the State API,
queried from inside the job, does not report the run's controller as alive. Before init_ray pinned
the State API to its own dashboard, that query went to whatever auto-detection found (127.0.0.1:8265
or the last `ray start` cluster on the machine): a second TorchTrainer.fit() in one process lost its
workers ("Destroying worker since its placement group was removed") whenever another Ray ran.
"""

from __future__ import annotations

import pytest


@pytest.mark.ray
def test_state_api_inside_the_job_sees_our_own_actors(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

        def alive(self, actor_id: str):
            # The very call the cleaner makes (ray.train.v2 _internal.state.util.is_actor_alive).
            from ray.train.v2._internal.state.util import is_actor_alive

            return is_actor_alive(actor_id, timeout=20)

    target, asker = Probe.remote(), Probe.remote()
    tid = ray.get(target.actor_id.remote())
    assert ray.get(asker.alive.remote(tid)) is True
    ray.kill(target)
    import time

    deadline = time.time() + 30
    while ray.get(asker.alive.remote(tid)) and time.time() < deadline:
        time.sleep(0.5)
    assert ray.get(asker.alive.remote(tid)) is False  # a dead controller is still recognised as dead
    ray.kill(asker)
