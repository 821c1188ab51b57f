"""H5AD layout of the synthetic atlas: one ``<dataset_id>.h5ad`` per dataset, written chunk by chunk.

The first chunk of a dataset is written with anndata's own element writers (so the encoding is
exactly anndata's) into resizable HDF5 datasets; later chunks are appended: X with anndata's
``sparse_dataset(...).append``, obs columns by resizing their HDF5 datasets. Categorical obs
columns carry the dataset's full category list from the first chunk, so appends only add codes.
A file appears under its final name only once complete (written as a hidden ``.partial`` first).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pandas as pd
from anndata.io import sparse_dataset, write_elem

from . import SYNTH_FORMAT_VERSION, Chunk, DatasetPlan, Model, SynthConfig
from .write import _Writer, _meta, obs_categoricals, var_frame

_RESIZABLE = {"maxshape": (None,), "chunks": True}


def _obs_frame(chunk: Chunk) -> pd.DataFrame:
    cols = {name: pd.Categorical.from_codes(codes, categories=cats)
            for name, (codes, cats) in obs_categoricals(chunk).items()}
    cols["is_primary_data"] = np.full(chunk.n, chunk.plan.is_primary_data)
    cols["raw_sum"] = chunk.raw_sum
    cols["nnz"] = chunk.nnz_per_cell
    index = [f"{chunk.plan.dataset_id[:8]}-{r}" for r in range(chunk.row_start, chunk.row_start + chunk.n)]
    return pd.DataFrame(cols, index=pd.Index(index, name="cell_id"))


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize((n + len(values),))
    ds[n:] = values


class H5adWriter(_Writer):
    def __init__(self, cfg: SynthConfig, out: str, model: Model, plans: list[DatasetPlan]):
        os.makedirs(out, exist_ok=True)
        self.cfg, self.out, self.plans = cfg, out, plans
        self.var = var_frame(model)
        self.f: h5py.File | None = None
        self.plan: DatasetPlan | None = None
        self.files: list[str] = []

    def _paths(self, plan: DatasetPlan) -> tuple[str, str]:
        final = os.path.join(self.out, f"{plan.dataset_id}.h5ad")
        return final, os.path.join(self.out, f".{plan.dataset_id}.h5ad.partial")

    def _start(self, chunk: Chunk) -> None:
        self.plan = chunk.plan
        self.f = h5py.File(self._paths(chunk.plan)[1], "w")
        f = self.f
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        X = chunk.X.copy()
        X.indptr = X.indptr.astype(np.int64)  # appends must never overflow a 32-bit indptr
        write_elem(f, "X", X, dataset_kwargs=_RESIZABLE)
        write_elem(f, "obs", _obs_frame(chunk), dataset_kwargs=_RESIZABLE)
        write_elem(f, "var", self.var)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", {"title": chunk.plan.title, "schema_version": "synthetic",
                              "atlasflow_synth": _meta(self.cfg, dataset=chunk.plan.index,
                                                       dataset_id=chunk.plan.dataset_id)})

    def _append(self, chunk: Chunk) -> None:
        f = self.f
        sparse_dataset(f["X"]).append(chunk.X)
        obs = f["obs"]
        for name, col in _obs_frame(chunk).reset_index().items():
            if name == "cell_id":
                _append(obs[obs.attrs["_index"]], col.to_numpy().astype(object))
            elif isinstance(col.dtype, pd.CategoricalDtype):
                codes = obs[name]["codes"]
                _append(codes, col.cat.codes.to_numpy().astype(codes.dtype))
            else:
                _append(obs[name], col.to_numpy())

    def _finish(self) -> None:
        if self.f is None:
            return
        self.f.close()
        final, partial = self._paths(self.plan)
        os.replace(partial, final)
        self.files.append(final)
        self.f, self.plan = None, None

    def write(self, chunk: Chunk) -> None:
        if self.plan is not chunk.plan:
            self._finish()
            self._start(chunk)
        else:
            self._append(chunk)

    def close(self, nnz: np.ndarray, raw_sum: np.ndarray) -> dict:
        self._finish()
        return {"files": self.files, "synth_format_version": SYNTH_FORMAT_VERSION}
