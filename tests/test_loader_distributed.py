"""Rank and world size come from the environment when not given: a real torch.distributed process
group (gloo, 2 processes) and a real Ray Train run (2 workers). Either way the ranks together
stream every committed cell exactly once, with equal batch counts."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.store import open_store

from test_loader_fixtures import synth_store

SMALL = dict(tokenizer="value", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=5)


def _committed(uri: str) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in open_store(uri).complete_ranges()])


def _stream_and_save(uri: str, out_dir: str) -> None:
    """Builds the loader WITHOUT rank/world_size and saves what this rank streamed."""
    loader = make_loader(uri, LoaderConfig(**SMALL))
    ds = loader.dataset
    ids = [b["soma_joinid"].numpy() for b in loader]
    np.savez(f"{out_dir}/rank{ds.rank}.npz", ids=np.concatenate(ids), n_batches=len(ids),
             world=ds.world_size, expected_batches=ds.batches_per_epoch)


def _torch_worker(rank: int, world: int, port: int, uri: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _stream_and_save(uri, out_dir)
    finally:
        dist.destroy_process_group()


def _check_ranks(out_dir, committed: np.ndarray, world: int) -> None:
    runs = [np.load(f"{out_dir}/rank{r}.npz") for r in range(world)]  # a missing file = a wrong rank
    assert [int(r["world"]) for r in runs] == [world] * world
    assert len({int(r["n_batches"]) for r in runs}) == 1  # DDP never waits on a rank with fewer batches
    assert all(int(r["n_batches"]) == int(r["expected_batches"]) for r in runs)
    seen = np.concatenate([r["ids"] for r in runs])
    # 1280 cells split into 2 shards of 640 = 40 batches of 16: nothing dropped, nothing twice
    assert len(seen) == len(committed)
    assert np.array_equal(np.sort(seen), committed)


def test_rank_from_torch_distributed(tmp_path_factory, tmp_path):
    import socket

    uri = synth_store(tmp_path_factory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_torch_worker, args=(2, port, uri, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    _check_ranks(tmp_path, _committed(uri), 2)


def _ray_loop(config: dict) -> None:
    _stream_and_save(config["uri"], config["out_dir"])


def test_rank_from_ray_train(ray_session, tmp_path_factory, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    uri = synth_store(tmp_path_factory)
    TorchTrainer(_ray_loop, train_loop_config={"uri": uri, "out_dir": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="rank_detect")).fit()
    _check_ranks(tmp_path, _committed(uri), 2)
