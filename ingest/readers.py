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

import hashlib
import json
import os

import h5py
import numpy as np
import pandas as pd

from .matrices import (BYTES_PER_NNZ, MTX_NAMES, SCAN_NNZ, AnnDataSparse, Compressed, Dense,  # noqa: F401
                       InMemory, Matrix, matrix_of, mtx_nnz, tenx_h5_nnz)

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes one read task may hold for a source's matrix
FORMATS = ("h5ad", "zarr", "10x_h5", "10x_mtx")


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
