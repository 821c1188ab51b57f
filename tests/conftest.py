"""Shared fixtures: the real datasets in ../shared/data and one local Ray for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests must never grab the whole machine's memory for TileDB buffers.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir() or not list(SHARED_DATA.glob("*.h5ad")):
        pytest.skip(f"real datasets not found at {SHARED_DATA} (the ../shared/data checkout beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (start-up costs ~5-10 s)."""
    import ray

    from atlasflow.store.ray_env import init_ray

    started = False
    if not ray.is_initialized():
        init_ray(num_cpus=2, log_to_driver=False)  # the production start-up (State API pinned to it)
        started = True
    yield ray
    if started:
        ray.shutdown()
