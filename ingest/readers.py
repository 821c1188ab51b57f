"""Source formats, read through the field's own readers, in bounded memory.

- ``.h5ad`` / AnnData ``.zarr``: anndata's element readers (``read_elem``, ``sparse_dataset``) on the
  h5py / zarr group, so rows are read in blocks without loading the matrix. X may be CSR, CSC or
  dense. CSR and dense read row blocks directly; a CSC matrix keeps cells in its minor axis, so a
  row block is gathered by one scan over the columns in bounded nnz chunks (the driver gives CSC
  sources blocks as large as the memory budget allows, so the file is scanned few times).
- 10x ``.h5`` (Cell Ranger v2/v3): ``scanpy.read_10x_h5`` when the file fits the memory budget;
  above it, row blocks from the same HDF5 groups (cells are the compressed axis, so a block of cells
  is one contiguous slice). Gene Expression features only, as scanpy's ``gex_only``.
- 10x MTX directories (``matrix.mtx[.gz]`` + ``features.tsv[.gz]``/``genes.tsv`` + ``barcodes``):
  ``scanpy.read_10x_mtx``. Matrix Market is text with no row index, so it is read whole; a directory
  whose matrix would not fit the memory budget is refused (convert it to .h5ad first).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes one read task may hold for a source's matrix
SCAN_NNZ = 4_000_000  # entries per chunk when scanning a matrix (validation, CSC gathers)
FORMATS = ("h5ad", "zarr", "10x_h5", "10x_mtx")
MTX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
BYTES_PER_NNZ = 12  # float32 value + int64 index, in memory


def detect_format(path: str) -> str | None:
    """The source format of a path, or None when it is none of ours."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, n)) for n in MTX_NAMES):
            return "10x_mtx"
        if path.rstrip("/").endswith(".zarr") or _zarr_is_anndata(path):
            return "zarr"
        return None
    if path.endswith(".h5ad"):
        return "h5ad"
    if path.endswith(".h5"):
        return "10x_h5"
    return None


def _zarr_is_anndata(path: str) -> bool:
    attrs = os.path.join(path, ".zattrs")
    if not os.path.isfile(attrs):
        return False
    try:
        with open(attrs) as fh:
            return json.load(fh).get("encoding-type") == "anndata"
    except (OSError, ValueError):
        return False


def fingerprint(path: str, chunk: int = 8 * 1024**2) -> str:
    """Content hash (blake2b-128) of a file, or of a directory's files with their relative paths:
    identity of a source across runs and renames."""
    h = hashlib.blake2b(digest_size=16)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for fp in files:
        if os.path.isdir(path):
            h.update(os.path.relpath(fp, path).encode() + b"\0")
        with open(fp, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def source_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# -- matrices -----------------------------------------------------------------------------------
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


def frame_index(values) -> pd.Index:
    return pd.Index(np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values]))


# -- sources ------------------------------------------------------------------------------------
# Where raw counts may live in an AnnData, in order of preference (CELLxGENE puts raw counts in raw.X).
ANNDATA_FIELDS = {"raw.X": ("raw/X", "raw/var"), "layers/counts": ("layers/counts", "var"), "X": ("X", "var")}
SYMBOL_COLUMNS = ("feature_name", "gene_symbol", "gene_symbols", "symbol")


class Source:
    """One source opened for reading: candidate count matrices, their genes, and obs."""

    format = ""
    in_memory = False  # the whole matrix is read at once (the driver then writes it as one block)

    def __init__(self, path: str):
        self.path = path

    def candidates(self) -> list[tuple[str, Matrix]]:
        raise NotImplementedError

    def var(self, fld: str) -> pd.DataFrame:
        raise NotImplementedError

    def obs(self) -> pd.DataFrame:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def genes(self, fld: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(identifiers, symbols or None) of a field's columns."""
        var = self.var(fld)
        ids = var.index.to_numpy().astype(str)
        for col in SYMBOL_COLUMNS:
            if col in var.columns:
                return ids, var[col].astype(str).to_numpy()
        return ids, None


class AnnDataOnDisk(Source):
    """.h5ad through h5py, AnnData .zarr through zarr; elements through anndata's readers."""

    def __init__(self, path: str, fmt: str):
        super().__init__(path)
        self.format = fmt
        if fmt == "h5ad":
            self.root = h5py.File(path, "r")
        else:
            import zarr

            self.root = zarr.open_group(path, mode="r")

    def close(self):
        if self.format == "h5ad":
            self.root.close()

    def has(self, key: str) -> bool:
        try:
            self.root[key]
        except KeyError:
            return False
        return True

    def candidates(self):
        return [(fld, matrix_of(self.root[key])) for fld, (key, _) in ANNDATA_FIELDS.items() if self.has(key)]

    def matrix(self, fld: str) -> Matrix:
        return matrix_of(self.root[ANNDATA_FIELDS[fld][0]])

    def var(self, fld):
        from anndata.io import read_elem

        key = ANNDATA_FIELDS[fld][1]
        if not self.has(key):
            raise KeyError(key)
        return read_elem(self.root[key])

    def obs(self):
        from anndata.io import read_elem

        if not self.has("obs"):
            raise KeyError("obs")
        return read_elem(self.root["obs"])


class Tenx(Source):
    """Cell Ranger output read whole by scanpy (an .h5 within the memory budget, or an MTX dir)."""

    def __init__(self, path: str, fmt: str):
        import scanpy as sc

        super().__init__(path)
        self.format, self.in_memory = fmt, True
        if fmt == "10x_h5":
            a = sc.read_10x_h5(path, gex_only=True)
            ids, symbols = a.var["gene_ids"].astype(str).to_numpy(), a.var_names.astype(str).to_numpy()
        else:
            a = sc.read_10x_mtx(path, var_names="gene_ids", gex_only=True, cache=False)
            ids, symbols = a.var_names.astype(str).to_numpy(), a.var["gene_symbols"].astype(str).to_numpy()
        self._var = pd.DataFrame({"gene_symbols": symbols}, index=pd.Index(ids))
        self._obs = pd.DataFrame(index=a.obs_names.astype(str))
        self._X = InMemory(a.X)

    def candidates(self):
        return [("X", self._X)]

    def var(self, fld):
        return self._var

    def obs(self):
        return self._obs


class TenxH5Blocks(Source):
    """A 10x .h5 read in row blocks from its HDF5 groups (v3 ``matrix/``, v2 ``<genome>/``): the
    layout scanpy's reader documents; cells are the compressed axis, so a block of cells is one
    contiguous slice of ``data``/``indices``."""

    format = "10x_h5"

    def __init__(self, path: str):
        super().__init__(path)
        self.f = h5py.File(path, "r")
        if "matrix" in self.f:
            g = self.f["matrix"]
            feats = g["features"]
            # Probe-barcode (Flex) matrices name probes in ``id`` and their gene in ``gene_id`` (as scanpy)
            ids = frame_index(feats["gene_id" if "gene_id" in feats else "id"][:])
            names = frame_index(feats["name"][:])
            types = frame_index(feats["feature_type"][:]).to_numpy()
            gex = np.flatnonzero(types == "Gene Expression")
        else:
            g = self.f[next(iter(self.f.keys()))]
            ids, names = frame_index(g["genes"][:]), frame_index(g["gene_names"][:])
            gex = None
        n_genes, n_cells = (int(x) for x in g["shape"][:])
        self.g = g
        keep = gex if gex is not None else np.arange(n_genes)
        self._var = pd.DataFrame({"gene_symbols": names.to_numpy()[keep]}, index=pd.Index(ids.to_numpy()[keep]))
        self._X = Compressed(g["data"], g["indices"], g["indptr"], (n_cells, n_genes), "csr",
                             col_subset=None if gex is None or len(gex) == n_genes else gex)

    def close(self):
        self.f.close()

    def candidates(self):
        return [("X", self._X)]

    def var(self, fld):
        return self._var

    def obs(self):
        return pd.DataFrame(index=frame_index(self.g["barcodes"][:]))


def open_source(path: str, fmt: str | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                blocks: bool = False) -> Source:
    """Open a source of any supported format. A 10x .h5 goes to scanpy when it fits
    ``memory_budget`` (and ``blocks`` is not forced), else it is read in row blocks."""
    fmt = fmt or detect_format(path)
    if fmt in ("h5ad", "zarr"):
        return AnnDataOnDisk(path, fmt)
    if fmt == "10x_h5":
        if blocks or tenx_h5_nnz(path) * BYTES_PER_NNZ * 2 > memory_budget:  # scanpy holds COO + CSR
            return TenxH5Blocks(path)
        return Tenx(path, fmt)
    if fmt == "10x_mtx":
        return Tenx(path, fmt)
    raise ValueError(f"{path}: not a supported source (one of: {', '.join(FORMATS)})")
