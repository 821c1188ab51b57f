"""The loader reads a Census mirror in place (CensusView), checked against cellxgene_census.get_anndata."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from atlasflow.loader import make_loader
from atlasflow.store.query import QueryConfig

FLT = "tissue_general == 'blood' or cell_type == 'B cell'"


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> str:
    from atlasflow.ingest.synth import synthesize

    root = tmp_path_factory.mktemp("census_loader") / "census"
    synthesize(str(root), 300, 120, 3, 5, layout="census")
    return str(root)


def test_value_tokens_over_a_census_mirror_equal_get_anndata(census):
    import cellxgene_census

    from atlasflow.loader import LoaderConfig
    from atlasflow.loader.vocab import N_SPECIAL

    with cellxgene_census.open_soma(uri=census) as c:
        ref = cellxgene_census.get_anndata(c, "Homo sapiens", obs_value_filter=FLT,
                                           obs_column_names=["soma_joinid", "cell_type"])
    X = sp.csr_matrix(ref.X)
    row_of = {int(j): i for i, j in enumerate(ref.obs["soma_joinid"])}
    var_joinid = ref.var["soma_joinid"].to_numpy()
    assert 0 < len(row_of) < 300
    cfg = QueryConfig(source="census", uri=census, organism="Homo sapiens", obs_filter=FLT)
    loader = make_loader(cfg, LoaderConfig(tokenizer="value", max_len=512, batch_size=8, shuffle=False,
                                         remainder="pad", obs_columns=("cell_type",)))
    cats = loader.dataset.obs_categories["cell_type"]
    seen = set()
    for b in loader:
        for r, j in enumerate(b["soma_joinid"].tolist()):
            i = row_of[j]
            x = X[i].toarray().ravel()
            genes = np.flatnonzero(x)  # var positions, ascending joinid
            n = int(b["lengths"][r])
            ids = b["input_ids"][r, :n].numpy()
            got_genes = ids[ids >= N_SPECIAL] - N_SPECIAL
            assert np.array_equal(got_genes, var_joinid[genes]), j
            want = np.log1p(x[genes] / x.sum() * 1e4).astype(np.float32)
            np.testing.assert_allclose(b["values"][r, :n].numpy()[ids >= N_SPECIAL], want, rtol=1e-6)
            assert cats[int(b["obs.cell_type"][r])] == ref.obs["cell_type"].iloc[i]
            seen.add(j)
    assert seen == set(row_of)  # every matching cell, none other


def test_census_loader_refusals_name_the_field(census):
    from atlasflow.loader import LoaderConfig

    cfg = QueryConfig(source="census", uri=census, organism="Homo sapiens", obs_filter=FLT)
    with pytest.raises(ValueError, match="LoaderConfig.tokenizer: 'rank' needs per-gene medians"):
        make_loader(cfg, LoaderConfig(tokenizer="rank"))
    with pytest.raises(ValueError, match="QueryConfig.uri: a loader over Census reads a local mirror"):
        make_loader(QueryConfig(source="census", census_version="stable"), LoaderConfig(tokenizer="bin"))
    with pytest.raises(ValueError, match="QueryConfig.genes"):
        make_loader(QueryConfig(source="census", uri=census, genes=("ENSG00000000003",)), LoaderConfig(tokenizer="bin"))
    with pytest.raises(ValueError, match="query matches no cells"):
        make_loader(QueryConfig(source="census", uri=census, obs_filter="cell_type == 'no such type'"),
                  LoaderConfig(tokenizer="bin"))
    from atlasflow.store.census_view import CensusView

    with pytest.raises(ValueError, match="no organism 'mus_musculus'"):
        CensusView(census, "Mus musculus")
    from atlasflow.store.view import StoreView, open_view

    view = open_view(census, "Homo sapiens")  # the mirror behind the same protocol as a store
    assert isinstance(view, CensusView) and isinstance(view, StoreView)
