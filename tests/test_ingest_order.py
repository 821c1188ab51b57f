"""A store's layout follows the order the sources were given, not the order their probes finish:
the same files ingested again give the same gene and cell joinids (so the same vocabulary and the
same seeded epoch order)."""

from __future__ import annotations

import numpy as np
import tiledbsoma as soma

from atlasflow.ingest import ingest_paths
from atlasflow.store import open_store
from h5ad_factory import write_h5ad


def _layout(uri):
    s = open_store(uri)
    starts = {e.name: (e.joinid_start, e.joinid_stop) for e in s.manifest.sources.values()}
    genes = s.var().sort_index()["feature_id"].tolist()
    with soma.Experiment.open(uri) as exp:
        X = exp.ms["RNA"].X["raw"].read().tables().concat()
    return starts, genes, X


def test_layout_follows_the_given_order_whatever_probe_finishes_first(tmp_path, ray_session):
    # the first file's probe (a full validation pass over 1.5M nonzeros) finishes well after the second's
    big = write_h5ad(tmp_path / "big.h5ad", n_cells=50_000, n_genes=300, seed=1, gene_offset=0)
    small = write_h5ad(tmp_path / "small.h5ad", n_cells=30, n_genes=300, seed=2, gene_offset=200)
    files = {"big.h5ad": big, "small.h5ad": small}
    layouts = {}
    for run, order in enumerate((["big.h5ad", "small.h5ad"], ["small.h5ad", "big.h5ad"], ["big.h5ad", "small.h5ad"])):
        uri = str(tmp_path / f"store{run}")
        report = ingest_paths(uri, [str(tmp_path / f) for f in order], progress=False)
        assert not report.failed and len(report.added) == 2
        starts, genes, X = _layout(uri)
        first, second = (files[f] for f in order)
        # cells: the first file given holds joinids 0..n-1, the second the next ones
        assert starts[order[0]] == (0, first.n_obs) and starts[order[1]] == (first.n_obs, first.n_obs + second.n_obs)
        # genes: the first file's genes were registered first, then the second's new ones
        assert set(genes[:first.n_vars]) == set(first.var_names)
        assert set(genes) == set(first.var_names) | set(second.var_names)
        layouts[run] = (starts, genes, X)
    # the same files in the same order: the same store, joinid for joinid
    (s0, g0, x0), (s2, g2, x2) = layouts[0], layouts[2]
    assert s0 == s2 and g0 == g2
    key = lambda t: np.lexsort((t["soma_dim_1"].to_numpy(), t["soma_dim_0"].to_numpy()))  # noqa: E731
    k0, k2 = key(x0), key(x2)
    for col in ("soma_dim_0", "soma_dim_1", "soma_data"):
        assert np.array_equal(x0[col].to_numpy()[k0], x2[col].to_numpy()[k2])
