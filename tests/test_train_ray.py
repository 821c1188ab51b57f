"""Ray Train end to end (the one Ray-starting test of train/): `atlasflow train` on 2 CPU workers.

1. A worker raises at step 3 (run.fail_at_step); Ray Train restarts the worker group from the step-2
   checkpoint and every rank's loader resumes exactly: over the run, each rank's micro-batches are
   exactly its loader's own sequence, the replayed ones are the same cells, and within the epoch no
   soma_joinid is seen twice or skipped across the ranks.
2. Running the command again with the same storage path and name resumes from the last
   checkpoint (here with a larger step budget) instead of starting over.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from atlasflow.infra.cli import main as atlasflow_main
from atlasflow.train.loop import loader_config

loader_mod = pytest.importorskip("atlasflow.loader")
if not hasattr(loader_mod, "make_loader"):
    pytest.skip("atlasflow.loader.make_loader not available yet", allow_module_level=True)


def expected_by_rank(cfg, world: int, epochs: int) -> dict[int, dict[tuple[int, int], list[int]]]:
    """Each rank's loader sequence, read directly (no training, no Ray)."""
    out = {}
    for rank in range(world):
        loader = loader_mod.make_loader(cfg.data.store, loader_config(cfg, rank, world))
        seq = {}
        for e in range(epochs):
            loader.dataset.set_epoch(e)
            for i, b in enumerate(loader):
                seq[(e, i + 1)] = b["soma_joinid"].tolist()
        out[rank] = seq
    return out


def read_trace(trace_dir, rank):
    return [json.loads(x) for x in (trace_dir / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_fault_injection_restart_and_rerun_resume(tmp_path, ray_session):
    from test_train_loop import make_store

    store = make_store(tmp_path / "store", n_cells=96)
    trace = tmp_path / "trace"
    runs = tmp_path / "runs"
    cmd = ["train", "--preset", "debug", "--store", store, "--storage-path", str(runs), "--name", "ft",
           "--set", "data.batch_size=8", "--set", "data.max_len=64", "--set", "train.ckpt_every=2",
           "--set", "model.d_model=32", "--set", "train.epochs=2", "--set", f"run.trace_dir=\"{trace}\"", "--set", "run.fail_rank=1"]
    assert atlasflow_main(cmd + ["--set", "train.max_steps=4", "--set", "run.fail_at_step=3"]) == 0
    assert (runs / "ft" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trace / ".failure_injected_at_step3").exists()

    # 2. the same command again, with a larger budget: resumes at step 4, crosses into epoch 1
    assert atlasflow_main(cmd + ["--set", "train.max_steps=8", "--set", "run.fail_at_step=3"]) == 0

    from atlasflow.train.config import load_preset

    cfg = load_preset("debug").with_overrides({"data.store": store, "data.batch_size": 8, "data.max_len": 64})
    expected = expected_by_rank(cfg, 2, 2)
    bpe = len([k for k in expected[0] if k[0] == 0])
    assert bpe == 6  # 96 cells / 2 ranks / 8 per batch
    per_epoch = defaultdict(list)
    for rank in (0, 1):
        recs = read_trace(trace, rank)
        attempts = list(dict.fromkeys(r["attempt"] for r in recs))
        assert len(attempts) == 3, attempts  # original, Ray restart after the failure, re-run
        starts = [next(r for r in recs if r["attempt"] == a)["resumed_from"] for a in attempts]
        assert starts == [0, 2, 4]
        final, seen_first = {}, {}
        for r in recs:
            key = (r["epoch"], r["micro"])
            if key in final:  # a replayed micro-batch holds the very same cells
                assert final[key] == r["joinids"], key
            final[key] = r["joinids"]
            seen_first.setdefault(key, r["attempt"])
        assert sorted(final) == sorted(k for k in expected[rank])[:8]
        for key, ids in final.items():
            assert ids == expected[rank][key], (rank, key)
            per_epoch[key[0]] += ids
    epoch0 = per_epoch[0]
    assert len(epoch0) == len(set(epoch0)) == 96  # every cell of the store exactly once in epoch 0
    assert set(epoch0) == set(range(96))

    from atlasflow.train.checkpoint import read_part

    ckpts = sorted(p for p in (runs / "ft").glob("checkpoint_*") if p.is_dir())
    state = read_part(ckpts[-1], "train_state.json")
    assert state["step"] == 8 and (state["epoch"], state["micro_in_epoch"]) == (1, 2)
    assert state["cells_seen"] == 8 * 8  # rank 0's count: 8 micro-batches of 8 cells
    steps = [h["step"] for h in state["history"]]
    assert steps[-1] == 8 and set(range(1, 9)) <= set(steps)
    assert all(0 <= h["pad_fraction"] < 1 and h["tokens_per_s"] > 0 for h in state["history"])
    assert read_part(ckpts[-1], "loader.pt")["world_size"] == 2
    assert read_part(ckpts[-1], "format.json")["format_version"] == 2
