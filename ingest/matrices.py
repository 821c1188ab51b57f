"""Matrix readers behind the sources (``readers.py``): row blocks of a source's count matrix in bounded
memory, whatever its layout: in memory, compressed (CSR / CSC, h5py or zarr, via anndata's
``sparse_dataset``), dense; and the nonzero counts of 10x files without reading them.
"""

from __future__ import annotations

import gzip
import os

import h5py
import numpy as np
import scipy.sparse as sp

SCAN_NNZ = 4_000_000  # entries per chunk when scanning a matrix (validation, CSC gathers)
BYTES_PER_NNZ = 12  # float32 value + int64 index, in memory
MTX_NAMES = ("matrix.mtx.gz", "matrix.mtx")


class Matrix:
    """A cells x genes count matrix on disk or in memory: row blocks and a chunked full scan."""

    kind = "csr"  # "csr" | "csc" | "dense"
    shape: tuple[int, int]

    def read_rows(self, a: int, b: int, dtype=np.float32) -> sp.csr_matrix:
        raise NotImplementedError

    def scan(self):
        """Yield (values, rows, cols) of the stored entries in bounded chunks, stored dtype."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        raise NotImplementedError


class InMemory(Matrix):
    def __init__(self, m):
        self.m = sp.csr_matrix(m)
        self.shape = self.m.shape

    def read_rows(self, a, b, dtype=np.float32):
        out = self.m[a:b]
        return out.astype(dtype) if dtype is not None else out

    @property
    def nnz(self):
        return int(self.m.nnz)

    def scan(self):
        step = max(1, SCAN_NNZ // max(1, self.m.nnz // max(1, self.shape[0])))
        for a in range(0, self.shape[0], step):
            c = self.m[a:a + step].tocoo()
            yield c.data, c.row + a, c.col


class Compressed(Matrix):
    """CSR or CSC arrays (``data``, ``indices``, ``indptr``) of an h5py or zarr group, sliced as
    stored. ``kind`` is in cells x genes terms: 10x's genes x cells CSC is CSR here."""

    def __init__(self, data, indices, indptr, shape, kind: str, col_subset: np.ndarray | None = None):
        self.data, self.indices, self.kind = data, indices, kind
        self.indptr = np.asarray(indptr[:], dtype=np.int64)  # 8 bytes per major element: bounded
        self.full_shape = (int(shape[0]), int(shape[1]))
        self.col_subset = col_subset  # 10x: Gene Expression columns only
        n_cols = len(col_subset) if col_subset is not None else self.full_shape[1]
        self.shape = (self.full_shape[0], n_cols)

    @property
    def nnz(self):
        return int(self.indptr[-1])

    def _select(self, m: sp.csr_matrix) -> sp.csr_matrix:
        return m[:, self.col_subset].tocsr() if self.col_subset is not None else m

    def read_rows(self, a, b, dtype=np.float32):
        if self.kind == "csr":
            lo, hi = int(self.indptr[a]), int(self.indptr[b])
            vals = np.asarray(self.data[lo:hi])
            m = sp.csr_matrix((vals if dtype is None else vals.astype(dtype), np.asarray(self.indices[lo:hi]),
                               self.indptr[a:b + 1] - lo), shape=(b - a, self.full_shape[1]))
            return self._select(m)
        rows, cols, vals = [], [], []
        for v, r, c in self.scan():  # CSC: gather the block's rows in one pass over the columns
            keep = (r >= a) & (r < b)
            rows.append(r[keep] - a)
            cols.append(c[keep])
            vals.append(v[keep])
        v = np.concatenate(vals) if vals else np.zeros(0)
        m = sp.csr_matrix((v if dtype is None else v.astype(dtype),
                           (np.concatenate(rows) if rows else [], np.concatenate(cols) if cols else [])),
                          shape=(b - a, self.full_shape[1]))
        return self._select(m)

    def scan(self):
        total, ip = self.nnz, self.indptr
        remap = None
        if self.col_subset is not None:
            remap = np.full(self.full_shape[1], -1, np.int64)
            remap[self.col_subset] = np.arange(len(self.col_subset))
        for lo in range(0, total, SCAN_NNZ):
            hi = min(total, lo + SCAN_NNZ)
            vals, minor = np.asarray(self.data[lo:hi]), np.asarray(self.indices[lo:hi], dtype=np.int64)
            major = np.searchsorted(ip, np.arange(lo, hi), side="right") - 1
            rows, cols = (major, minor) if self.kind == "csr" else (minor, major)
            if remap is not None:
                cols = remap[cols]
                keep = cols >= 0
                vals, rows, cols = vals[keep], rows[keep], cols[keep]
            yield vals, rows, cols


class Dense(Matrix):
    kind = "dense"

    def __init__(self, ds):
        self.ds = ds
        self.shape = (int(ds.shape[0]), int(ds.shape[1]))

    @property
    def nnz(self):
        return self.shape[0] * self.shape[1]

    def read_rows(self, a, b, dtype=np.float32):
        return sp.csr_matrix(np.asarray(self.ds[a:b], dtype=dtype))

    def scan(self):
        step = max(1, SCAN_NNZ // max(1, self.shape[1]))
        for a in range(0, self.shape[0], step):
            block = np.asarray(self.ds[a:a + step])
            r, c = np.nonzero(block)
            yield block[r, c], r + a, c


class AnnDataSparse(Compressed):
    """An h5ad/zarr sparse matrix; CSR row blocks through anndata's ``sparse_dataset``."""

    def __init__(self, group):
        from anndata.io import sparse_dataset

        enc = group.attrs.get("encoding-type", "")
        if enc not in ("csr_matrix", "csc_matrix"):
            raise ValueError(f"unsupported matrix encoding {enc!r}")
        self.backed = sparse_dataset(group)
        super().__init__(group["data"], group["indices"], group["indptr"], group.attrs["shape"], enc[:3])

    def read_rows(self, a, b, dtype=np.float32):
        if self.kind == "csc":  # anndata would load the whole CSC matrix for a row slice
            return super().read_rows(a, b, dtype)
        m = self.backed[a:b]
        return sp.csr_matrix(m, dtype=dtype) if dtype is not None else sp.csr_matrix(m)


def matrix_of(node) -> Matrix:
    if isinstance(node, (h5py.Dataset,)) or getattr(node, "attrs", {}).get("encoding-type") == "array" \
            or _is_zarr_array(node):
        return Dense(node)
    return AnnDataSparse(node)


def _is_zarr_array(node) -> bool:
    try:
        import zarr
    except ModuleNotFoundError:
        return False
    return isinstance(node, zarr.Array)


def mtx_nnz(path: str) -> int:
    """Stored entries of a Matrix Market file, from its size line (no full parse)."""
    fn = next(os.path.join(path, n) for n in MTX_NAMES if os.path.isfile(os.path.join(path, n)))
    opener = gzip.open if fn.endswith(".gz") else open
    with opener(fn, "rt") as fh:
        for line in fh:
            if not line.startswith("%"):
                return int(line.split()[2])
    return 0


def tenx_h5_nnz(path: str) -> int:
    with h5py.File(path, "r") as f:
        g = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]
        return int(g["data"].shape[0])
