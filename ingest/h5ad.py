"""Probing sources (validate + map genes) and reading their row blocks, in bounded memory.

Named for the first format; every format of ``readers.py`` goes through here. Validation is a full
streaming pass *before* any write, so a bad file never leaves rows behind; the same pass sums each
source column, so what the mapping keeps, sums and drops is known in counts, not only in genes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasflow.store.genes import map_genes

from .readers import (BYTES_PER_NNZ, DEFAULT_MEMORY_BUDGET, Matrix, detect_format, fingerprint, mtx_nnz,
                      open_source, source_size)

log = logging.getLogger(__name__)

COUNT_FIELDS = ("raw.X", "layers/counts", "X")
DUPLICATE_MODES = ("sum", "error")
DROPPED_WARN_SHARE = 0.05  # warn when more of a source's counts than this fall on unmapped genes
__all__ = ["SourceError", "Probe", "probe_source", "probe_h5ad", "fingerprint", "open_counts", "read_obs",
           "read_rows", "project_block"]


class SourceError(ValueError):
    """A source that cannot be ingested; the message names the file and the field."""

    def __init__(self, path: str, fld: str, reason: str):
        self.path, self.field, self.reason = path, fld, reason
        super().__init__(f"{os.path.basename(path.rstrip('/'))}: {fld}: {reason}")


def read_rows(node: Matrix, a: int, b: int, dtype=np.float32) -> sp.csr_matrix:
    """Rows [a, b) as CSR (float32 is exact for counts < 2**24; validation reads the stored dtype so
    that no near-integer is rounded into a count)."""
    return node.read_rows(a, b, dtype=dtype)


def project_block(m: sp.csr_matrix, projection) -> sp.csr_matrix:
    """Source columns -> store genes: unmapped columns dropped, columns of one gene summed."""
    source_cols, target, n_out = projection
    if len(source_cols) == n_out:  # no duplicates: a column selection (a copy only if some dropped)
        return m if n_out == m.shape[1] else m[:, source_cols].tocsr()
    P = sp.csr_matrix((np.ones(len(source_cols), m.dtype), (source_cols, target)), shape=(m.shape[1], n_out))
    return (m @ P).tocsr()


def _row_error(path, fld, kind, row, value=None):
    if kind == "nan":
        return SourceError(path, fld, f"contains NaN/inf counts (first at row {row})")
    if kind == "neg":
        return SourceError(path, fld, f"contains negative counts (first at row {row}: {value})")
    return SourceError(path, fld, f"is not integer counts (row {row} has {value:.4g}); "
                                  "pass --normalized to ingest normalized data (not for pretraining)")


def _check_counts(node: Matrix, fld: str, path: str) -> np.ndarray:
    """Full streaming pass: finite, non-negative, integer-valued. Returns per-column sums (float64,
    exact for integer counts)."""
    colsum = np.zeros(node.shape[1], np.float64)
    for vals, rows, cols in node.scan():
        if not np.all(np.isfinite(vals)):
            i = int(np.flatnonzero(~np.isfinite(vals))[0])
            raise _row_error(path, fld, "nan", int(rows[i]))
        if (vals < 0).any():
            i = int(np.flatnonzero(vals < 0)[0])
            raise _row_error(path, fld, "neg", int(rows[i]), vals[i])
        frac = vals != np.round(vals)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise _row_error(path, fld, "frac", int(rows[i]), vals[i])
        colsum += np.bincount(cols, weights=vals.astype(np.float64), minlength=node.shape[1])
    return colsum


@dataclass
class Probe:
    """What the driver needs to reserve a source: size, identity, genes, counts; or the error."""

    path: str
    format: str = "h5ad"
    fingerprint: str = ""
    size_bytes: int = 0
    n_cells: int = 0
    counts_field: str = ""
    normalized: bool = False
    source_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    feature_ids: list[str] = field(default_factory=list)  # distinct store genes, in ``target`` order
    unmapped: list[str] = field(default_factory=list)
    block_cells: int = 0  # cells per write task this source needs (0: the driver's default)
    total_counts: float = 0.0
    dropped_counts: float = 0.0
    genes_report: dict = field(default_factory=dict)
    error: str = ""

    @property
    def projection(self):
        return self.source_cols, self.target, len(self.feature_ids)

    @property
    def dropped_share(self) -> float:
        return self.dropped_counts / self.total_counts if self.total_counts else 0.0

    def project(self, m: sp.csr_matrix) -> sp.csr_matrix:
        return project_block(m, self.projection)


def probe_source(path: str, organism: str = "homo_sapiens", allow_normalized: bool = False,
                 require_obs: tuple[str, ...] = (), duplicate_genes: str = "sum",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, previous_symbols: bool = True) -> Probe:
    """Validate a source completely (counts, genes, obs) without writing anything."""
    p = Probe(path=path)
    try:
        if duplicate_genes not in DUPLICATE_MODES:
            raise ValueError(f"duplicate_genes must be one of {DUPLICATE_MODES}, not {duplicate_genes!r}")
        p.format = detect_format(path) or ""
        if not p.format:
            raise SourceError(path, "file", "is not a supported source (.h5ad, .zarr, 10x .h5, 10x MTX directory)")
        p.size_bytes = source_size(path)
        if p.size_bytes == 0:
            raise SourceError(path, "file", "is empty (0 bytes)")
        p.fingerprint = fingerprint(path)
        if p.format == "10x_mtx":
            need = mtx_nnz(path) * BYTES_PER_NNZ * 3  # scanpy holds the COO triplets and the CSR
            if need > memory_budget:
                raise SourceError(path, "matrix.mtx", f"needs ~{need / 1e9:.1f} GB to read (Matrix Market has no "
                                  f"row index) but the memory budget is {memory_budget / 1e9:.1f} GB: raise "
                                  "--memory-budget or convert it to .h5ad")
        try:
            src = open_source(path, p.format, memory_budget=memory_budget)
        except OSError as exc:
            raise SourceError(path, "file", f"is not a readable {p.format} source ({exc})") from None
        with src:
            _probe_open(p, src, organism, allow_normalized, require_obs, duplicate_genes, memory_budget,
                        previous_symbols)
    except SourceError as exc:
        p.error = str(exc)
    except Exception as exc:  # unexpected: still name the file
        p.error = f"{os.path.basename(path.rstrip('/'))}: {type(exc).__name__}: {exc}"
    return p


probe_h5ad = probe_source  # the name callers used before other formats existed


def _probe_open(p, src, organism, allow_normalized, require_obs, duplicate_genes, memory_budget, prev) -> None:
    path = p.path
    try:
        obs = src.obs()
    except KeyError:
        raise SourceError(path, "obs", "missing") from None
    fld, node, colsum = _choose_counts(src, path, allow_normalized)
    p.counts_field, p.normalized = fld.replace(" (normalized)", ""), fld.endswith("(normalized)")
    p.n_cells = node.shape[0]
    if p.n_cells == 0:
        raise SourceError(path, p.counts_field, "has no cells (empty dataset)")
    if len(obs) != p.n_cells:
        raise SourceError(path, "obs", f"has {len(obs)} rows but {p.counts_field} has {p.n_cells}")
    for col in require_obs:
        if col not in obs.columns:
            raise SourceError(path, f"obs.{col}", "required column missing")
    var_key = "raw/var" if p.counts_field == "raw.X" else "var"
    try:
        ids, symbols = src.genes(p.counts_field)
    except KeyError:
        raise SourceError(path, var_key, "missing") from None
    if len(ids) != node.shape[1]:
        raise SourceError(path, "var", f"has {len(ids)} genes but {p.counts_field} has {node.shape[1]} columns")
    dup = pd.Index(ids).duplicated()
    if duplicate_genes == "error" and dup.any():
        raise SourceError(path, f"{var_key}.index", f"duplicate gene IDs ({int(dup.sum())}, e.g. {ids[dup][0]!r})")
    m = map_genes(ids, organism, symbols=symbols, previous_symbols=prev)
    if len(m.feature_ids) == 0:
        raise SourceError(path, f"{var_key}.index", f"no gene maps to the {organism} reference "
                                                    f"(e.g. {', '.join(m.unmapped[:3])})")
    if duplicate_genes == "error" and m.n_collapsed:
        d = pd.Index(m.feature_ids).duplicated()
        raise SourceError(path, f"{var_key}.index",
                          f"several genes map to the same Ensembl ID (e.g. {m.feature_ids[d][0]}); "
                          "--duplicate-genes sum adds them up")
    p.source_cols, p.target = np.asarray(m.source_index, np.int64), m.target
    p.feature_ids, p.unmapped = [str(x) for x in m.unique_ids], m.unmapped
    _count_report(p, m, ids, colsum)
    p.block_cells = _block_cells(src, node, memory_budget)


def _count_report(p: Probe, m, ids: np.ndarray, colsum: np.ndarray) -> None:
    mapped = np.zeros(len(ids), bool)
    mapped[p.source_cols] = True
    collapsed = m.collapsed_columns()
    p.total_counts = float(colsum.sum())
    p.dropped_counts = float(colsum[~mapped].sum())
    dropped_cols = np.flatnonzero(~mapped)
    top = dropped_cols[np.argsort(-colsum[dropped_cols], kind="stable")[:10]]
    p.genes_report = {
        "features": int(len(ids)),
        "genes_stored": len(p.feature_ids),
        "unmapped": len(p.unmapped),
        "ambiguous_symbols": int(m.ambiguous),
        "refused_fallbacks": int(m.refused),
        "duplicates_collapsed": int(len(collapsed)),
        "duplicate_counts_moved": float(colsum[collapsed].sum()),
        "previous_symbols_resolved": len(m.previous),
        "previous_symbol_counts": float(colsum[np.asarray(m.previous_index, np.int64)].sum()),
        "previous_symbol_examples": [f"{a}->{b}" for a, b, _ in m.previous[:10]],
        "dropped_share": round(p.dropped_counts / p.total_counts, 6) if p.total_counts else 0.0,
        "top_dropped": [f"{ids[c]}:{int(colsum[c])}" for c in top if colsum[c] > 0],
    }


def _block_cells(src, node: Matrix, budget: int) -> int:
    """Cells per write task: all of an in-memory source (read once); a CSC matrix in blocks as large
    as the budget allows (each block is one scan of the file); else the driver's default."""
    if src.in_memory:
        return node.shape[0]
    if node.kind == "csc":
        per_cell = max(1.0, node.nnz / max(1, node.shape[0])) * BYTES_PER_NNZ * 3  # triplets + CSR + copy
        return max(1, min(node.shape[0], int(budget / per_cell)))
    return 0


def _choose_counts(src, path: str, allow_normalized: bool) -> tuple[str, Matrix, np.ndarray]:
    present = src.candidates()
    if not present:
        raise SourceError(path, "X", "no count matrix (looked in raw.X, layers['counts'], X)")
    errors = []
    for fld, node in present:
        try:
            return fld, node, _check_counts(node, fld, path)
        except SourceError as exc:
            errors.append(exc)
    if allow_normalized:
        fld, node = present[-1]
        d = node.read_rows(0, min(node.shape[0], 1000)).data
        if np.all(np.isfinite(d)) and not (d < 0).any():
            colsum = np.zeros(node.shape[1])
            for vals, _, cols in node.scan():
                colsum += np.bincount(cols, weights=vals.astype(np.float64), minlength=node.shape[1])
            return f"{fld} (normalized)", node, colsum
    # Report the field a user would look at first: X's problem if X is the only candidate.
    raise errors[-1] if len(errors) == 1 else SourceError(path, "/".join(e.field for e in errors),
                                                          "; ".join(e.reason for e in errors))


def read_obs(path: str) -> pd.DataFrame:
    with open_source(path, blocks=True) as src:
        return src.obs()


def open_counts(path: str, counts_field: str, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """(source, matrix) for row-block reads; close the source when done. A 10x .h5 is always read in
    row blocks here (a block task must not read the whole file)."""
    src = open_source(path, blocks=True, memory_budget=memory_budget)
    node = dict(src.candidates())[counts_field]
    return src, node


def report_probe(p: Probe, organism: str) -> str:
    """One line for the ingest summary: genes and counts kept, summed, renamed and dropped; a
    warning (logged) when more than ``DROPPED_WARN_SHARE`` of the counts fall on unmapped genes."""
    g = p.genes_report
    name = os.path.basename(p.path.rstrip("/"))
    parts = [f"{g['genes_stored']} genes stored from {g['features']} features"]
    if g["unmapped"]:
        parts.append(f"{g['unmapped']} not in the {organism} reference dropped "
                     f"({g['ambiguous_symbols']} ambiguous symbols; e.g. {', '.join(p.unmapped[:5])})")
    if g["previous_symbols_resolved"]:
        parts.append(f"{g['previous_symbols_resolved']} previous symbols resolved "
                     f"({int(g['previous_symbol_counts'])} counts; e.g. {', '.join(g['previous_symbol_examples'][:3])})")
    if g["duplicates_collapsed"]:
        parts.append(f"{g['duplicates_collapsed']} duplicate features summed ({int(g['duplicate_counts_moved'])} counts moved)")
    parts.append(f"{p.dropped_share:.2%} of {int(p.total_counts)} counts dropped")
    line = f"{name}: " + "; ".join(parts)
    if p.dropped_share > DROPPED_WARN_SHARE:
        log.warning("%s: %.1f%% of its counts fall on genes the %s reference does not know (most: %s)", name,
                    100 * p.dropped_share, organism, ", ".join(g["top_dropped"][:5]))
    return line
