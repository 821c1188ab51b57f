"""The store's writer lease: exactly one driver mutates a store (var, joinid ranges, array shapes,
manifest) at a time; readers take none (they read a pinned TileDB snapshot).

TileDB gives atomic fragments, not mutual exclusion: two drivers that both read the manifest,
reserve "the next" joinid range and write the manifest back lose one source and overwrite each
other's cells (measured, see NOTES.md). The lease is a sequence of numbered records beside the
store, ``<store>.lease/gen-000000000007.json``; the highest generation is the current one.

- Acquire: read the highest record; if it is released or stale, create generation N+1 with an
  *exclusive* create (local/NFS: write a temp file, then ``os.link`` it to the name, which fails
  if the name exists; S3: ``PUT`` with ``If-None-Match: *``). Of two racers exactly one wins N+1.
- Stale: not renewed before ``expires_at`` (a heartbeat thread renews every ttl/4), or, on the
  same machine (host name, boot id and pid namespace all equal), its process is gone (so a
  ``kill -9`` is taken over at once, a dead holder elsewhere after at most the ttl).
- Fencing: a holder only ever rewrites its *own* record. Before each mutation it checks that no
  newer generation exists and that its record has not expired (a holder that missed its own
  heartbeat stops writing: someone may be taking over). ``LeasedStoreWriter`` also stamps its
  lease token into the store's metadata with every manifest write and refuses to write if the
  token found there is not the one it last saw (the manifest changed under it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .schema import check_format

log = logging.getLogger(__name__)

LEASE_FORMAT_VERSION = 1
DEFAULT_WAIT_S = 600.0
DEFAULT_TTL_S = 60.0
TTL_ENV = "ATLASFLOW_LEASE_TTL_S"
LEASE_SUFFIX = ".lease"
WRITER_KEY = "atlasflow.writer_lease"  # store metadata: the lease that wrote the manifest last
_LOG_EVERY_S = 30.0


class StoreBusy(RuntimeError):
    """Another live process holds the store's writer lease."""

    def __init__(self, store: str, holder: "LeaseRecord", waited_s: float):
        self.store, self.holder, self.waited_s = store, holder, waited_s
        super().__init__(f"store {store} is being written by another process: {holder.describe()}; "
                         f"gave up after waiting {waited_s:.0f} s (re-run later, or with a longer --wait)")


class LeaseLost(RuntimeError):
    """This process no longer holds the lease it acquired; it must not write the store."""


# -- who am I ------------------------------------------------------------------------------------
def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _proc_start(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _alive(pid: int, start: float) -> bool:
    """Is process ``pid`` (started at ``start``) still running on this machine?"""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(p.create_time() - start) < 1.0  # else the pid was reused by another process
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def default_command() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv)[:500]


@dataclass(frozen=True)
class LeaseRecord:
    store: str
    generation: int
    token: str
    host: str
    pid: int
    pid_start: float
    boot_id: str
    pid_ns: str
    command: str
    started_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float
    released: bool = False
    format_version: int = LEASE_FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "LeaseRecord":
        d = json.loads(data)
        check_format("lease", d.get("format_version"), LEASE_FORMAT_VERSION, where,
                     "; is a newer atlasflow writing this store?")
        return cls(**d)

    def same_machine(self) -> bool:
        """Same host, same boot, same pid namespace: only then is ``pid`` meaningful here."""
        return bool(self.boot_id) and (self.host, self.boot_id, self.pid_ns) == (
            socket.gethostname(), _boot_id(), _pid_ns())

    def stale_reason(self, now: float) -> str | None:
        if self.released:
            return "released"
        if self.same_machine() and not _alive(self.pid, self.pid_start):
            return f"its process {self.pid} on {self.host} is gone"
        if now > self.expires_at:
            return f"not renewed for {now - self.renewed_at:.0f} s (ttl {self.ttl_s:.0f} s)"
        return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        return (f"host {self.host}, pid {self.pid}, since {since} ({now - self.started_at:.0f} s ago), "
                f"command {self.command!r} (lease generation {self.generation}, "
                f"renewed until {self.expires_at - now:+.0f} s from now)")


def lease_location(store_uri: str) -> str:
    uri = str(store_uri).rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        uri = os.path.realpath(uri)  # two spellings (relative, via a symlink) of one store: one lease
    return uri + LEASE_SUFFIX


def lease_backend(store_uri: str):
    loc = lease_location(store_uri)
    if loc.startswith("s3://"):
        from .lease_s3 import S3LeaseDir

        return S3LeaseDir(loc)
    if "://" in loc:
        raise NotImplementedError(f"{store_uri}: no writer lease for {loc.split('://')[0]}:// stores "
                                  f"(local/NFS paths and s3:// are supported); refusing to write unguarded")
    from .lease_local import LocalLeaseDir

    return LocalLeaseDir(loc)


# -- the lease -----------------------------------------------------------------------------------
class WriterLease:
    """A held lease: ``check()`` before every mutation; renewed by a heartbeat thread."""

    def __init__(self, backend, record: LeaseRecord):
        self.backend, self.record = backend, record
        self._lock = threading.RLock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="atlasflow-lease-heartbeat")

    @property
    def token(self) -> str:
        return self.record.token

    @property
    def generation(self) -> int:
        return self.record.generation

    def _verify(self) -> str | None:
        gen = self.record.generation
        newer = [g for g in self.backend.generations() if g > gen]
        if not newer and self.backend.exists(gen + 1):  # a directory listing may be cached (NFS)
            newer = [gen + 1]
        if newer:
            data = self.backend.read(max(newer))
            who = LeaseRecord.from_bytes(data, str(self.backend)).describe() if data else "another process"
            return f"taken over by {who}"
        data = self.backend.read(gen)
        if data is None or LeaseRecord.from_bytes(data, str(self.backend)).token != self.token:
            return f"its record {gen} in {self.backend} disappeared or changed"
        if time.time() > self.record.expires_at:
            return f"it expired ({time.time() - self.record.renewed_at:.0f} s since the last renewal)"
        return None

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this process still holds the lease."""
        with self._lock:
            if self._lost is None:
                self._lost = self._verify()
            if self._lost is not None:
                raise LeaseLost(f"writer lease of {self.record.store} (generation {self.generation}) lost: "
                                f"{self._lost}; this process stops writing")

    def renew(self) -> None:
        with self._lock:
            self.check()
            now = time.time()
            rec = dataclasses.replace(self.record, renewed_at=now, expires_at=now + self.record.ttl_s)
            self.backend.replace(rec.generation, rec.to_bytes())
            self.record = rec

    def _beat(self) -> None:
        while not self._stop.wait(self.record.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # a transient I/O error: the next beat retries (expiry decides)
                log.warning("writer lease heartbeat of %s failed: %s", self.record.store, exc)

    def start(self) -> "WriterLease":
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._lock:
            if self._lost is None and self._verify() is None:
                now = time.time()
                self.backend.replace(self.generation, dataclasses.replace(
                    self.record, released=True, renewed_at=now, expires_at=now).to_bytes())
            self._lost = self._lost or "released"


def _read_record(backend, gen: int) -> LeaseRecord | None | str:
    data = backend.read(gen)
    if data is None:
        return None
    try:
        return LeaseRecord.from_bytes(data, f"{backend} generation {gen}")
    except (json.JSONDecodeError, TypeError) as exc:
        return f"unreadable record ({exc})"


def acquire(store_uri: str, *, wait_s: float = DEFAULT_WAIT_S, command: str | None = None,
            ttl_s: float | None = None, poll_s: float = 1.0) -> WriterLease:
    """Take the store's writer lease, waiting up to ``wait_s`` for a live holder (0: fail fast)."""
    backend = lease_backend(store_uri)
    ttl = float(ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S))
    if ttl <= 0:
        raise ValueError(f"lease ttl must be > 0 s, got {ttl}")
    t0, last_log = time.monotonic(), None
    while True:
        gens = backend.generations()
        top = max(gens, default=0)
        holder = _read_record(backend, top) if top else None
        if top and holder is None:
            time.sleep(0.01)
            continue  # pruned between listing and reading: look again
        if isinstance(holder, str):
            log.warning("%s: generation %d is %s; treating it as stale", backend, top, holder)
            stale = holder
        else:
            stale = None if holder is None else holder.stale_reason(time.time())
        if holder is not None and stale is None:
            waited = time.monotonic() - t0
            if waited >= wait_s:
                raise StoreBusy(str(store_uri), holder, waited)
            if last_log is None or time.monotonic() - last_log >= _LOG_EVERY_S:
                log.warning("store %s is held by %s; waiting (%.0f of %.0f s)", store_uri, holder.describe(),
                            waited, wait_s)
                last_log = time.monotonic()
            time.sleep(max(0.05, min(poll_s, wait_s - waited)))
            continue
        now = time.time()
        rec = LeaseRecord(store=str(store_uri), generation=top + 1, token=uuid.uuid4().hex,
                          host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_start(os.getpid()),
                          boot_id=_boot_id(), pid_ns=_pid_ns(), command=command or default_command(),
                          started_at=now, renewed_at=now, expires_at=now + ttl, ttl_s=ttl)
        if not backend.create(top + 1, rec.to_bytes()):
            continue  # another process won generation top+1
        if isinstance(holder, LeaseRecord) and not holder.released:
            log.warning("store %s: took over the stale writer lease of %s: %s", store_uri, holder.describe(), stale)
        for g in gens:
            backend.delete(g)
        return WriterLease(backend, rec).start()


_HELD: dict[str, list] = {}  # lease location -> [WriterLease, depth]; re-entrant within a process
_HELD_LOCK = threading.Lock()


@contextmanager
def writer_lease(store_uri: str, *, wait_s: float = DEFAULT_WAIT_S, command: str | None = None,
                 ttl_s: float | None = None):
    """Hold the store's writer lease for the block. Nested use in one process shares the lease."""
    key = lease_location(store_uri)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held[0].record.pid == os.getpid():
            held[1] += 1
        else:
            held = None
    if held is not None:
        try:
            yield held[0]
        finally:
            with _HELD_LOCK:
                held[1] -= 1
        return
    lease = acquire(store_uri, wait_s=wait_s, command=command, ttl_s=ttl_s)
    with _HELD_LOCK:
        _HELD[key] = [lease, 1]
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()


def current_holder(store_uri: str) -> LeaseRecord | None:
    """The live holder of a store's lease, or None (for ``store info``; takes nothing)."""
    backend = lease_backend(store_uri)
    top = max(backend.generations(), default=0)
    rec = _read_record(backend, top) if top else None
    if isinstance(rec, LeaseRecord) and rec.stale_reason(time.time()) is None:
        return rec
    return None
