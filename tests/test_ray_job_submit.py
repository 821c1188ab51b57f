"""`atlasflow ingest`, `store stats` and `train` as Ray jobs: `ray start --head` + `ray job submit
--working-dir .` on loopback, the way a cluster user runs them."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atlasflow.store import open_store
from h5ad_factory import write_h5ad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_ingest_under_ray_job_submit(tmp_path):
    bindir = str(Path(sys.executable).parent)
    ray_bin, env = os.path.join(bindir, "ray"), dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    # Ray >= 2.59 enables token auth on clusters from `ray start`: give head and client one token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    work = tmp_path / "job"
    work.mkdir()
    write_h5ad(work / "a.h5ad", n_cells=120, seed=1)
    write_h5ad(work / "b.h5ad", n_cells=80, seed=2, by="symbol")
    store = tmp_path / "store"
    gcs, dash = _free_port(), _free_port()
    # Every listening port explicit: another Ray on this machine (the test session's) holds the defaults.
    extra_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                    "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                                    "--object-manager-port", "--ray-client-server-port")
                   for arg in (flag, str(_free_port()))]
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "true",
         "--temp-dir", tempfile.mkdtemp(prefix="rj", dir="/tmp"), *extra_ports],  # short path: unix sockets
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answered (e.g. 401 under Ray token auth): it is up
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("ray head did not come up")
                time.sleep(1)
        for _ in range(20):  # the dashboard answers before its job agent is ready
            job = subprocess.run(
                [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
                 "atlasflow", "ingest", "--store", str(store), "a.h5ad", "b.h5ad", "--no-progress"],
                cwd=work, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "2 added" in job.stdout + job.stderr
        runs = tmp_path / "runs"
        for cmd in (["atlasflow", "store", "stats", str(store)],
                    ["atlasflow", "train", "--preset", "debug", "--store", str(store), "--storage-path", str(runs),
                     "--name", "rj", "--set", "train.max_steps=4", "--set", "train.ckpt_every=2", "--no-plot"]):
            job = subprocess.run([ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--", *cmd],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=300)
            assert job.returncode == 0, " ".join(cmd) + job.stdout[-3000:] + job.stderr[-3000:]
        summary = json.loads(job.stdout[job.stdout.index("{\n"):job.stdout.rindex("}") + 1])
        assert summary["step"] == 4 and Path(summary["checkpoint"]).is_dir()
        assert str(runs) in summary["checkpoint"]
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
    s = open_store(str(store))
    assert s.n_cells == 200
    assert sorted(s.obs(["source_file"]).source_file.unique()) == ["a.h5ad", "b.h5ad"]
