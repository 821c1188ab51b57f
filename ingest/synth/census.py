"""CELLxGENE Census layout of the synthetic atlas, opened by ``cellxgene_census.open_soma(uri=ROOT)``.

ROOT (SOMA Collection)
  census_data/<organism>   Experiment: obs (soma_joinid + Census columns), ms["RNA"].var
                           (feature_id, feature_name, feature_length, nnz, n_measured_obs),
                           ms["RNA"].X["raw"] float32
  census_info              Collection: summary (label, value), datasets (one row per dataset)
obs string columns are plain strings, and every write is one write per open (tiledbsoma 2.3 loses
enumeration values otherwise, see NOTES.md). var needs the per-gene nnz over all cells, so it is
written after X; the root's ``atlasflow.synth`` metadata is written last and marks completion.
"""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import tiledbsoma as soma

from atlasflow.store.schema import CENSUS_STRING_COLUMNS
from atlasflow.store.store import soma_context

from . import vocab
from . import Chunk, DatasetPlan, Model, SynthConfig
from atlasflow.store.xwrite import write_x_global_order

from .write import SYNTH_META_KEY, _meta, _Writer, obs_arrow

CENSUS_OBS_SCHEMA = pa.schema(
    [("soma_joinid", pa.int64())]
    + [(c, pa.large_string()) for c in CENSUS_STRING_COLUMNS]
    + [("is_primary_data", pa.bool_()), ("raw_sum", pa.float64()), ("nnz", pa.int64()),
       ("raw_mean_nnz", pa.float64()), ("n_measured_vars", pa.int64())]
)
CENSUS_VAR_SCHEMA = pa.schema([("soma_joinid", pa.int64()), ("feature_id", pa.large_string()),
                               ("feature_name", pa.large_string()), ("feature_length", pa.int64()),
                               ("nnz", pa.int64()), ("n_measured_obs", pa.int64())])
_DATASETS_SCHEMA = pa.schema([("soma_joinid", pa.int64()), ("collection_id", pa.large_string()),
                              ("collection_name", pa.large_string()), ("collection_doi", pa.large_string()),
                              ("dataset_id", pa.large_string()), ("dataset_version_id", pa.large_string()),
                              ("dataset_title", pa.large_string()), ("dataset_h5ad_path", pa.large_string()),
                              ("dataset_total_cell_count", pa.int64())])
_SUMMARY_SCHEMA = pa.schema([("soma_joinid", pa.int64()), ("label", pa.large_string()),
                             ("value", pa.large_string())])


def _write(uri: str, kind, table: pa.Table) -> None:
    with kind.open(uri, "w", context=soma_context()) as obj:
        obj.write(table)


class CensusWriter(_Writer):
    def __init__(self, cfg: SynthConfig, out: str, model: Model, plans: list[DatasetPlan]):
        self.cfg, self.root, self.model, self.plans = cfg, out.rstrip("/"), model, plans
        self.exp_uri = f"{self.root}/census_data/{cfg.organism}"
        self.obs_uri = f"{self.exp_uri}/obs"
        self.x_uri = f"{self.exp_uri}/ms/RNA/X/raw"
        self.gene_nnz = np.zeros(cfg.n_genes, dtype=np.int64)
        self.type_counts = np.zeros(len(vocab.CELL_TYPES), dtype=np.int64)
        ctx = soma_context()
        with soma.Collection.create(self.root, context=ctx) as root:
            with root.add_new_collection("census_data") as data:
                with data.add_new_collection(cfg.organism, soma.Experiment) as exp:
                    exp.add_new_dataframe("obs", schema=CENSUS_OBS_SCHEMA, index_column_names=["soma_joinid"],
                                          domain=[(0, cfg.n_cells - 1)]).close()
                    with exp.add_new_collection("ms") as ms:
                        with ms.add_new_collection("RNA", soma.Measurement) as rna:
                            rna.add_new_dataframe("var", schema=CENSUS_VAR_SCHEMA,
                                                  index_column_names=["soma_joinid"],
                                                  domain=[(0, cfg.n_genes - 1)]).close()
                            with rna.add_new_collection("X") as x:
                                x.add_new_sparse_ndarray("raw", type=pa.float32(),
                                                         shape=(cfg.n_cells, cfg.n_genes)).close()
            with root.add_new_collection("census_info") as info:
                info.add_new_dataframe("summary", schema=_SUMMARY_SCHEMA, index_column_names=["soma_joinid"],
                                       domain=[(0, 15)]).close()
                info.add_new_dataframe("datasets", schema=_DATASETS_SCHEMA, index_column_names=["soma_joinid"],
                                       domain=[(0, len(plans) - 1)]).close()

    def write(self, chunk: Chunk) -> None:
        start = chunk.plan.cell_offset + chunk.row_start
        joinids = np.arange(start, start + chunk.n, dtype=np.int64)
        X = chunk.X
        nnz = chunk.nnz_per_cell
        with soma.SparseNDArray.open(self.x_uri, "w", context=soma_context()) as x:
            write_x_global_order(x, X, start)
        raw_sum = chunk.raw_sum
        obs = obs_arrow(chunk, {
            "raw_mean_nnz": pa.array(np.divide(raw_sum, nnz, out=np.zeros(chunk.n), where=nnz > 0)),
            "n_measured_vars": pa.array(np.full(chunk.n, self.cfg.n_genes, dtype=np.int64)),
        })
        obs = obs.add_column(0, "soma_joinid", pa.array(joinids)).cast(CENSUS_OBS_SCHEMA)
        _write(self.obs_uri, soma.DataFrame, obs)
        self.gene_nnz += np.bincount(X.indices, minlength=self.cfg.n_genes)
        self.type_counts += np.bincount(chunk.cell_type, minlength=len(vocab.CELL_TYPES))

    def close(self, nnz: np.ndarray, raw_sum: np.ndarray) -> dict:
        cfg, genes = self.cfg, self.model.genes
        G = len(genes)
        _write(f"{self.exp_uri}/ms/RNA/var", soma.DataFrame, pa.table({
            "soma_joinid": pa.array(np.arange(G, dtype=np.int64)),
            "feature_id": pa.array(genes.index.tolist(), pa.large_string()),
            "feature_name": pa.array(genes["feature_name"].tolist(), pa.large_string()),
            "feature_length": pa.array(genes["feature_length"].to_numpy(np.int64)),
            "nnz": pa.array(self.gene_nnz),
            "n_measured_obs": pa.array(np.full(G, cfg.n_cells, dtype=np.int64)),
        }, schema=CENSUS_VAR_SCHEMA))
        _write(f"{self.root}/census_info/datasets", soma.DataFrame, pa.table({
            "soma_joinid": pa.array(np.arange(len(self.plans), dtype=np.int64)),
            "collection_id": ["synthetic"] * len(self.plans),
            "collection_name": [f"atlasflow synthetic atlas (seed {cfg.seed})"] * len(self.plans),
            "collection_doi": [""] * len(self.plans),
            "dataset_id": [p.dataset_id for p in self.plans],
            "dataset_version_id": [p.dataset_id for p in self.plans],
            "dataset_title": [p.title for p in self.plans],
            "dataset_h5ad_path": [f"{p.dataset_id}.h5ad" for p in self.plans],
            "dataset_total_cell_count": pa.array([p.n_cells for p in self.plans], pa.int64()),
        }, schema=_DATASETS_SCHEMA))
        n_donors = sum(len(p.donor_ids) for p in self.plans)
        summary = [("census_schema_version", "synthetic"), ("census_build_date", datetime.date.today().isoformat()),
                   ("dataset_schema_version", "synthetic"), ("total_cell_count", str(cfg.n_cells)),
                   ("unique_cell_count", str(sum(p.n_cells for p in self.plans if p.is_primary_data))),
                   (f"number_donors_{cfg.organism}", str(n_donors)),
                   ("atlasflow_synth_format", _meta(cfg))]
        _write(f"{self.root}/census_info/summary", soma.DataFrame, pa.table({
            "soma_joinid": pa.array(np.arange(len(summary), dtype=np.int64)),
            "label": [s[0] for s in summary], "value": [s[1] for s in summary]}, schema=_SUMMARY_SCHEMA))
        with soma.Collection.open(self.root, "w", context=soma_context()) as root:
            root.metadata[SYNTH_META_KEY] = _meta(cfg, complete=True, nnz=int(nnz.sum()))
        return {"census_uri": self.root, "experiment_uri": self.exp_uri,
                "cell_type_counts": {vocab.CELL_TYPES[t][0]: int(c) for t, c in enumerate(self.type_counts) if c}}
