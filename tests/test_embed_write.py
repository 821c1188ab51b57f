"""Embedding outputs are appended block by block and read back exactly (anndata, pyarrow)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from test_embed_eval import D, make_checkpoint, make_store


def _obs(a: int, b: int) -> pd.DataFrame:
    j = np.arange(a, b)
    df = pd.DataFrame({"cell_type": pd.Categorical([f"t{k % 3}" for k in j]), "raw_sum": j * 1.5,
                       "nnz": j.astype(np.int64), "is_primary_data": j % 2 == 0,
                       "donor": pd.array([k if k % 4 else None for k in j], dtype="Int64")},
                      index=pd.Index(j.astype(str), name="soma_joinid"))
    return df


def test_h5ad_and_parquet_writers_grow_per_block_and_read_back(tmp_path):
    from atlasflow.train.tasks.embed_write import OBSM_KEY, H5adEmbeddingWriter, ParquetEmbeddingWriter

    rng = np.random.default_rng(0)
    bounds = [0, 7, 7, 20, 33]  # includes an empty block
    embs = [rng.normal(size=(b - a, 5)).astype(np.float32) for a, b in zip(bounds, bounds[1:])]
    h5 = H5adEmbeddingWriter(str(tmp_path / "e.h5ad"), 5, {"atlasflow_embed": {"format_version": 1}})
    pw = ParquetEmbeddingWriter(str(tmp_path / "e.parquet"), {"pooling": "cls"})
    for (a, b), e in zip(zip(bounds, bounds[1:]), embs):
        h5.write(_obs(a, b), e)
        pw.write(np.arange(a, b), e)
        assert h5.emb.shape == (b, 5) and h5.n_rows == b  # on disk now, not held until close
    with pytest.raises(ValueError, match="obs columns changed"):
        h5.write(_obs(33, 34).drop(columns=["nnz"]), embs[0][:1])
    h5.close()
    pw.close()

    a = ad.read_h5ad(tmp_path / "e.h5ad")
    want = pd.concat([_obs(x, y) for x, y in zip(bounds, bounds[1:])])
    assert a.n_obs == 33 and a.n_vars == 0 and a.uns["atlasflow_embed"]["format_version"] == 1
    np.testing.assert_array_equal(a.obsm[OBSM_KEY], np.concatenate(embs))
    assert a.obs.index.tolist() == want.index.tolist() and a.obs.index.name == "soma_joinid"
    assert a.obs["cell_type"].astype(str).tolist() == want["cell_type"].astype(str).tolist()
    np.testing.assert_array_equal(a.obs["raw_sum"].to_numpy(), want["raw_sum"].to_numpy())
    assert a.obs["nnz"].dtype == np.int64 and a.obs["is_primary_data"].dtype == bool
    assert a.obs["donor"].astype(str).tolist() == want["donor"].astype(str).tolist()

    f = pq.ParquetFile(tmp_path / "e.parquet")
    assert f.metadata.num_row_groups == 3  # one per non-empty block
    assert f.schema_arrow.metadata[b"atlasflow.embed_format_version"] == b"1"
    t = f.read()
    assert t["soma_joinid"].to_pylist() == list(range(33))
    np.testing.assert_array_equal(np.stack(t["embedding"].to_numpy(zero_copy_only=False)), np.concatenate(embs))


def test_embed_hands_each_block_to_the_writers(tmp_path, monkeypatch):
    from atlasflow.train.tasks import embed_write
    from atlasflow.train.tasks.embed import EmbedConfig, embed
    from atlasflow.train.tasks.pretrained import PretrainedModel, iter_input, tokenize

    store = make_store(tmp_path / "store", seed=7, n_cells=130, n_genes=80, n_datasets=2)
    ckpt = make_checkpoint(tmp_path / "ckpt", store)
    sizes = []
    orig = embed_write.H5adEmbeddingWriter.write
    monkeypatch.setattr(embed_write.H5adEmbeddingWriter, "write",
                        lambda self, obs, e: (sizes.append(len(e)), orig(self, obs, e))[1])
    out = embed(ckpt, store, out_h5ad=str(tmp_path / "e.h5ad"), out_parquet=str(tmp_path / "e.parquet"),
                cfg=EmbedConfig(block_cells=50, batch_size=16), obs_columns=("cell_type", "nnz"))
    assert out["n_cells"] == 130 and sizes == [50, 50, 30]
    assert pq.ParquetFile(tmp_path / "e.parquet").metadata.num_row_groups == 3
    # the same cells embedded in memory, in one piece
    model = PretrainedModel(ckpt)
    ids, obs, X, fids = next(iter_input(store, 1000, ("cell_type", "nnz")))
    want = model.embed_block(tokenize(model.tokenizer_for(fids)[0], X, ids), EmbedConfig(batch_size=16))
    a = ad.read_h5ad(tmp_path / "e.h5ad")
    assert a.obsm["X_atlasflow"].shape == (130, D)
    np.testing.assert_allclose(a.obsm["X_atlasflow"], want, rtol=1e-5, atol=1e-6)
    assert a.obs.index.astype(int).tolist() == ids.tolist()
    assert a.obs["cell_type"].tolist() == obs["cell_type"].astype(str).tolist()
    np.testing.assert_array_equal(a.obs["nnz"].to_numpy(), obs["nnz"].to_numpy())
