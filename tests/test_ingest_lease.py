"""The store's writer lease, with real processes: exclusion, waiting, kill -9 takeover, expiry, fencing;
and two real `atlasflow ingest` processes into one store (concurrent, and the first one killed)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tiledbsoma as soma

from atlasflow.store import PENDING, open_store
from atlasflow.store.lease import WRITER_KEY, LeaseLost, StoreBusy, acquire, lease_location, writer_lease
from atlasflow.store.lease_writer import LeasedStoreWriter
from h5ad_factory import write_h5ad
from lease_children import hold, race, stale_writer

# Children that only touch the lease are forked (a spawned one imports tiledbsoma: ~5-30 s); the one
# that writes the store is spawned (a clean interpreter: no TileDB state inherited across fork).
FORK, SPAWN = mp.get_context("fork"), mp.get_context("spawn")
CLI = [sys.executable, "-m", "atlasflow.infra.cli"]


def _records(store):
    d = lease_location(store)
    return {n: json.load(open(os.path.join(d, n))) for n in sorted(os.listdir(d)) if n.startswith("gen-")}


# -- the lease ------------------------------------------------------------------------------------
def test_one_winner_among_racers(tmp_path):
    store = str(tmp_path / "s")
    n = 4
    barrier, results, release = FORK.Barrier(n), FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=race, args=(store, barrier, results, release)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(n)]
    release.set()
    for p in procs:
        p.join(60)
    winners = [pid for kind, pid in got if kind == "won"]
    assert len(winners) == 1, got
    assert [pid for kind, pid in got if kind == "busy"] == winners * (n - 1)  # the busy ones name the winner
    assert [r["generation"] for r in _records(store).values()] == [1]


def test_fail_fast_names_holder_then_kill9_is_taken_over_at_once(tmp_path):
    store = str(tmp_path / "s")
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=hold, args=(store, ready, release, 600.0))
    holder.start()
    assert ready.wait(120)
    with pytest.raises(StoreBusy) as busy:
        acquire(store, wait_s=0)
    assert busy.value.holder.pid == holder.pid
    assert f"host {socket.gethostname()}, pid {holder.pid}," in str(busy.value)
    assert "command 'holder'" in str(busy.value)

    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    t0 = time.monotonic()
    lease = acquire(store, wait_s=30)  # ttl is 600 s: only the dead pid can make it stale this soon
    took = time.monotonic() - t0
    assert took < 5, took
    assert lease.generation == 2 and lease.record.pid == os.getpid()
    assert list(_records(store)) == ["gen-000000000002.json"]  # the dead holder's record pruned
    lease.release()
    assert _records(store)["gen-000000000002.json"]["released"] is True


def test_waiter_gets_the_lease_when_the_holder_releases(tmp_path, caplog):
    store = str(tmp_path / "s")
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=hold, args=(store, ready, release, 600.0))
    holder.start()
    assert ready.wait(120)
    threading.Timer(2.0, release.set).start()
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="atlasflow.store.lease"):
        with writer_lease(store, wait_s=60) as lease:
            waited = time.monotonic() - t0
            assert lease.generation == 2
    holder.join(30)
    assert waited >= 2.0
    assert any(f"pid {holder.pid}" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)


def test_expired_holder_is_fenced_out(tmp_path):
    """A holder that stops renewing (SIGSTOP: alive, so only expiry can free the lease) loses it;
    when it resumes, its manifest write is refused and the new holder's manifest stays."""
    store = str(tmp_path / "s")
    ready, go, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    old = SPAWN.Process(target=stale_writer, args=(store, ready, go, results))
    old.start()
    try:
        assert ready.wait(120)
        os.kill(old.pid, signal.SIGSTOP)
        time.sleep(2.0)  # > its ttl of 1.5 s; its pid stays alive
        lease = acquire(store, wait_s=0)
        assert lease.generation == 2
        w = LeasedStoreWriter(store, lease)
        w.manifest.next_joinid = 12345  # a visible change of the new holder
        w.commit()
    finally:
        os.kill(old.pid, signal.SIGCONT)
    go.set()
    outcome = results.get(timeout=60)
    old.join(30)
    assert outcome.startswith("LeaseLost:") and "taken over" in outcome, outcome
    assert open_store(store).manifest.next_joinid == 12345
    lease.release()


def test_manifest_token_refuses_a_writer_that_missed_a_change(tmp_path):
    """The second fence: the manifest changed under a writer (another token stored) -> no overwrite."""
    from atlasflow.store.cli import store_info

    store = str(tmp_path / "s")
    with writer_lease(store, wait_s=0) as lease:
        w = LeasedStoreWriter(store, lease)
        assert f"pid {os.getpid()}," in store_info(store)["writer"]  # readers can see who writes
        with soma.Experiment.open(store, "w") as exp:
            exp.metadata[WRITER_KEY] = json.dumps({"token": "someone-else"})
        before = open_store(store).manifest.to_json()
        w.manifest.next_joinid = 99
        with pytest.raises(LeaseLost, match="someone-else"):
            w.commit()
    assert open_store(store).manifest.to_json() == before
    assert store_info(store)["writer"] is None


# -- real ingests ---------------------------------------------------------------------------------
def _cli_ingest(store, *files, wait="600"):
    cmd = [*CLI, "ingest", "--store", store, *map(str, files), "--block-cells", "150", "--num-cpus", "1",
           "--no-progress", "--wait", wait]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_store(uri, sources: dict):
    """Every source's cells exactly once; per-gene sums equal the source's; ranges disjoint."""
    store = open_store(uri)
    complete = store.manifest.complete()
    assert sorted(e.name for e in complete) == sorted(sources)
    ranges = sorted((e.joinid_start, e.joinid_stop) for e in complete)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges
    obs = store.obs(["source_file", "source_row"])
    with store.experiment() as exp:
        assert exp.obs.count == sum(a.n_obs for a in sources.values())  # no orphan rows anywhere
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
    var = store.var()
    file_of = obs.source_file.reindex(x["soma_dim_0"].to_numpy()).to_numpy()
    gene_of = var.feature_id.reindex(x["soma_dim_1"].to_numpy()).to_numpy()
    vals = x["soma_data"].to_numpy().astype(np.float64)
    for name, a in sources.items():
        rows = np.sort(obs[obs.source_file == name].source_row.to_numpy())
        assert np.array_equal(rows, np.arange(a.n_obs)), name
        mine = file_of == name
        sums = pd.Series(vals[mine]).groupby(gene_of[mine]).sum().to_dict()
        want = {g: float(v) for g, v in zip(a.var_names, np.asarray(a.X.sum(axis=0, dtype=np.float64)).ravel()) if v}
        assert sums == want, name


def test_two_concurrent_cli_ingests_into_a_seeded_store(tmp_path, ray_session):
    from atlasflow.ingest import ingest_paths

    uri = str(tmp_path / "store")
    srcs = {f"{k}.h5ad": write_h5ad(tmp_path / f"{k}.h5ad", n_cells=n, n_genes=200, seed=s, gene_offset=off)
            for k, n, s, off in (("seed", 300, 1, 0), ("a", 900, 2, 100), ("b", 700, 3, 250))}
    assert ingest_paths(uri, [str(tmp_path / "seed.h5ad")], progress=False).ok
    t0 = time.monotonic()
    pa, pb = _cli_ingest(uri, tmp_path / "a.h5ad"), _cli_ingest(uri, tmp_path / "b.h5ad")
    outs = [p.communicate(timeout=400) for p in (pa, pb)]
    wall = time.monotonic() - t0
    assert [pa.returncode, pb.returncode] == [0, 0], [e[-2000:] for _, e in outs]
    waited = ["is held by" in err for _, err in outs]
    assert sum(waited) == 1, waited  # one of them found the store busy and waited
    reports = [json.loads(out[out.index("{"):]) for out, _ in outs]
    assert sorted(r["lease_generation"] for r in reports) == [2, 3]  # seed run was generation 1
    _check_store(uri, srcs)
    print(f"two concurrent ingests: {wall:.1f} s wall")


def test_kill9_midway_the_next_ingest_takes_over_and_finishes_both(tmp_path):
    uri = str(tmp_path / "store")
    big = write_h5ad(tmp_path / "big.h5ad", n_cells=3000, n_genes=200, seed=5)
    other = write_h5ad(tmp_path / "other.h5ad", n_cells=400, n_genes=200, seed=6, gene_offset=300)
    first = _cli_ingest(uri, tmp_path / "big.h5ad")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            try:
                states = [e.status for e in open_store(uri).manifest.sources.values()]
            except Exception:
                states = []
            if PENDING in states:
                break
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert [e.status for e in open_store(uri).manifest.sources.values()] == [PENDING], "finished before the kill"
    (rec,) = _records(uri).values()
    assert rec["pid"] == first.pid and not rec["released"]

    second = _cli_ingest(uri, tmp_path / "other.h5ad", wait="0")  # fails unless the dead lease is taken over
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err[-3000:]
    assert f"took over the stale writer lease of host {socket.gethostname()}, pid {first.pid}," in err
    assert json.loads(out[out.index("{"):])["resumed"] == ["big.h5ad"]
    _check_store(uri, {"big.h5ad": big, "other.h5ad": other})


def test_cli_fails_fast_when_the_store_is_held(tmp_path):
    uri = str(tmp_path / "store")
    write_h5ad(tmp_path / "a.h5ad", n_cells=50, n_genes=50, seed=1)
    with writer_lease(uri, wait_s=0, command="test holder"):
        for cmd in ([*CLI, "ingest", "--store", uri, str(tmp_path / "a.h5ad"), "--wait", "0"],
                    [*CLI, "store", "stats", uri, "--wait", "0"]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert r.returncode == 75, r.stderr[-2000:]
            assert f"host {socket.gethostname()}, pid {os.getpid()}," in r.stderr
            assert "command 'test holder'" in r.stderr
    assert not os.path.exists(uri)  # nothing was written
