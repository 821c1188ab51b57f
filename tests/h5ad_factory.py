"""Small H5AD files written with anndata, for ingest tests (independent of atlasflow's synth)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasflow.store.genes import gene_reference


def reference_genes(n: int, offset: int = 0) -> pd.DataFrame:
    ref = gene_reference("homo_sapiens")
    pc = ref[ref["feature_type"] == "protein_coding"]
    return pc.iloc[offset: offset + n]


def make_counts(n_cells: int, n_genes: int, seed: int, density: float = 0.1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, n_genes, density=density, random_state=seed, format="csr", dtype=np.float32)
    m.data = rng.integers(1, 30, size=m.nnz).astype(np.float32)
    return m


def write_h5ad(path, n_cells: int = 200, n_genes: int = 300, seed: int = 0, by: str = "id", gene_offset: int = 0,
               counts: sp.csr_matrix | None = None, obs_extra: dict | None = None) -> ad.AnnData:
    genes = reference_genes(n_genes, gene_offset)
    X = counts if counts is not None else make_counts(n_cells, n_genes, seed)
    index = genes.index.to_numpy() if by == "id" else genes["feature_name"].to_numpy()
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["B cell", "T cell", "NK cell"], size=X.shape[0])),
        "donor_id": [f"donor{seed}"] * X.shape[0],
    }, index=[f"c{i}" for i in range(X.shape[0])])
    for k, v in (obs_extra or {}).items():
        obs[k] = v
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(index.astype(str))))
    a.write_h5ad(path)
    return a
