"""Writers of the synthetic atlas layouts: H5AD files, a CELLxGENE-Census-layout SOMA store, an atlasflow store.

Each writer receives chunks in global cell order (see ``synth.iter_chunks``) and writes them as
they come (one writer thread, at most two chunks alive), so memory is bounded by chunk_cells.
What tells a reader the output is complete is written last (h5ad: atomic rename; census: root
metadata; store: manifest status).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa

from atlasflow.store.schema import CENSUS_STRING_COLUMNS
from atlasflow.store.store import write_cells_csr

from . import vocab
from . import SYNTH_FORMAT_VERSION, Chunk, DatasetPlan, Model, SynthConfig

SYNTH_META_KEY = "atlasflow.synth"


def _require_empty(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out}: exists and is not an empty directory; refusing to overwrite")


def _meta(cfg: SynthConfig, **extra) -> str:
    return json.dumps({"synth_format_version": SYNTH_FORMAT_VERSION, "seed": cfg.seed, "n_cells": cfg.n_cells,
                       "n_genes": cfg.n_genes, "n_datasets": cfg.n_datasets, "organism": cfg.organism, **extra},
                      sort_keys=True)


# ------------------------------------------------------------------------------------------------
# obs: every string column as (codes per cell, categories), so h5ad writes categoricals and the
# SOMA layouts decode to plain strings (see NOTES.md: no enumerations in tiledbsoma 2.3).
# ------------------------------------------------------------------------------------------------

def _per_donor(values: np.ndarray, terms: list[tuple[str, str]], donor: np.ndarray):
    cats = np.unique(values)
    codes = np.searchsorted(cats, values)[donor]
    labels = [terms[i] if i >= 0 else ("unknown", "unknown") for i in cats]
    return codes, [lab for lab, _ in labels], [tid for _, tid in labels]


def obs_categoricals(chunk: Chunk) -> dict[str, tuple[np.ndarray, list[str]]]:
    p: DatasetPlan = chunk.plan
    n = chunk.n
    zero = np.zeros(n, dtype=np.int64)
    tissue_label, tissue_id, allowed = vocab.TISSUES[p.tissue]
    types = np.asarray(allowed)
    t_codes = np.searchsorted(types, chunk.cell_type)
    cols: dict[str, tuple[np.ndarray, list[str]]] = {
        "dataset_id": (zero, [p.dataset_id]),
        "assay": (zero, [vocab.ASSAYS[p.assay][0]]),
        "assay_ontology_term_id": (zero, [vocab.ASSAYS[p.assay][1]]),
        "cell_type": (t_codes, [vocab.CELL_TYPES[t][0] for t in types]),
        "cell_type_ontology_term_id": (t_codes, [vocab.CELL_TYPES[t][1] for t in types]),
        "disease": (zero, [vocab.DISEASES[p.disease][0]]),
        "disease_ontology_term_id": (zero, [vocab.DISEASES[p.disease][1]]),
        "donor_id": (chunk.donor.astype(np.int64), list(p.donor_ids)),
        "suspension_type": (zero, [vocab.SUSPENSION_TYPE]),
        "tissue": (zero, [tissue_label]),
        "tissue_ontology_term_id": (zero, [tissue_id]),
        "tissue_type": (zero, [vocab.TISSUE_TYPE]),
        "tissue_general": (zero, [tissue_label]),
        "tissue_general_ontology_term_id": (zero, [tissue_id]),
    }
    for name, values, terms in (("development_stage", p.donor_stage, vocab.DEVELOPMENT_STAGES),
                                ("self_reported_ethnicity", p.donor_ethnicity, vocab.ETHNICITIES),
                                ("sex", p.donor_sex, vocab.SEXES)):
        codes, labels, ids = _per_donor(values, terms, chunk.donor)
        cols[name] = (codes, labels)
        cols[f"{name}_ontology_term_id"] = (codes, ids)
    return {c: cols[c] for c in CENSUS_STRING_COLUMNS}


def obs_arrow(chunk: Chunk, extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """Census obs columns as plain large_string, then is_primary_data, raw_sum, nnz (+ extra)."""
    arrays = {name: pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(cats))
              .cast(pa.large_string()) for name, (codes, cats) in obs_categoricals(chunk).items()}
    arrays["is_primary_data"] = pa.array(np.full(chunk.n, chunk.plan.is_primary_data))
    arrays["raw_sum"] = pa.array(chunk.raw_sum)
    arrays["nnz"] = pa.array(chunk.nnz_per_cell)
    arrays.update(extra or {})
    return pa.table(arrays)


class _Writer:
    def write(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def close(self, nnz: np.ndarray, raw_sum: np.ndarray) -> dict:
        raise NotImplementedError


def make_writer(cfg: SynthConfig, out: str, model: Model, plans: list[DatasetPlan], lease=None) -> _Writer:
    from atlasflow.store import is_store

    if not (cfg.layout == "store" and is_store(out)):  # a store layout may append to an existing store
        _require_empty(out)
    if cfg.layout == "h5ad":
        from .h5ad import H5adWriter
        return H5adWriter(cfg, out, model, plans)
    if cfg.layout == "census":
        from .census import CensusWriter
        return CensusWriter(cfg, out, model, plans)
    return StoreLayoutWriter(cfg, out, model, plans, lease)


class StoreLayoutWriter(_Writer):
    """Writes straight into an atlasflow store: one SourceEntry (kind "synthetic") per dataset."""

    def __init__(self, cfg: SynthConfig, out: str, model: Model, plans: list[DatasetPlan], lease=None):
        from atlasflow.store import COMPLETE, StoreWriter
        from atlasflow.store.lease_writer import LeasedStoreWriter

        self.cfg, self.out, self.plans = cfg, out, plans
        self.w = StoreWriter(out, organism=cfg.organism) if lease is None else \
            LeasedStoreWriter(out, lease, organism=cfg.organism)
        # Re-running into the same store resumes: complete datasets are kept (not written twice),
        # pending ones (a run that died) are rewritten into their reserved range.
        self.entries: dict[int, object] = {}
        for plan in plans:
            prior = self.w.manifest.by_fingerprint(self._fingerprint(plan))
            if prior is not None and prior.status == COMPLETE:
                self.entries[plan.index] = prior
        self.skip = set(self.entries)
        if len(self.skip) == len(plans):
            raise FileExistsError(f"--out {out}: the store already holds this synthetic atlas (same seed and "
                                  f"sizes, e.g. source {self.entries[0].source_id}); refusing to add it twice")
        self.gene_joinids = self.w.register_genes(list(model.genes.index))
        self.done = np.zeros(len(plans), dtype=np.int64)
        self.nnz = np.zeros(len(plans), dtype=np.int64)
        self.raw = np.zeros(len(plans), dtype=np.float64)

    def _fingerprint(self, plan: DatasetPlan) -> str:
        # chunk_cells and layout do not change the data, so they are not part of the identity
        return hashlib.sha256(_meta(self.cfg, dataset=plan.index).encode()).hexdigest()

    def _entry(self, plan: DatasetPlan):
        from atlasflow.store import SourceEntry

        if plan.index not in self.entries:
            fp = self._fingerprint(plan)
            self.entries[plan.index] = self.w.reserve(SourceEntry(
                source_id=f"synth-{plan.dataset_id}", kind="synthetic", name=plan.title, fingerprint=fp,
                n_cells=plan.n_cells, counts_field="X", genes_mapped=len(self.gene_joinids)))
        return self.entries[plan.index]

    def write(self, chunk: Chunk) -> None:
        if chunk.plan.index in self.skip:
            return
        entry = self._entry(chunk.plan)
        n = chunk.n
        obs = obs_arrow(chunk, {
            "source_id": pa.array([entry.source_id] * n, pa.large_string()),
            "source_file": pa.array([chunk.plan.title] * n, pa.large_string()),
            "source_row": pa.array(np.arange(chunk.row_start, chunk.row_start + n, dtype=np.int64)),
        })
        X = chunk.X
        # The entry only becomes visible to readers at w.complete().
        write_cells_csr(self.out, entry.joinid_start + chunk.row_start, obs, X, col_map=self.gene_joinids)
        i = chunk.plan.index
        self.done[i] += n
        self.nnz[i] += X.nnz
        self.raw[i] += float(X.data.sum(dtype=np.float64))
        if self.done[i] == chunk.plan.n_cells:
            self.w.complete(entry.source_id, nnz=int(self.nnz[i]), raw_sum=float(self.raw[i]))

    def close(self, nnz: np.ndarray, raw_sum: np.ndarray) -> dict:
        return {"store_uri": self.out, "sources": [self.entries[p.index].source_id for p in self.plans],
                "resumed_complete_sources": len(self.skip)}


def var_frame(model: Model) -> pd.DataFrame:
    var = model.genes[["feature_name", "feature_length"]].copy()
    var.index.name = "feature_id"
    return var

