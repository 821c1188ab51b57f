"""The Census path: a synthetic store in the Census layout, read through cellxgene_census.

Every check compares against the mirror itself, read through cellxgene_census / tiledbsoma.
"""

from __future__ import annotations

import cellxgene_census
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from atlasflow.ingest.census import ingest_census, split_runs
from atlasflow.store.runs import Runs
from atlasflow.ingest.synth import synthesize
from atlasflow.store import open_store

FILTER = "cell_type == 'B cell' and tissue_general != 'heart'"


@pytest.fixture(scope="module")
def census_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("census") / "mirror"
    synthesize(str(root), n_cells=2500, n_genes=400, n_datasets=5, seed=3, layout="census", chunk_cells=700)
    return str(root)


def test_runs_and_blocks_cover_ids_exactly():
    ids = np.array([0, 1, 2, 5, 6, 9, 10, 11, 12])
    runs = Runs.from_sorted_ids(ids).ranges()
    assert runs == [(0, 3), (5, 7), (9, 13)]
    pieces = list(split_runs(runs, 4))
    flat = np.concatenate([np.arange(a, b) for _, p in pieces for a, b in p])
    assert np.array_equal(flat, ids)
    assert [off for off, _ in pieces] == [0, 4, 8]


def test_census_slice_equals_get_anndata(census_root, tmp_path, ray_session):
    uri = str(tmp_path / "store")
    report = ingest_census(uri, census_uri=census_root, organism="Homo sapiens", obs_filter=FILTER,
                           primary_only=False, block_cells=60, progress=False)
    assert report.ok and report.cells > 0

    with cellxgene_census.open_soma(uri=census_root) as census:
        ref = cellxgene_census.get_anndata(census, organism="Homo sapiens", obs_value_filter=FILTER,
                                           obs_column_names=["soma_joinid", "dataset_id", "cell_type", "donor_id",
                                                             "tissue_general", "assay"])
    store = open_store(uri)
    obs = store.obs(["source_row", "dataset_id", "cell_type", "donor_id", "tissue_general", "assay"])
    assert len(obs) == ref.n_obs
    # Align by the Census soma_joinid (kept as provenance in source_row).
    obs = obs.sort_values("source_row")
    ref_obs = ref.obs.sort_values("soma_joinid")
    assert np.array_equal(obs.source_row.to_numpy(), ref_obs.soma_joinid.to_numpy())
    for col in ("dataset_id", "cell_type", "donor_id", "tissue_general", "assay"):
        assert list(obs[col]) == [str(v) for v in ref_obs[col]], col

    # Counts: same value for every (cell, gene), genes matched by Ensembl ID.
    var = store.var()
    with store.experiment() as exp:
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
    row_of = {j: i for i, j in enumerate(obs.index)}
    got = sp.csr_matrix((t["soma_data"].to_numpy(), ([row_of[r] for r in t["soma_dim_0"].to_numpy()],
                                                     t["soma_dim_1"].to_numpy())), shape=(len(obs), store.n_genes))
    order = np.argsort(ref.obs["soma_joinid"].to_numpy())
    X = sp.csr_matrix(ref.X)[order]
    col = {f: i for i, f in enumerate(ref.var["feature_id"])}
    expect = X[:, [col[f] for f in var.feature_id]]
    assert (got != expect).nnz == 0
    assert X.sum() == expect.sum()  # no counts lost to gene mapping
    # One manifest source per dataset; re-running adds nothing.
    assert len(store.manifest.complete()) == ref.obs.dataset_id.nunique()
    again = ingest_census(uri, census_uri=census_root, obs_filter=FILTER, primary_only=False, progress=False)
    assert again.added == [] and open_store(uri).n_cells == ref.n_obs


def test_census_filter_matching_nothing_is_refused(census_root, tmp_path, ray_session):
    rep = ingest_census(str(tmp_path / "s"), census_uri=census_root, obs_filter="cell_type == 'no such cell'",
                        progress=False)
    assert not rep.ok and "matched no cells" in rep.failed[0]["error"]


def _add_duplicates(root: str, of_dataset: str, dup_id: str) -> int:
    """Append a copy of one dataset's cells to the mirror as another dataset, not primary (as Census
    lists a cell again in every collection that reuses it). Returns the number of copies."""
    exp_uri = f"{root}/census_data/homo_sapiens"
    with soma.Experiment.open(exp_uri) as exp:
        n0 = exp.obs.count
        obs = exp.obs.read(value_filter=f"dataset_id == '{of_dataset}'").concat()
        x = exp.ms["RNA"].X["raw"].read(coords=(obs["soma_joinid"].to_numpy(),)).tables().concat()
        shape = exp.ms["RNA"].X["raw"].shape
    k = obs.num_rows
    new_id = {int(j): n0 + i for i, j in enumerate(obs["soma_joinid"].to_numpy())}
    obs = obs.set_column(obs.schema.get_field_index("soma_joinid"), "soma_joinid",
                         pa.array(np.arange(n0, n0 + k, dtype=np.int64)))
    obs = obs.set_column(obs.schema.get_field_index("dataset_id"), "dataset_id",
                         pa.array([dup_id] * k, pa.large_string()))
    obs = obs.set_column(obs.schema.get_field_index("is_primary_data"), "is_primary_data",
                         pa.array(np.zeros(k, bool)))
    x = x.set_column(0, "soma_dim_0", pa.array([new_id[int(j)] for j in x["soma_dim_0"].to_numpy()], pa.int64()))
    with soma.Experiment.open(exp_uri, "w") as exp:
        exp.obs.tiledbsoma_resize_soma_joinid_shape(n0 + k)
        exp.ms["RNA"].X["raw"].resize((n0 + k, shape[1]))
    with soma.DataFrame.open(f"{exp_uri}/obs", "w") as df:
        df.write(obs)
    with soma.SparseNDArray.open(f"{exp_uri}/ms/RNA/X/raw", "w") as arr:
        arr.write(x)
    return k


def test_primary_cells_only_by_default_all_cells_on_request(tmp_path, ray_session):
    root = str(tmp_path / "mirror")
    synthesize(root, n_cells=900, n_genes=150, n_datasets=3, seed=11, layout="census", chunk_cells=400)
    with soma.Experiment.open(f"{root}/census_data/homo_sapiens") as exp:
        first = exp.obs.read(column_names=["dataset_id"]).concat()["dataset_id"][0].as_py()
    n_dup = _add_duplicates(root, first, "duplicate-collection")
    # The truth, from the mirror: census joinid -> primary?, and counts per census joinid.
    with soma.Experiment.open(f"{root}/census_data/homo_sapiens") as exp:
        cobs = exp.obs.read(column_names=["soma_joinid", "is_primary_data", "dataset_id"]).concat().to_pandas()
        cx = exp.ms["RNA"].X["raw"].read().tables().concat()
    primary = np.sort(cobs.soma_joinid[cobs.is_primary_data].to_numpy())
    every = np.sort(cobs.soma_joinid.to_numpy())
    assert n_dup > 0 and len(every) == 900 + n_dup
    counts = np.bincount(cx["soma_dim_0"].to_numpy(), weights=cx["soma_data"].to_numpy().astype(np.float64),
                         minlength=len(every))

    uri = str(tmp_path / "store")
    rep = ingest_census(uri, census_uri=root, progress=False)
    assert rep.ok
    assert rep.cells_skipped == {"non_primary": len(every) - len(primary)}
    store = open_store(uri)
    obs = store.obs(["source_row", "dataset_id", "raw_sum"])
    assert np.array_equal(np.sort(obs.source_row.to_numpy()), primary)  # each primary cell, once
    assert "duplicate-collection" not in set(obs.dataset_id)
    assert np.array_equal(obs.raw_sum.to_numpy(), counts[obs.source_row.to_numpy()])
    again = ingest_census(uri, census_uri=root, progress=False)
    assert again.added == [] and open_store(uri).n_cells == len(primary)

    # All cells asked for later: only the non-primary ones are added, none of the primary twice.
    rep = ingest_census(uri, census_uri=root, primary_only=False, progress=False)
    assert rep.ok and rep.cells == len(every) - len(primary) and rep.cells_skipped == {}
    obs = open_store(uri).obs(["source_row", "raw_sum"])
    assert np.array_equal(np.sort(obs.source_row.to_numpy()), every)
    assert obs.raw_sum.sum() == counts.sum()
