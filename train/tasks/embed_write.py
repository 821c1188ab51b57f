"""Embedding outputs written block by block: nothing of size n_cells x d is ever held in memory.

- parquet: ``pyarrow.parquet.ParquetWriter``, one row group per block, columns ``soma_joinid`` and
  ``embedding`` (fixed-size list of float32); the schema metadata carries the format version.
- .h5ad: h5py datasets that grow with each block, laid out and tagged exactly as anndata writes
  them (``obs`` columns as ``array`` / ``string-array``, ``obsm/X_atlasflow`` as ``array``), so
  ``anndata.read_h5ad`` reads the file back; ``X`` is absent and ``var`` empty (an embedding file).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EMBED_FORMAT_VERSION = 1
OBSM_KEY = "X_atlasflow"
_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}
CHUNK_ROWS = 1024


class ParquetEmbeddingWriter:
    def __init__(self, path: str, meta: dict):
        self.path, self.meta, self._w = path, meta, None

    def write(self, joinids: np.ndarray, emb: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), emb.shape[1])
        tbl = pa.table({"soma_joinid": pa.array(joinids, pa.int64()), "embedding": col})
        if self._w is None:
            meta = {"atlasflow.embed_format_version": str(EMBED_FORMAT_VERSION),
                    **{k: str(v) for k, v in self.meta.items()}}
            self._w = pq.ParquetWriter(self.path, tbl.schema.with_metadata(meta))
        if len(tbl):
            self._w.write_table(tbl)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


class H5adEmbeddingWriter:
    """An .h5ad holding obs and ``obsm["X_atlasflow"]``, appended one block of cells at a time."""

    def __init__(self, path: str, dim: int, uns: dict):
        import h5py

        self.path, self.dim, self.uns = path, int(dim), uns
        self.f = h5py.File(path, "w")
        self.f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obsm = self.f.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self.emb = obsm.create_dataset(OBSM_KEY, shape=(0, self.dim), maxshape=(None, self.dim), dtype="float32",
                                       chunks=(CHUNK_ROWS, self.dim))
        self.emb.attrs.update(_ARRAY)
        self.columns: dict[str, object] = {}  # column -> h5py dataset
        self.index = None
        self.n_rows = 0

    def _start_obs(self, obs: pd.DataFrame) -> None:
        import h5py

        g = self.f.create_group("obs")
        name = obs.index.name if obs.index.name and obs.index.name not in obs.columns else "_index"
        g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": name,
                        "column-order": np.array(list(map(str, obs.columns)), dtype=object)})
        self.index = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                      chunks=(CHUNK_ROWS,))
        self.index.attrs.update(_STRINGS)
        for c in obs.columns:
            dt = obs[c].dtype
            # numpy numbers and bools stay typed; strings, categoricals and pandas extension types
            # (nullable ints, ...) are written as strings, as the existing h5ad outputs do
            numeric = isinstance(dt, np.dtype) and dt.kind in "biuf"
            dt = dt if numeric else h5py.string_dtype()
            d = g.create_dataset(str(c), shape=(0,), maxshape=(None,), dtype=dt, chunks=(CHUNK_ROWS,))
            d.attrs.update(_ARRAY if numeric else _STRINGS)
            self.columns[str(c)] = d

    def write(self, obs: pd.DataFrame, emb: np.ndarray) -> None:
        if len(obs) != len(emb) or emb.shape[1:] != (self.dim,):
            raise ValueError(f"{self.path}: block of {len(obs)} obs rows and embeddings {emb.shape}")
        if self.index is None:
            self._start_obs(obs)
        if [str(c) for c in obs.columns] != list(self.columns):
            raise ValueError(f"{self.path}: obs columns changed between blocks: {list(obs.columns)}")
        a, b = self.n_rows, self.n_rows + len(obs)
        cols = [(self.columns[str(c)], obs[c]) for c in obs.columns]
        for d, values in [(self.emb, emb.astype(np.float32)), (self.index, obs.index.to_series()), *cols]:
            d.resize(b, axis=0)
            d[a:b] = values.astype(str).to_numpy(dtype=object) if d.dtype.kind == "O" else np.asarray(values)
        self.n_rows = b

    def close(self) -> None:
        from anndata.io import write_elem

        if self.index is None:  # no cells: still a valid, empty AnnData
            self._start_obs(pd.DataFrame(index=pd.Index([], dtype=str)))
        write_elem(self.f, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
        for key in ("varm", "obsp", "varp", "layers"):
            write_elem(self.f, key, {})
        write_elem(self.f, "uns", self.uns)
        self.f.close()
