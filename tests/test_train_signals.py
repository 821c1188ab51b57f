"""Learning signals on a small REAL store: the vocabulary of expressed genes and the unigram /
per-position baselines, each checked against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.train import signals as S
from atlasflow.train.config import load_preset

loader_mod = pytest.importorskip("atlasflow.loader")

SOURCES = ("scirpy_wu2020_200cells_counts.h5ad", "garnett_zheng2017_pbmc_800cells_counts.h5ad")


@pytest.fixture(scope="module")
def real_store(shared_data, ray_session, tmp_path_factory):
    from atlasflow.ingest import ingest_paths
    from atlasflow.store.stats import compute_gene_stats

    uri = str(tmp_path_factory.mktemp("signals") / "store")
    report = ingest_paths(uri, [str(shared_data / s) for s in SOURCES], progress=False)
    assert report.ok, report.failed
    compute_gene_stats(uri)
    return uri


def _cfg(store, **over):
    return load_preset("cpu-small").with_overrides({"data.store": store, "data.split": "", "data.max_len": 256,
                                                    "data.thin_range": [], "train.baseline_cells": 300, **over})


def _expressed_from_x(store) -> np.ndarray:
    import tiledbsoma as soma

    from atlasflow.store import open_store

    s = open_store(store)
    with soma.Experiment.open(store) as exp:
        tbl = exp.ms["RNA"].X["raw"].read().tables().concat()
    genes = np.unique(tbl["soma_dim_1"].to_numpy()[tbl["soma_data"].to_numpy() != 0])
    return genes[genes < s.n_genes]


def test_vocab_is_exactly_the_expressed_genes(real_store):
    from atlasflow.loader import Vocab
    from atlasflow.store import open_store

    cfg = _cfg(real_store)
    vocab = S.training_vocab(cfg, None)
    expressed = _expressed_from_x(real_store)  # read from X itself, not from the gene stats
    store = open_store(real_store)
    assert 0 < len(expressed) < store.n_genes  # the two sources do not share every gene
    assert vocab.gene_joinids.tolist() == expressed.tolist() and vocab.expressed_only
    var = store.var()
    assert list(vocab.gene_feature_ids) == var.loc[expressed, "feature_id"].astype(str).tolist()
    back = Vocab.from_dict(vocab.to_dict())
    assert back.gene_joinids.tolist() == vocab.gene_joinids.tolist() and back.expressed_only
    full = S.training_vocab(cfg.with_overrides({"data.expressed_only": False}), None)
    assert len(full.gene_joinids) == store.n_genes and not full.expressed_only
    # a version-1 dictionary (checkpoints written before expressed_only) still loads
    d = vocab.to_dict()
    d.pop("expressed_only")
    d["version"] = 1
    assert not Vocab.from_dict(d).expressed_only


def _np_tables(cells, prior, n_keys, V):
    """Independent reimplementation: counts by loops, smoothing grid by held-out likelihood."""
    def counts(sub):
        c, ck = np.zeros(V), np.zeros((n_keys, V))
        for pos, ids in sub:
            for p, g in zip(pos, ids):
                b = p if p < 16 else 16 + int(np.floor(4 * np.log2(p / 16)))
                c[g] += 1
                ck[b, g] += 1
        return c, ck

    def fit(c, ck, a, b):
        uni = (c + a * prior) / (c.sum() + a)
        return uni, (ck + b * uni) / (ck.sum(1, keepdims=True) + b)

    even, odd = cells[0::2], cells[1::2]
    ce, cke = counts(even)
    co, cko = counts(odd)
    grid = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    a = min(grid, key=lambda g: -(co * np.log(np.where(co > 0, fit(ce, cke, g, 1.0)[0], 1))).sum() / co.sum())
    b = min(grid, key=lambda g: -(cko * np.log(np.where(cko > 0, fit(ce, cke, a, g)[1], 1))).sum() / cko.sum())
    c, ck = counts(cells)
    uni, cond = fit(c, ck, a, b)
    return a, b, np.log(uni), np.log(cond)


def test_baselines_match_numpy_on_real_cells(real_store):
    from atlasflow.store import open_store

    cfg = _cfg(real_store)
    vocab = S.training_vocab(cfg, None)
    med, nnz = S.vocab_stats(cfg, vocab, need=True)
    V = 4 + len(vocab.gene_joinids)
    from atlasflow.train.loop import loader_config

    base = S.fit_baselines(cfg, loader_config(cfg, 0, 1), vocab, med, nnz, V)
    # the same sample, read here straight from an identically configured loader
    lcfg = S._side_config(loader_config(cfg, 0, 1), 300)
    loader = S.make_loader_for(cfg, lcfg, vocab, med)
    loader.dataset.set_epoch(0)
    cells = []
    for batch in loader:
        for row in batch["input_ids"].numpy():
            real = np.flatnonzero(row >= 4)
            cells.append((real, row[real]))
    cells = cells[:300]
    stats = open_store(real_store).gene_stats()
    g_nnz = stats["nnz"].to_numpy(np.float64)[vocab.gene_joinids]
    prior = np.zeros(V)
    prior[4:] = g_nnz / g_nnz.sum()
    n_keys = S.n_buckets(256)
    a, b, lu, lc = _np_tables(cells, prior, n_keys, V)
    assert (base.meta["alpha"], base.meta["beta"]) == (a, b)
    assert base.meta["n_cells"] == 300 and base.meta["n_tokens"] == sum(len(c[1]) for c in cells)
    np.testing.assert_allclose(base.uni.numpy()[4:], lu[4:], rtol=1e-5)
    np.testing.assert_allclose(base.cond.numpy()[:, 4:], lc[:, 4:], rtol=1e-5)
    # scoring: sums of -log p of the tokens given
    rng = np.random.default_rng(0)
    pos = torch.as_tensor(rng.integers(1, 255, 50))
    tgt = torch.as_tensor(rng.integers(4, V, 50))
    u, c = base.score(S.position_bucket(pos), tgt)
    bk = [p if p < 16 else 16 + int(np.floor(4 * np.log2(p / 16))) for p in pos.tolist()]
    assert u == pytest.approx(-lu[tgt.numpy()].sum(), rel=1e-5)
    assert c == pytest.approx(-lc[bk, tgt.numpy()].sum(), rel=1e-5)
    roundtrip = S.Baselines.from_state_dict(base.state_dict())
    assert torch.equal(roundtrip.cond, base.cond) and roundtrip.meta == base.meta


def test_position_buckets():
    p = torch.tensor([0, 1, 15, 16, 19, 20, 31, 32, 1023, 4095])
    assert S.position_bucket(p).tolist() == [0, 1, 15, 16, 16, 17, 19, 20, 16 + 4 * 6 - 1, 16 + 4 * 8 - 1]
    assert S.n_buckets(1024) == 40 and S.n_buckets(4096) == 48
