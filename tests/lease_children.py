"""Child-process bodies for test_ingest_lease.py, in a module of their own so that a spawned child
imports only what it uses (the test module pulls in anndata and the h5ad factory)."""

from __future__ import annotations

import os


def hold(store, ready, release, ttl):
    from atlasflow.store.lease import writer_lease

    with writer_lease(store, wait_s=0, ttl_s=ttl, command="holder"):
        ready.set()
        release.wait(120)


def race(store, barrier, results, release):
    from atlasflow.store.lease import StoreBusy, acquire

    barrier.wait()
    try:
        lease = acquire(store, wait_s=0, command="racer")
    except StoreBusy as exc:
        results.put(("busy", exc.holder.pid))
        return
    results.put(("won", os.getpid()))
    release.wait(120)
    lease.release()


def stale_writer(store, ready, go, results):
    """Take the lease with a short ttl and a real writer, then (after the parent's SIGSTOP/SIGCONT)
    try to commit the manifest."""
    from atlasflow.store.lease import LeaseLost, acquire
    from atlasflow.store.lease_writer import LeasedStoreWriter

    lease = acquire(store, wait_s=0, ttl_s=1.5, command="soon stale")
    w = LeasedStoreWriter(store, lease)
    ready.set()
    go.wait(120)
    try:
        w.commit()
        results.put("committed")
    except LeaseLost as exc:
        results.put(f"LeaseLost: {exc}")
