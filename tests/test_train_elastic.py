"""Elastic training under real Ray Train: 3 CPU workers; after a checkpoint at step >= 4 is committed,
the node of one rank is lost (that rank dies mid-step); the run continues on 2 workers (run.num_workers = "2-3"). Over the committed steps, the traced
soma_joinids cover the epoch's cells exactly once (but for the documented drop of the last phase);
the final checkpoint has the same parts and format as a fixed-size run's.

The run is a child process (its own two-node Ray cluster, see elastic_child.py), so the test
session's Ray is not disturbed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from atlasflow.train.checkpoint import read_part

HERE = Path(__file__).resolve().parent
N_CELLS, BATCH = 960, 8  # 40 steps on 3 workers: the node is lost well before the end


def committed_records(trace: Path) -> list[dict]:
    """Trace records of the steps that count: every (re)start of the group resumes from a checkpoint
    (resumed_from); an attempt's records count up to the step the next attempt resumed from."""
    recs = [json.loads(x) for f in sorted(trace.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
    by_attempt = defaultdict(list)
    for r in recs:
        by_attempt[r["attempt"]].append(r)
    attempts = sorted(by_attempt, key=lambda a: int(a.split("-")[0]))  # start time of rank 0
    out = []
    for i, a in enumerate(attempts):
        upto = by_attempt[attempts[i + 1]][0]["resumed_from"] if i + 1 < len(attempts) else float("inf")
        out += [r for r in by_attempt[a] if r["step"] < upto]  # a micro-batch at step s is trained in step s+1
    return out, [(a, by_attempt[a][0]["world_size"], by_attempt[a][0]["resumed_from"]) for a in attempts]


@pytest.mark.ray
def test_a_lost_node_shrinks_the_run_and_the_epoch_stays_exact(tmp_path):
    from test_train_loop import local_context, make_store

    from atlasflow.train.config import load_preset
    from atlasflow.train.loop import run_worker

    store = make_store(tmp_path / "store", n_cells=N_CELLS)
    trace, runs = tmp_path / "trace", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(HERE / "elastic_child.py"), store, str(runs), str(trace)],
                          capture_output=True, text=True, timeout=420, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node_removed_after_step"] >= 4

    recs, attempts = committed_records(trace)
    worlds = [w for _, w, _ in attempts]
    assert worlds[0] == 3 and worlds[-1] == 2, attempts  # started on 3, finished on 2
    assert attempts[-1][2] >= 4  # the final attempt resumed from a committed checkpoint, not from scratch
    ids = [j for r in recs for j in r["joinids"]]
    assert all(r["epoch"] == 0 for r in recs)
    assert len(ids) == len(set(ids)), "a cell was trained twice in the epoch"
    assert set(ids) <= set(range(N_CELLS))
    assert N_CELLS - len(ids) < 2 * (BATCH + 1)  # only the last phase (2 shards) drops a remainder
    # every committed step has one micro-batch per rank of its attempt
    per_step = defaultdict(int)
    for r in recs:
        per_step[(r["attempt"], r["step"])] += 1
    world_of = {a: w for a, w, _ in attempts}
    assert all(n == world_of[a] for (a, _), n in per_step.items())

    final = Path(result["checkpoint"])
    state = read_part(final, "train_state.json")
    assert state["world0"] == 3 and state["epoch"] == 0
    assert read_part(final, "loader.pt")["world_size"] == 2
    # the same parts and versions as a checkpoint of a fixed-size run
    cfg = load_preset("debug").with_overrides({"data.store": store, "data.batch_size": 8, "data.max_len": 64,
                                               "model.d_model": 32, "model.d_ff": 64, "train.max_steps": 2,
                                               "run.num_workers": 1})
    ctx, _ = local_context(tmp_path / "fixed")
    run_worker(cfg, ctx)
    fixed = json.loads((tmp_path / "fixed" / "ckpt_2" / "format.json").read_text())
    assert json.loads((final / "format.json").read_text()) == fixed
    assert read_part(final, "loader.pt").keys() == read_part(tmp_path / "fixed" / "ckpt_2", "loader.pt").keys()
