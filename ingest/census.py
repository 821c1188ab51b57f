"""Ingesting a CELLxGENE Census query, through the real ``cellxgene_census`` API.

Users name a ``census_version``; tests and mirrors pass ``uri`` (a local store in the Census
layout). The query is never held in memory as one piece: obs is scanned in Arrow batches into
per-dataset runs of joinids (Census orders cells by dataset, so runs are few), and Ray tasks read
X for blocks of ``block_cells`` cells of one dataset. Each dataset of the query is one source in
the manifest, identified by (census, organism, filter, genes, dataset_id).
"""

from __future__ import annotations

import hashlib
import json

import time
from dataclasses import dataclass

import numpy as np

from atlasflow.store import COMPLETE, SourceEntry, StoreWriter, map_genes, organism_key

from .pipeline import BlockTracker, IngestReport, _Progress

# cellxgene_census defaults to 1 GiB read buffers per context; several workers share 24 GiB here.
_TILEDB_CONFIG = {"soma.init_buffer_bytes": 128 * 1024**2, "py.init_buffer_bytes": 128 * 1024**2}


@dataclass(frozen=True)
class CensusSpec:
    """Picklable description of which Census to open (version, or uri for a mirror)."""

    census_version: str | None
    uri: str | None
    organism: str

    def open(self):
        import cellxgene_census

        if self.uri:
            return cellxgene_census.open_soma(uri=self.uri, tiledb_config=_TILEDB_CONFIG)
        return cellxgene_census.open_soma(census_version=self.census_version or "stable", tiledb_config=_TILEDB_CONFIG)

    @property
    def label(self) -> str:
        return f"census:{self.census_version}" if not self.uri else f"census:{self.uri}"

    def experiment(self, census):
        key = organism_key(self.organism)
        try:
            return census["census_data"][key]
        except KeyError as exc:
            exc.add_note(f"{self.label}: no organism {key!r} in census_data")
            raise


def runs_of(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique ids -> half-open runs [(start, stop)]."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(ids)]])
    return [(int(ids[a]), int(ids[b - 1]) + 1) for a, b in zip(starts, stops)]


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


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


def scan_query(spec: CensusSpec, obs_value_filter: str | None) -> dict[str, list[tuple[int, int]]]:
    """dataset_id -> runs of matching Census obs joinids, from a streaming obs scan."""
    per: dict[str, list[tuple[int, int]]] = {}
    with spec.open() as census:
        exp = spec.experiment(census)
        for tbl in exp.obs.read(value_filter=obs_value_filter, column_names=["soma_joinid", "dataset_id"]):
            ids = tbl["soma_joinid"].to_numpy()
            ds = np.asarray(tbl["dataset_id"].to_pylist(), dtype=object)
            for d in np.unique(ds):
                per.setdefault(str(d), []).extend(runs_of(np.sort(ids[ds == d])))
    return {d: _merge_runs(r) for d, r in sorted(per.items())}


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
                  organism: str = "Homo sapiens", obs_value_filter: str | None = None, genes: list[str] = (),
                  block_cells: int = 10_000, num_cpus: int | None = None, progress: bool = True) -> IngestReport:
    """Ingest the cells of a Census query (one manifest source per dataset). Idempotent."""
    import ray

    from atlasflow.infra.ray_env import init_ray

    if census_version and census_uri:
        raise ValueError("give census_version or census_uri, not both")
    t0 = time.time()
    report = IngestReport()
    spec = CensusSpec(census_version, census_uri, organism)
    writer = StoreWriter(store_uri, organism=organism_key(organism))

    per_dataset = scan_query(spec, obs_value_filter)
    if not per_dataset:
        report.failed.append({"source": spec.label, "error": f"obs_value_filter {obs_value_filter!r} matched no cells"})
        report.seconds = time.time() - t0
        return report
    with spec.open() as census:
        var = spec.experiment(census).ms["RNA"].var.read(column_names=["soma_joinid", "feature_id"]).concat()
    var_ids = var["soma_joinid"].to_numpy()
    feature_ids = np.asarray(var["feature_id"].to_pylist(), dtype=object)
    wanted = np.ones(len(feature_ids), bool) if not genes else np.isin(feature_ids, list(genes))
    mapping = map_genes(feature_ids[wanted], organism_key(organism))
    census_cols = var_ids[wanted][mapping.source_index]
    store_cols = writer.register_genes(list(mapping.feature_ids))
    var_map = np.full(int(var_ids.max()) + 1 if len(var_ids) else 0, -1, dtype=np.int64)
    var_map[census_cols] = store_cols

    init_ray(num_cpus)
    task = ray.remote(num_cpus=1, max_retries=2)(_write_census_block)
    bar = _Progress(progress)
    tracker = BlockTracker(writer, report, bar)
    var_ref, spec_ref = ray.put(var_map), ray.put(spec)
    query_key = json.dumps({"census": spec.label, "organism": organism_key(organism), "filter": obs_value_filter,
                            "genes": sorted(genes)}, sort_keys=True)
    waiting = {}
    for dataset_id, runs in per_dataset.items():
        fp = hashlib.blake2b(f"{query_key}|{dataset_id}".encode(), digest_size=16).hexdigest()
        n = sum(b - a for a, b in runs)
        prior = writer.manifest.by_fingerprint(fp)
        name = f"{spec.label} {dataset_id}"
        if prior is not None and prior.status == COMPLETE:
            report.skipped.append({"source": name, "reason": f"already ingested as {prior.source_id}"})
            continue
        entry = writer.reserve(SourceEntry(
            source_id=f"census-{dataset_id}-{fp[:10]}", kind="census", name=name, fingerprint=fp, n_cells=n,
            counts_field='ms["RNA"].X["raw"]', genes_mapped=len(mapping.feature_ids),
            genes_unmapped=len(mapping.unmapped), unmapped_examples=mapping.unmapped[:10]))
        bar.add_total(n)
        refs = [task.remote(store_uri, spec_ref, piece, entry.joinid_start + off, var_ref, entry.source_id, spec.label)
                for off, piece in split_runs(runs, block_cells)]
        tracker.start(entry, refs)
        waiting.update({r: entry.source_id for r in refs})
    try:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            sid = waiting.pop(ready[0])
            try:
                tracker.done(sid, ray.get(ready[0]))
            except Exception as exc:
                tracker.failed(sid, f"{tracker.pending[sid]['entry'].name}: {exc}")
    finally:
        bar.close()
    if mapping.unmapped:
        print(f"[atlasflow] {spec.label}: {mapping.summary()}", flush=True)
    report.seconds = time.time() - t0
    return report


__all__ = ["CensusSpec", "ingest_census", "runs_of", "scan_query", "split_runs"]
