"""Reading H5AD sources in bounded memory: probe (validate + map genes) and row blocks.

Everything goes through h5py with anndata's element readers, so a block of rows is read without
loading the matrix. Validation is a full pass *before* any write, so a bad file never leaves rows
behind.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from atlasflow.store.genes import map_genes

# Where raw counts may live, in order of preference (CELLxGENE puts raw counts in raw.X).
COUNT_FIELDS = ("raw.X", "layers/counts", "X")
VALIDATE_BLOCK = 20_000


class SourceError(ValueError):
    """A source that cannot be ingested; the message names the file and the field."""

    def __init__(self, path: str, fld: str, reason: str):
        self.path, self.field, self.reason = path, fld, reason
        super().__init__(f"{os.path.basename(path)}: {fld}: {reason}")


def fingerprint(path: str, chunk: int = 8 * 1024**2) -> str:
    """Content hash of the file (blake2b-128): identity of a source across runs and renames."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _matrix_node(f: h5py.File, fld: str):
    key = {"raw.X": "raw/X", "layers/counts": "layers/counts", "X": "X"}[fld]
    return f[key] if key in f else None


def _n_rows(node) -> int:
    if isinstance(node, h5py.Dataset):
        return int(node.shape[0])
    return int(node.attrs["shape"][0])


def read_rows(node, a: int, b: int, dtype=np.float32) -> sp.csr_matrix:
    """Rows [a, b) of a dense or sparse H5AD matrix node, as CSR (float32 is exact for counts < 2**24;
    validation reads the stored dtype so that no near-integer is rounded into a count)."""
    if isinstance(node, h5py.Dataset):
        return sp.csr_matrix(np.asarray(node[a:b], dtype=dtype))
    enc = node.attrs.get("encoding-type", "")
    if enc not in ("csr_matrix", "csc_matrix"):
        raise ValueError(f"unsupported matrix encoding {enc!r}")
    m = sparse_dataset(node)[a:b]
    return sp.csr_matrix(m, dtype=dtype)


def _check_counts(node, fld: str, path: str) -> None:
    """Full streaming pass: finite, non-negative, integer-valued."""
    n = _n_rows(node)
    for a in range(0, n, VALIDATE_BLOCK):
        m = read_rows(node, a, min(n, a + VALIDATE_BLOCK), dtype=None)
        d = m.data
        if not np.all(np.isfinite(d)):
            i = int(np.flatnonzero(~np.isfinite(d))[0])
            raise SourceError(path, fld, f"contains NaN/inf counts (first at row {a + _row_of(m, i)})")
        if (d < 0).any():
            i = int(np.flatnonzero(d < 0)[0])
            raise SourceError(path, fld, f"contains negative counts (first at row {a + _row_of(m, i)}: {d[i]})")
        frac = d != np.round(d)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise SourceError(path, fld, f"is not integer counts (row {a + _row_of(m, i)} has {d[i]:.4g}); "
                                         "pass --normalized to ingest normalized data (not for pretraining)")


def _row_of(m: sp.csr_matrix, data_index: int) -> int:
    return int(np.searchsorted(m.indptr, data_index, side="right") - 1)


def _var_index(f: h5py.File, fld: str, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    key = "raw/var" if fld == "raw.X" else "var"
    if key not in f:
        raise SourceError(path, key, "missing")
    var = read_elem(f[key])
    ids = var.index.to_numpy().astype(str)
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise SourceError(path, f"{key}.index", f"duplicate gene IDs ({int(dup.sum())}, e.g. {ids[dup][0]!r})")
    symbols = None
    for col in ("feature_name", "gene_symbol", "gene_symbols", "symbol"):
        if col in var.columns:
            symbols = var[col].astype(str).to_numpy()
            break
    return ids, symbols


@dataclass
class Probe:
    """What the driver needs to reserve a source: size, identity, genes; or the error."""

    path: str
    fingerprint: str = ""
    size_bytes: int = 0
    n_cells: int = 0
    counts_field: str = ""
    normalized: bool = False
    source_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    feature_ids: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    error: str = ""


def probe_h5ad(path: str, organism: str = "homo_sapiens", allow_normalized: bool = False,
               require_obs: tuple[str, ...] = ()) -> Probe:
    """Validate a source completely (counts, genes, obs) without writing anything."""
    p = Probe(path=path)
    try:
        p.size_bytes = os.path.getsize(path)
        if p.size_bytes == 0:
            raise SourceError(path, "file", "is empty (0 bytes)")
        p.fingerprint = fingerprint(path)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise SourceError(path, "file", f"is not a readable HDF5/H5AD file ({exc})") from None
        with f:
            if "obs" not in f:
                raise SourceError(path, "obs", "missing")
            fld, node = _choose_counts(f, path, allow_normalized)
            p.counts_field, p.normalized = fld, fld.endswith("(normalized)")
            p.counts_field = fld.replace(" (normalized)", "")
            p.n_cells = _n_rows(node)
            if p.n_cells == 0:
                raise SourceError(path, p.counts_field, "has no cells (empty dataset)")
            obs = read_elem(f["obs"])
            if len(obs) != p.n_cells:
                raise SourceError(path, "obs", f"has {len(obs)} rows but {p.counts_field} has {p.n_cells}")
            for col in require_obs:
                if col not in obs.columns:
                    raise SourceError(path, f"obs.{col}", "required column missing")
            ids, symbols = _var_index(f, p.counts_field, path)
            n_cols = node.shape[1] if isinstance(node, h5py.Dataset) else int(node.attrs["shape"][1])
            if len(ids) != n_cols:
                raise SourceError(path, "var", f"has {len(ids)} genes but {p.counts_field} has {n_cols} columns")
            m = map_genes(ids, organism, symbols=symbols)
            if len(m.feature_ids) == 0:
                raise SourceError(path, "var.index", f"no gene maps to the {organism} reference "
                                                     f"(e.g. {', '.join(m.unmapped[:3])})")
            if len(set(m.feature_ids)) != len(m.feature_ids):
                dup = pd.Index(m.feature_ids).duplicated()
                raise SourceError(path, "var.index",
                                  f"several genes map to the same Ensembl ID (e.g. {m.feature_ids[dup][0]})")
            p.source_cols, p.feature_ids, p.unmapped = m.source_index, list(m.feature_ids), m.unmapped
    except SourceError as exc:
        p.error = str(exc)
    except Exception as exc:  # unexpected: still name the file
        p.error = f"{os.path.basename(path)}: {type(exc).__name__}: {exc}"
    return p


def _choose_counts(f: h5py.File, path: str, allow_normalized: bool) -> tuple[str, object]:
    present = [(fld, _matrix_node(f, fld)) for fld in COUNT_FIELDS]
    present = [(fld, n) for fld, n in present if n is not None]
    if not present:
        raise SourceError(path, "X", "no count matrix (looked in raw.X, layers['counts'], X)")
    errors = []
    for fld, node in present:
        try:
            _check_counts(node, fld, path)
            return fld, node
        except SourceError as exc:
            errors.append(exc)
    if allow_normalized:
        fld, node = present[-1]
        d = read_rows(node, 0, min(_n_rows(node), 1000)).data
        if np.all(np.isfinite(d)) and not (d < 0).any():
            return f"{fld} (normalized)", node
    # Report the field a user would look at first: X's problem if X is the only candidate.
    raise errors[-1] if len(errors) == 1 else SourceError(path, "/".join(e.field for e in errors),
                                                          "; ".join(e.reason for e in errors))


def read_obs(path: str) -> pd.DataFrame:
    with h5py.File(path, "r") as f:
        return read_elem(f["obs"])


def open_counts(path: str, counts_field: str):
    f = h5py.File(path, "r")
    return f, _matrix_node(f, counts_field)
