"""Ingesting a CELLxGENE Census query, through the real ``cellxgene_census`` API.

Users name a ``census_version``; tests and mirrors pass ``uri`` (a local store in the Census
layout). The query is never held in memory as one piece: obs is scanned in Arrow batches into
per-dataset runs of joinids (Census orders cells by dataset, so runs are few), and Ray tasks read
X for blocks of ``block_cells`` cells of one dataset. Each dataset of the query is one source in
the manifest, identified by (census, organism, filter, genes, which cells, dataset_id). By default
only primary cells are kept (``is_primary_data``: a cell listed in several datasets is primary in
exactly one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np

from atlasflow.store import COMPLETE, SourceEntry, map_genes, organism_key
from atlasflow.store.census_view import CensusSpec
from atlasflow.store.lease import DEFAULT_WAIT_S, writer_lease
from atlasflow.store.lease_writer import LeasedStoreWriter
from atlasflow.store.runs import Runs
from atlasflow.store.selection import obs_batches

from .pipeline import DEFAULT_BLOCK_CELLS, BlockTracker, IngestReport, _Progress, completed

log = logging.getLogger(__name__)


def split_runs(runs: list[tuple[int, int]], block: int):
    """Yield (offset, runs) pieces of at most ``block`` ids each."""
    piece, n, offset = [], 0, 0
    for a, b in runs:
        while a < b:
            take = min(b - a, block - n)
            piece.append((a, a + take))
            n += take
            a += take
            if n == block:
                yield offset, piece
                offset += n
                piece, n = [], 0
    if piece:
        yield offset, piece


def _scan(spec: CensusSpec, obs_filter: str | None, need_primary: bool):
    """dataset_id -> (runs of primary cells, runs of non-primary cells), from a streaming obs scan.

    Without an ``is_primary_data`` column every cell counts as primary (refused if ``need_primary``).
    """
    import pyarrow.compute as pc

    per: dict[str, tuple[list, list]] = {}
    with spec.open() as census:
        exp = spec.experiment(census)
        has_flag = "is_primary_data" in exp.obs.schema.names
        if need_primary and not has_flag:
            raise ValueError(f"{spec.label}: obs has no is_primary_data column, so primary cells cannot be told "
                             f"apart; ingest all cells with primary_only=False (--all-cells)")
        cols = ["dataset_id"] + (["is_primary_data"] if has_flag else [])
        for tbl in obs_batches(exp, cols, obs_filter, None, field=f"{spec.label} obs_filter", ordered=False):
            ids = tbl["soma_joinid"].to_numpy()
            ds = np.asarray(tbl["dataset_id"].to_pylist(), dtype=object)
            prim = (pc.fill_null(tbl["is_primary_data"], False).to_numpy(zero_copy_only=False).astype(bool)
                    if has_flag else np.ones(len(ids), bool))
            for d in np.unique(ds):
                in_d = ds == d
                runs = per.setdefault(str(d), ([], []))
                runs[0].extend(Runs.from_sorted_ids(np.sort(ids[in_d & prim])).ranges())
                runs[1].extend(Runs.from_sorted_ids(np.sort(ids[in_d & ~prim])).ranges())
    return {d: (Runs.from_ranges(p).ranges(), Runs.from_ranges(n).ranges()) for d, (p, n) in sorted(per.items())}


def _n(runs) -> int:
    return sum(b - a for a, b in runs)


def _write_census_block(store_uri, spec, runs, joinid_start, var_map, source_id, source_file):
    import pyarrow as pa

    from atlasflow.ingest.obs import to_store_obs
    from atlasflow.store import write_cells

    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])
    keep_vars = np.flatnonzero(var_map >= 0)
    with spec.open() as census:
        exp = spec.experiment(census)
        obs = exp.obs.read(coords=(ids,)).concat().sort_by("soma_joinid").to_pandas()
        parts = list(exp.ms["RNA"].X["raw"].read(coords=(ids, keep_vars)).tables())
    tbl = pa.concat_tables(parts) if parts else None
    if tbl is not None and tbl.num_rows:
        rows = np.searchsorted(ids, tbl["soma_dim_0"].to_numpy())
        cols = var_map[tbl["soma_dim_1"].to_numpy()]
        vals = tbl["soma_data"].to_numpy().astype(np.float64)
        keep = vals != 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    else:
        rows = cols = np.zeros(0, np.int64)
        vals = np.zeros(0)
    nnz = np.bincount(rows, minlength=len(ids))
    raw_sum = np.bincount(rows, weights=vals, minlength=len(ids))
    table = to_store_obs(obs.drop(columns=["raw_sum", "nnz"], errors="ignore"), source_id=source_id,
                         source_file=source_file, source_rows=ids, nnz=nnz, raw_sum=raw_sum,
                         default_dataset_id=source_id)
    write_cells(store_uri, joinid_start, table, rows, cols, vals)
    return len(ids), int(len(vals)), float(vals.sum())


def ingest_census(store_uri: str, *, census_version: str | None = None, census_uri: str | None = None,
                  organism: str = "Homo sapiens", obs_filter: str | None = None, genes: list[str] = (),
                  primary_only: bool = True, block_cells: int = DEFAULT_BLOCK_CELLS, num_cpus: int | None = None,
                  progress: bool = True, wait_s: float = DEFAULT_WAIT_S) -> IngestReport:
    """Ingest the cells of a Census query (one manifest source per dataset). Idempotent.

    ``primary_only`` (default) keeps ``is_primary_data == True`` cells: Census lists a cell once
    per dataset it appears in, and only the primary copy is unique (pretraining on all of them
    repeats cells). ``report.cells_skipped["non_primary"]`` counts the cells left out. A dataset
    first ingested primary-only and later with ``primary_only=False`` gets its non-primary cells
    added as a second source (never the primary ones twice). Holds the store's writer lease.
    """
    if census_version and census_uri:
        raise ValueError("give census_version or census_uri, not both")
    t0 = time.time()
    with writer_lease(store_uri, wait_s=wait_s) as lease:
        report = _ingest_census(store_uri, lease, CensusSpec(census_version, census_uri, organism),
                                obs_filter, list(genes), primary_only, block_cells, num_cpus, progress)
        report.lease_generation = lease.generation
    report.seconds = time.time() - t0
    return report


_CELLS_LABEL = {"primary": " (primary cells)", "non_primary": " (non-primary cells)", "all": ""}


def _census_genes(spec, writer, genes) -> tuple:
    """(the gene mapping, census var joinid -> store gene joinid, -1 where not ingested); registers the
    mapped genes with the store."""
    with spec.open() as census:
        var = spec.experiment(census).ms["RNA"].var.read(column_names=["soma_joinid", "feature_id"]).concat()
    var_ids = var["soma_joinid"].to_numpy()
    feature_ids = np.asarray(var["feature_id"].to_pylist(), dtype=object)
    wanted = np.ones(len(feature_ids), bool) if not genes else np.isin(feature_ids, list(genes))
    mapping = map_genes(feature_ids[wanted], organism_key(spec.organism))
    census_cols = var_ids[wanted][mapping.source_index]
    store_cols = writer.register_genes(list(mapping.feature_ids))
    var_map = np.full(int(var_ids.max()) + 1 if len(var_ids) else 0, -1, dtype=np.int64)
    var_map[census_cols] = store_cols
    return mapping, var_map


def _drain(waiting: dict, tracker) -> None:
    """Collect the block tasks as they finish: a source is committed when all its blocks are (a lost
    writer lease raises out of the commit: another driver owns the store now, nothing more is written)."""
    for sid, result, exc in completed(waiting):
        if exc is not None:
            tracker.failed(sid, f"{tracker.pending[sid]['entry'].name}: {exc}")
        else:
            tracker.done(sid, result)


def _ingest_census(store_uri, lease, spec, obs_filter, genes, primary_only, block_cells, num_cpus,
                   progress) -> IngestReport:
    import ray

    from atlasflow.store.ray_env import init_ray

    organism = spec.organism
    report = IngestReport()
    writer = LeasedStoreWriter(store_uri, lease, organism=organism_key(organism))

    per_dataset = _scan(spec, obs_filter, primary_only)
    if not per_dataset:
        report.failed.append({"source": spec.label, "error": f"obs_filter {obs_filter!r} matched no cells"})
        return report
    mapping, var_map = _census_genes(spec, writer, genes)
    init_ray(num_cpus)
    task = ray.remote(num_cpus=1, max_retries=2)(_write_census_block)
    bar = _Progress(progress)
    tracker = BlockTracker(writer, report, bar)
    var_ref, spec_ref = ray.put(var_map), ray.put(spec)

    def fingerprint(dataset_id: str, cells: str) -> str:
        # "all" keeps the key of stores ingested before primary_only existed (they hold all cells).
        q = {"census": spec.label, "organism": organism_key(organism), "filter": obs_filter,
             "genes": sorted(genes), **({} if cells == "all" else {"cells": cells})}
        return hashlib.blake2b(f"{json.dumps(q, sort_keys=True)}|{dataset_id}".encode(), digest_size=16).hexdigest()

    def complete(fp: str):
        prior = writer.manifest.by_fingerprint(fp)
        return prior if prior is not None and prior.status == COMPLETE else None

    waiting = {}
    skipped_non_primary = 0
    for dataset_id, (prim, nonprim) in per_dataset.items():
        name = f"{spec.label} {dataset_id}"
        done = complete(fingerprint(dataset_id, "all"))
        if done is not None:
            report.skipped.append({"source": name, "reason": f"already ingested as {done.source_id}"})
            continue
        if primary_only:
            cells, runs = "primary", prim
            skipped_non_primary += _n(nonprim)
        elif complete(fingerprint(dataset_id, "primary")) is not None:
            cells, runs = "non_primary", nonprim  # the primary ones are in the store already
        else:
            cells, runs = "all", Runs.from_ranges(prim + nonprim).ranges()
        fp = fingerprint(dataset_id, cells)
        name += _CELLS_LABEL[cells]
        done = complete(fp)
        if done is not None:
            report.skipped.append({"source": name, "reason": f"already ingested as {done.source_id}"})
            continue
        if not runs:
            continue  # e.g. a dataset of non-primary cells only, primary_only
        n = _n(runs)
        entry = writer.reserve(SourceEntry(
            source_id=f"census-{dataset_id}-{fp[:10]}", kind="census", name=name, fingerprint=fp, n_cells=n,
            counts_field='ms["RNA"].X["raw"]', genes_mapped=len(mapping.feature_ids),
            genes_unmapped=len(mapping.unmapped), unmapped_examples=mapping.unmapped[:10]))
        bar.add_total(n)
        refs = [task.remote(store_uri, spec_ref, piece, entry.joinid_start + off, var_ref, entry.source_id, spec.label)
                for off, piece in split_runs(runs, block_cells)]
        tracker.start(entry, refs)
        waiting.update({r: entry.source_id for r in refs})
    if primary_only:
        report.cells_skipped["non_primary"] = skipped_non_primary
        if skipped_non_primary:
            log.warning("%s: %d non-primary cells (is_primary_data == False, listed again in another dataset) "
                        "skipped; --all-cells keeps them", spec.label, skipped_non_primary)
    try:
        _drain(waiting, tracker)
    finally:
        bar.close()
    if mapping.unmapped:
        log.info("%s: %s", spec.label, mapping.summary())
    return report


__all__ = ["ingest_census", "split_runs"]
