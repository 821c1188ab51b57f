"""The ingest driver: Ray tasks validate and write sources in parallel, the driver commits.

Division of labour (what tiledbsoma makes safe, see store/store.py and NOTES.md):
- workers: probe/validate a source; write X and obs rows of a *reserved, disjoint* joinid range,
  one write per open (independent TileDB fragments; obs has no enumerations to extend);
- driver, serially: gene registry (var), joinid reservation, array resizes, manifest commits,
  all under the store's writer lease (store/lease.py): one driver per store at a time, a second one
  waits (``wait_s``) or fails fast, and takes over the lease of a dead one.
A source turns ``complete`` in the manifest only after all its blocks are written, so readers
(which only read complete ranges) never see half-written cells.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from atlasflow.store import COMPLETE, SourceEntry, write_cells_csr
from atlasflow.store.lease import DEFAULT_WAIT_S, writer_lease
from atlasflow.store.lease_writer import LeasedStoreWriter

log = logging.getLogger(__name__)

DEFAULT_BLOCK_CELLS = 10_000  # ~15M nonzeros at Census density: well under 1 GB per write task


@dataclass
class IngestReport:
    added: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # pending sources of an interrupted run, picked up
    cells: int = 0
    cells_skipped: dict[str, int] = field(default_factory=dict)  # reason -> cells not ingested on purpose
    seconds: float = 0.0
    lease_generation: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"added": self.added, "skipped": self.skipped, "failed": self.failed, "resumed": self.resumed,
                "cells_written": self.cells, "cells_skipped": self.cells_skipped, "seconds": round(self.seconds, 3),
                "lease_generation": self.lease_generation,
                "cells_per_s": round(self.cells / self.seconds, 1) if self.seconds else None}


def source_id_for(name: str, fp: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    return f"{stem}-{fp[:10]}"


def _obs_blocks(path, bounds):
    """A source's obs read once, cut into its blocks' rows (one Ray return per block): each block
    task gets only its slice, so obs is read once per source, not once per block."""
    from atlasflow.ingest.h5ad import read_obs

    obs = read_obs(path)
    parts = [obs.iloc[a:b] for a, b in bounds]
    return parts[0] if len(parts) == 1 else parts


def _write_h5ad_block(store_uri, path, counts_field, a, b, joinid_start, source_cols, gene_joinids,
                      source_id, dataset_id, obs):
    from atlasflow.ingest.h5ad import open_counts, project_block, read_rows
    from atlasflow.ingest.obs import to_store_obs

    f, node = open_counts(path, counts_field)
    with f:
        m = read_rows(node, a, b)
    m = project_block(m, source_cols)  # (source_cols, target, n): drop unmapped genes, sum duplicates
    m.eliminate_zeros()
    nnz = np.diff(m.indptr)
    raw_sum = np.asarray(m.sum(axis=1, dtype=np.float64)).ravel()
    if len(obs) != b - a:
        raise ValueError(f"{path}: obs has {len(obs)} rows for block [{a}, {b})")
    tbl = to_store_obs(obs, source_id=source_id, source_file=os.path.basename(path),
                       source_rows=np.arange(a, b), nnz=nnz, raw_sum=raw_sum, default_dataset_id=dataset_id)
    write_cells_csr(store_uri, joinid_start, tbl, m, col_map=gene_joinids)
    return b - a, int(m.nnz), float(raw_sum.sum())


def _probe(path, organism, allow_normalized, require_obs, duplicate_genes="sum", memory_budget=None):
    from atlasflow.ingest.h5ad import DEFAULT_MEMORY_BUDGET, probe_source

    return probe_source(path, organism, allow_normalized, tuple(require_obs), duplicate_genes=duplicate_genes,
                        memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET)


class _Progress:
    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="cell", unit_scale=True, desc="ingest", file=sys.stderr,
                            mininterval=1.0, dynamic_ncols=True)

    def add_total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BlockTracker:
    """Which blocks of which source are outstanding; commits a source when its last block lands."""

    def __init__(self, writer: LeasedStoreWriter, report: IngestReport, progress: _Progress):
        self.writer, self.report, self.progress = writer, report, progress
        self.pending: dict[str, dict] = {}

    def start(self, entry: SourceEntry, refs: list) -> None:
        self.pending[entry.source_id] = {"entry": entry, "left": len(refs), "nnz": 0, "raw_sum": 0.0, "dead": False}

    def done(self, source_id: str, result) -> None:
        st = self.pending[source_id]
        n, nnz, raw_sum = result
        st["left"] -= 1
        st["nnz"] += nnz
        st["raw_sum"] += raw_sum
        self.report.cells += n
        self.progress.update(n)
        if st["left"] == 0 and not st["dead"]:
            self.writer.complete(source_id, nnz=st["nnz"], raw_sum=st["raw_sum"])
            e = st["entry"]
            self.report.added.append({"source": e.name, "source_id": source_id, "cells": e.n_cells,
                                      "raw_sum": st["raw_sum"], "dropped_counts": e.dropped_counts,
                                      "genes": e.genes_report,
                                      "joinids": [e.joinid_start, e.joinid_stop], "nnz": st["nnz"]})

    def failed(self, source_id: str, error: str) -> None:
        st = self.pending[source_id]
        st["left"] -= 1
        if not st["dead"]:
            st["dead"] = True
            self.writer.fail(st["entry"], error)
            self.report.failed.append({"source": st["entry"].name, "error": error})


def completed(waiting: dict):
    """(tag, result, error) of the Ray tasks in ``waiting`` (ref -> tag) as each finishes; exactly one of
    result / error is None. ``waiting`` may grow while this runs (a probe launching its blocks). The one
    collection loop of both ingest drivers (files and Census)."""
    import ray

    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        tag = waiting.pop(ready[0])
        try:
            result, error = ray.get(ready[0]), None
        except Exception as exc:  # a worker died or raised: the caller names the source
            result, error = None, exc
        yield tag, result, error


def ingest_paths(store_uri: str, sources: list[str], *, organism: str = "homo_sapiens",
                 allow_normalized: bool = False, require_obs: tuple[str, ...] = (),
                 block_cells: int = DEFAULT_BLOCK_CELLS, num_cpus: int | None = None,
                 progress: bool = True, wait_s: float = DEFAULT_WAIT_S, resume_pending: bool = True,
                 duplicate_genes: str = "sum", memory_budget: int | None = None) -> IngestReport:
    """Ingest H5AD sources into the store (created if absent). Idempotent and resumable.

    Holds the store's writer lease throughout (waiting up to ``wait_s`` for another writer; 0 fails
    fast with ``StoreBusy``). With ``resume_pending``, sources an interrupted run left pending are
    finished too, when their file is still there unchanged (same fingerprint).
    """
    t0 = time.time()
    with writer_lease(store_uri, wait_s=wait_s) as lease:
        report = _ingest_paths(store_uri, sources, lease, organism=organism, allow_normalized=allow_normalized,
                               require_obs=require_obs, block_cells=block_cells, num_cpus=num_cpus,
                               progress=progress, resume_pending=resume_pending,
                               duplicate_genes=duplicate_genes, memory_budget=memory_budget)
        report.lease_generation = lease.generation
    report.seconds = time.time() - t0
    return report


def _pending_paths(writer: LeasedStoreWriter, paths: list[str]) -> list[str]:
    """Files of sources left pending by a dead run that this run was not given."""
    given, out = set(paths), []
    for e in writer.manifest.pending():
        if e.kind == "census" or not e.path:
            continue  # a Census query is resumed by re-running it; version-1 entries have no path
        if e.path in given:
            continue
        if not os.path.exists(e.path):
            log.warning("%s: pending from an interrupted run, but %s is gone; not resumed", e.name, e.path)
            continue
        out.append(e.path)
    return out


def _launch_source(p, sid: str, name: str, writer, report, bar, tracker, tasks, store_uri: str, block_cells: int,
                   organism: str):
    """Reserve a probed source's joinid range and start its obs and block tasks -> (entry, block refs)."""
    import ray

    from atlasflow.ingest.h5ad import report_probe

    write_task, obs_task = tasks
    gene_joinids = writer.register_genes(p.feature_ids)
    entry = writer.reserve(SourceEntry(
        source_id=sid, kind=p.format or "h5ad", name=name, fingerprint=p.fingerprint, size_bytes=p.size_bytes,
        path=os.path.abspath(p.path), n_cells=p.n_cells, counts_field=p.counts_field, normalized=p.normalized,
        genes_mapped=len(p.feature_ids), genes_unmapped=len(p.unmapped), unmapped_examples=p.unmapped[:10],
        total_counts=p.total_counts, dropped_counts=p.dropped_counts, genes_report=p.genes_report))
    log.info("%s", report_probe(p, organism))
    bar.add_total(p.n_cells)
    gj = ray.put(gene_joinids)
    cols = ray.put(p.projection)
    step = p.block_cells or block_cells  # an in-memory or CSC source picks its own blocks
    bounds = [(a, min(p.n_cells, a + step)) for a in range(0, p.n_cells, step)]
    obs = obs_task.options(num_returns=len(bounds)).remote(p.path, bounds) if bounds else []
    obs = [obs] if len(bounds) == 1 else obs
    refs = [write_task.remote(store_uri, p.path, p.counts_field, a, b, entry.joinid_start + a, cols, gj,
                              entry.source_id, os.path.splitext(name)[0], o)
            for (a, b), o in zip(bounds, obs)]
    tracker.start(entry, refs)
    if not refs:  # an h5ad with zero cells
        writer.complete(entry.source_id)
        report.added.append({"source": name, "source_id": entry.source_id, "cells": 0})
    return entry, refs


def _ingest_paths(store_uri, sources, lease, *, organism, allow_normalized, require_obs, block_cells, num_cpus,
                  progress, resume_pending, duplicate_genes="sum", memory_budget=None) -> IngestReport:
    import ray

    from atlasflow.store.ray_env import init_ray
    from atlasflow.ingest.sources import resolve_sources

    report = IngestReport()
    paths, resolve_errors = resolve_sources(list(sources))
    for arg, err in resolve_errors:
        report.failed.append({"source": arg, "error": err})
    writer = LeasedStoreWriter(store_uri, lease, organism=organism)
    resumed = set(_pending_paths(writer, paths) if resume_pending else ())
    paths = paths + sorted(resumed)
    init_ray(num_cpus)
    probe_task = ray.remote(num_cpus=1, max_retries=0)(_probe)
    tasks = (ray.remote(num_cpus=1, max_retries=2)(_write_h5ad_block),  # (write, obs)
             ray.remote(num_cpus=1, max_retries=2)(_obs_blocks))
    bar = _Progress(progress)
    tracker = BlockTracker(writer, report, bar)
    # Probes finish in any order, but sources are launched in the order given: the store's layout
    # (gene and cell joinids, hence the vocabulary and every seeded epoch order) is then the same each
    # time the same files are ingested. Writes of launched sources go on while a probe is awaited.
    waiting: dict = {probe_task.remote(p, organism, allow_normalized, list(require_obs), duplicate_genes,
                                       memory_budget): ("probe", i) for i, p in enumerate(paths)}
    probed: dict[int, tuple] = {}

    def on_probe(path: str, p, exc) -> None:
        if exc is not None:
            report.failed.append({"source": path, "error": f"{os.path.basename(path)}: {exc}"})
            return
        name = os.path.basename(p.path)
        sid = source_id_for(name, p.fingerprint or "unreadable")
        if p.error:
            writer.fail(SourceEntry(source_id=sid, kind=p.format or "h5ad", name=name, fingerprint=p.fingerprint,
                                    size_bytes=p.size_bytes), p.error)
            report.failed.append({"source": p.path, "error": p.error})
            return
        prior = writer.manifest.by_fingerprint(p.fingerprint)
        if prior is not None and prior.status == COMPLETE:
            report.skipped.append({"source": p.path, "reason": f"already ingested as {prior.source_id}"})
            return
        if p.path in resumed:
            if prior is None:  # the file changed since the dead run: not what it reserved
                report.skipped.append({"source": p.path, "reason": "pending from an interrupted run, but the "
                                                                   "file changed since; not resumed"})
                return
            report.resumed.append(name)
        entry, refs = _launch_source(p, sid, name, writer, report, bar, tracker, tasks, store_uri,
                                     block_cells, organism)
        for r in refs:
            waiting[r] = ("block", entry.source_id)

    try:
        next_source = 0
        for (kind, key), result, exc in completed(waiting):
            if kind == "block":
                if exc is not None:
                    tracker.failed(key, f"{tracker.pending[key]['entry'].name}: {exc}")
                else:
                    tracker.done(key, result)
                continue
            probed[key] = (result, exc)
            while next_source in probed:
                on_probe(paths[next_source], *probed.pop(next_source))
                next_source += 1
    finally:
        bar.close()
    return report
