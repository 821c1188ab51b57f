"""Create, open (pinned to a timestamp) and append to an atlasflow store."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from . import schema
from .manifest import COMPLETE, FAILED, Manifest, SourceEntry
from .xwrite import write_x_global_order


def _now_ms() -> int:
    return int(time.time() * 1000)


_CONTEXTS: dict[int, soma.SOMATileDBContext] = {}


def soma_context() -> soma.SOMATileDBContext:
    """One TileDB context per process (contexts are heavy and thread-safe; a fresh one per open
    wastes memory and was seen to abort under load). Keyed by pid: never reused across fork."""
    pid = os.getpid()
    ctx = _CONTEXTS.get(pid)
    if ctx is None:
        # Modest buffers: several worker processes share a 24 GiB machine.
        ctx = _CONTEXTS[pid] = soma.SOMATileDBContext(tiledb_config={
            "soma.init_buffer_bytes": 128 * 1024**2, "py.init_buffer_bytes": 128 * 1024**2})
    return ctx


READ_BUFFER_BYTES = 16 * 1024**2
# What the loader's read threads (and the benchmark's tuned scan) set; see read_context.
READ_TILEDB_CONFIG = {"soma.init_buffer_bytes": READ_BUFFER_BYTES, "py.init_buffer_bytes": READ_BUFFER_BYTES,
                      "sm.mem.malloc_trim": "false"}
_READ_CONTEXTS: dict[tuple[int, int], soma.SOMATileDBContext] = {}


def read_context(slot: int) -> soma.SOMATileDBContext:
    """A context for one loader read thread (``slot`` < the thread count, so at most that many per
    process, reused across epochs). One TileDB compute and I/O thread each: the loader already runs
    a read per thread, and a shared pool added sync overhead (measured on 2 cores, random 8 x
    256-cell reads from two threads: 34k cells/s at 49-57 us CPU per cell, vs 31k at 60-64 us).
    No malloc_trim after every query (TileDB's default): it handed the tile and result buffers back
    to the OS, and every read page-faulted them in again (perf: 17 faults and 38 us of kernel time
    per cell; without it 7 faults, 18 us, +25% cells/s). The loader trims once per window instead."""
    key = (os.getpid(), int(slot))
    ctx = _READ_CONTEXTS.get(key)
    if ctx is None:
        ctx = _READ_CONTEXTS[key] = soma.SOMATileDBContext(tiledb_config={
            **READ_TILEDB_CONFIG, "sm.compute_concurrency_level": 1, "sm.io_concurrency_level": 1})
    return ctx


def is_store(uri: str) -> bool:
    try:
        with soma.Experiment.open(uri, context=soma_context()) as exp:
            return schema.FORMAT_KEY in exp.metadata
    except Exception:
        return False


def create_store(uri: str, organism: str = "homo_sapiens") -> None:
    """Create an empty store (Experiment with obs, ms/RNA/{var,X/raw}, manifest)."""
    if os.path.exists(uri) and os.listdir(uri):
        raise FileExistsError(f"{uri}: exists and is not empty; refusing to create a store there")
    ctx = soma_context()
    with soma.Experiment.create(uri, context=ctx) as exp:
        exp.add_new_dataframe("obs", schema=schema.OBS_SCHEMA, index_column_names=["soma_joinid"],
                              domain=[(0, 0)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(schema.MEASUREMENT, soma.Measurement)
        rna.add_new_dataframe("var", schema=schema.VAR_SCHEMA, index_column_names=["soma_joinid"], domain=[(0, 0)])
        x = rna.add_new_collection("X")
        x.add_new_sparse_ndarray(schema.X_LAYER, type=pa.float32(), shape=(1, 1),
                                 platform_config=schema.X_PLATFORM_CONFIG)
        exp.metadata[schema.FORMAT_KEY] = schema.STORE_FORMAT_VERSION
        exp.metadata[schema.ORGANISM_KEY] = organism
        exp.metadata[schema.MANIFEST_KEY] = Manifest(organism=organism).to_json()


@dataclass(frozen=True)
class StoreLocator:
    """Everything a worker process needs to read the same snapshot: picklable, immutable."""

    uri: str
    tiledb_timestamp_ms: int

    def open(self, mode: str = "r", context: soma.SOMATileDBContext | None = None) -> soma.Experiment:
        return soma.Experiment.open(self.uri, mode, tiledb_timestamp=self.tiledb_timestamp_ms,
                                    context=context or soma_context())


class Store:
    """A read-only view of a store, pinned to one TileDB timestamp."""

    def __init__(self, uri: str, timestamp_ms: int | None = None):
        self.locator = StoreLocator(str(uri), int(timestamp_ms if timestamp_ms is not None else _now_ms()))
        try:
            with self.locator.open() as exp:
                version = exp.metadata.get(schema.FORMAT_KEY)
                if version is None:
                    raise ValueError(f"{uri}: not an atlasflow store (no {schema.FORMAT_KEY} metadata)")
                schema.check_format("store", version, schema.STORE_FORMAT_VERSION, str(uri))
                self.manifest = Manifest.from_json(exp.metadata[schema.MANIFEST_KEY], where=str(uri))
                self.n_genes = int(exp.ms[schema.MEASUREMENT].var.count)
        except Exception as exc:
            exc.add_note(f"while opening atlasflow store {uri}")
            raise

    @property
    def uri(self) -> str:
        return self.locator.uri

    @property
    def timestamp_ms(self) -> int:
        return self.locator.tiledb_timestamp_ms

    @property
    def n_cells(self) -> int:
        return self.manifest.n_cells

    def complete_ranges(self) -> list[tuple[int, int]]:
        return self.manifest.complete_ranges()

    def require_counts(self, purpose: str = "pretraining") -> None:
        """Refuse a store holding sources ingested with --normalized (not raw counts)."""
        bad = [s.name for s in self.manifest.complete() if s.normalized]
        if bad:
            raise ValueError(f"{self.uri}: {purpose} needs raw counts, but {len(bad)} source(s) were ingested as "
                             f"normalized data (--normalized): {', '.join(bad[:5])}")

    @contextmanager
    def experiment(self):
        with self.locator.open() as exp:
            yield exp

    def var(self) -> pd.DataFrame:
        with self.experiment() as exp:
            return exp.ms[schema.MEASUREMENT].var.read().concat().to_pandas().set_index("soma_joinid").sort_index()

    def obs(self, column_names: list[str] | None = None, value_filter: str | None = None) -> pd.DataFrame:
        """obs of committed cells (only manifest ranges; partial writes are never returned)."""
        cols = None if column_names is None else ["soma_joinid", *[c for c in column_names if c != "soma_joinid"]]
        with self.experiment() as exp:
            tbl = exp.obs.read(column_names=cols, value_filter=value_filter).concat()
        df = tbl.to_pandas()
        keep = in_ranges(df["soma_joinid"].to_numpy(), self.complete_ranges())
        return df[keep].set_index("soma_joinid").sort_index()

    def gene_stats(self) -> pd.DataFrame:
        """Per-gene nnz and nonzero median (``atlasflow store stats``); raises if not computed."""
        from .stats import read_gene_stats

        return read_gene_stats(self)


def in_ranges(ids: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask: which ids fall in any of the half-open ranges."""
    from .runs import Runs

    return Runs.from_ranges(ranges).contains(ids)


def open_store(uri: str, timestamp_ms: int | None = None) -> Store:
    return Store(uri, timestamp_ms)


# --------------------------------------------------------------------------------------------
# Writing. The driver owns var, the manifest and the array shapes; workers write X and obs rows
# of their reserved joinid ranges (disjoint), one write per open.
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Driver-side, serial mutations: gene registry, joinid reservation, manifest commits."""

    def __init__(self, uri: str, organism: str = "homo_sapiens", create: bool = True):
        self.uri = str(uri)
        if not is_store(self.uri):
            if not create:
                raise FileNotFoundError(f"{uri}: not an atlasflow store")
            create_store(self.uri, organism)
        with soma.Experiment.open(self.uri, context=soma_context()) as exp:
            self.manifest = Manifest.from_json(exp.metadata[schema.MANIFEST_KEY], where=self.uri)
            var = exp.ms[schema.MEASUREMENT].var.read(column_names=["soma_joinid", "feature_id"]).concat()
        self.gene_index: dict[str, int] = dict(zip(var["feature_id"].to_pylist(), var["soma_joinid"].to_pylist()))

    # -- genes ----------------------------------------------------------------------------
    def register_genes(self, feature_ids) -> np.ndarray:
        """Global joinids for these Ensembl IDs, appending unseen ones to var (stable ids)."""
        from .genes import gene_reference

        new = sorted({f for f in feature_ids if f not in self.gene_index})
        if new:
            ref = gene_reference(self.manifest.organism)
            start = len(self.gene_index)
            known = ref.reindex(new)
            tbl = pa.table({
                "soma_joinid": pa.array(np.arange(start, start + len(new), dtype=np.int64)),
                "feature_id": pa.array(new, pa.large_string()),
                "feature_name": pa.array(known["feature_name"].fillna(pd.Series(new, index=known.index)).tolist(),
                                         pa.large_string()),
                "feature_length": pa.array(known["feature_length"].fillna(0).astype("int64").to_numpy()),
                "feature_type": pa.array(known["feature_type"].fillna(schema.MISSING).tolist(), pa.large_string()),
            })
            n_var = start + len(new)
            with soma.Experiment.open(self.uri, "w", context=soma_context()) as exp:
                var = exp.ms[schema.MEASUREMENT].var
                var.tiledbsoma_resize_soma_joinid_shape(n_var)
            with soma.Experiment.open(self.uri, "w", context=soma_context()) as exp:
                exp.ms[schema.MEASUREMENT].var.write(tbl)
            for i, f in enumerate(new):
                self.gene_index[f] = start + i
            self._resize_x()
        return np.array([self.gene_index[f] for f in feature_ids], dtype=np.int64)

    def _resize_x(self) -> None:
        n_obs = max(self.manifest.next_joinid, 1)
        n_var = max(len(self.gene_index), 1)
        with soma.Experiment.open(self.uri, "w", context=soma_context()) as exp:
            x = exp.ms[schema.MEASUREMENT].X[schema.X_LAYER]
            cur = x.shape
            if cur[0] < n_obs or cur[1] < n_var:
                x.resize((max(cur[0], n_obs), max(cur[1], n_var)))
            if exp.obs.domain[0][1] + 1 < n_obs:
                exp.obs.tiledbsoma_resize_soma_joinid_shape(n_obs)

    # -- sources ---------------------------------------------------------------------------
    def reserve(self, entry: SourceEntry) -> SourceEntry:
        entry = self.manifest.reserve(entry)
        self._resize_x()
        self.commit()
        return entry

    def complete(self, source_id: str, **fields) -> None:
        self.manifest.set_status(source_id, COMPLETE, error="", **fields)
        self.commit()

    def fail(self, entry: SourceEntry, error: str) -> None:
        if entry.source_id not in self.manifest.sources:
            self.manifest.sources[entry.source_id] = entry
        self.manifest.set_status(entry.source_id, FAILED, error=error)
        self.commit()

    def commit(self) -> None:
        with soma.Experiment.open(self.uri, "w", context=soma_context()) as exp:
            exp.metadata[schema.MANIFEST_KEY] = self.manifest.to_json()


def write_cells(uri: str, joinid_start: int, obs: pa.Table, rows: np.ndarray, cols: np.ndarray,
                vals: np.ndarray) -> None:
    """Worker-side: write one block of cells into its reserved joinid range.

    ``obs`` has OBS_SCHEMA columns (without soma_joinid), one row per cell in block order;
    ``rows`` are block-local row indices, ``cols`` global gene joinids, ``vals`` counts.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    X = sp.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)),
                      shape=(obs.num_rows, int(cols.max()) + 1 if len(cols) else 1))
    write_cells_csr(uri, joinid_start, obs, X)


def write_cells_csr(uri: str, joinid_start: int, obs: pa.Table, X: sp.csr_matrix,
                    col_map: np.ndarray | None = None) -> None:
    """Like ``write_cells`` for a CSR block; ``col_map`` maps its columns to gene joinids.

    X first, then obs, one write per open (the pattern measured safe with tiledbsoma 2.3, see
    NOTES.md); the source turns visible only when the driver marks it complete.
    """
    n = obs.num_rows
    if X.shape[0] != n:
        raise ValueError(f"write_cells_csr: {X.shape[0]} rows of counts for {n} obs rows")
    joinids = np.arange(joinid_start, joinid_start + n, dtype=np.int64)
    obs = obs.add_column(0, "soma_joinid", pa.array(joinids))
    obs = obs.select(["soma_joinid", *schema.OBS_SCHEMA.names]).cast(
        pa.schema([("soma_joinid", pa.int64()), *schema.OBS_SCHEMA]))
    ctx = soma_context()
    with soma.Experiment.open(uri, "w", context=ctx) as exp:
        write_x_global_order(exp.ms[schema.MEASUREMENT].X[schema.X_LAYER], X, joinid_start, col_map)
    with soma.Experiment.open(uri, "w", context=ctx) as exp:
        exp.obs.write(obs)
