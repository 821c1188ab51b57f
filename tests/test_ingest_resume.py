"""kill -9 in the middle of an ingest, re-run: every source's cells exactly once, nothing orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from atlasflow.ingest import ingest_paths
from atlasflow.store import PENDING, open_store
from h5ad_factory import write_h5ad

N_FILES, N_CELLS = 4, 2000


def _manifest_states(uri):
    try:
        m = open_store(uri).manifest
    except Exception:
        return {}
    return {e.name: e.status for e in m.sources.values()}


def test_killed_ingest_resumes_exactly_once(tmp_path, ray_session):
    src = tmp_path / "src"
    src.mkdir()
    totals = {}
    for i in range(N_FILES):
        a = write_h5ad(src / f"part{i}.h5ad", n_cells=N_CELLS, n_genes=300, seed=10 + i)
        totals[f"part{i}.h5ad"] = float(a.X.sum())
    uri = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "atlasflow.infra.cli", "ingest", "--store", uri, str(src),
           "--block-cells", "100", "--num-cpus", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            states = _manifest_states(uri)
            if list(states.values()).count("complete") >= 1:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
    states = _manifest_states(uri)
    assert proc.returncode == -signal.SIGKILL
    assert list(states.values()).count("complete") < N_FILES, f"ingest finished before the kill: {states}"
    assert PENDING in states.values() or len(states) < N_FILES

    report = ingest_paths(uri, [str(src)], block_cells=500, progress=False)
    assert report.ok, report.failed
    store = open_store(uri)
    assert sorted(e.name for e in store.manifest.complete()) == sorted(totals)
    obs = store.obs(["source_file", "source_row"])
    for name in totals:
        rows = np.sort(obs[obs.source_file == name].source_row.to_numpy())
        assert np.array_equal(rows, np.arange(N_CELLS)), name
    with store.experiment() as exp:
        assert exp.obs.count == N_FILES * N_CELLS  # pending ranges were reused, no orphans
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
    sums = obs.source_file.reindex(x["soma_dim_0"].to_numpy()).to_numpy()
    data = x["soma_data"].to_numpy()
    for name, total in totals.items():
        assert data[sums == name].sum() == total, name

    # And a second re-run adds nothing.
    again = ingest_paths(uri, [str(src)], progress=False)
    assert again.added == [] and len(again.skipped) == N_FILES
    assert open_store(uri).n_cells == N_FILES * N_CELLS
