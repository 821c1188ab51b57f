"""The Census path: a synthetic store in the Census layout, read through cellxgene_census."""

from __future__ import annotations

import cellxgene_census
import numpy as np
import pytest
import scipy.sparse as sp

from atlasflow.ingest.census import ingest_census, runs_of, split_runs
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
    runs = runs_of(ids)
    assert runs == [(0, 3), (5, 7), (9, 13)]
    pieces = list(split_runs(runs, 4))
    flat = np.concatenate([np.arange(a, b) for _, p in pieces for a, b in p])
    assert np.array_equal(flat, ids)
    assert [off for off, _ in pieces] == [0, 4, 8]


def test_census_slice_equals_get_anndata(census_root, tmp_path, ray_session):
    uri = str(tmp_path / "store")
    report = ingest_census(uri, census_uri=census_root, organism="Homo sapiens", obs_value_filter=FILTER,
                           block_cells=60, progress=False)
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
    again = ingest_census(uri, census_uri=census_root, obs_value_filter=FILTER, progress=False)
    assert again.added == [] and open_store(uri).n_cells == ref.n_obs


def test_census_filter_matching_nothing_is_refused(census_root, tmp_path, ray_session):
    rep = ingest_census(str(tmp_path / "s"), census_uri=census_root, obs_value_filter="cell_type == 'no such cell'",
                        progress=False)
    assert not rep.ok and "matched no cells" in rep.failed[0]["error"]
