"""Depth augmentation: thinned counts equal an independent one-cell-at-a-time scipy computation, the
tokens of every tokenizer equal the reference tokenizers applied to those cells, the depth follows the
keep-rate, and a cell's thinned tokens do not depend on workers, ranks or resume."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import binom, kstest

from atlasflow.loader import CLS, LoaderConfig, Tokenizer, make_loader
from atlasflow.loader.thinning import THIN_SALT, thin_block

from test_loader_fixtures import real_store, synth_store
from test_loader_tokens import independent_medians, ref_bin, ref_rank, ref_value

M64 = (1 << 64) - 1


def sm64(z: int) -> int:  # splitmix64 on Python ints (independent of the numpy / numba versions)
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def unit(h: int) -> float:
    return ((h >> 12) + 0.5) / 2.0 ** 52


def ref_thin_cell(x: np.ndarray, jid: int, seed: int, epoch: int, lo: float, hi: float, prob: float):
    """(thinned dense row, keep-rate) per the definition in loader/thinning.py; scipy's inverse CDF
    (ppf, or isf on the upper half where 1 - CDF is below float resolution)."""
    c = sm64(sm64(sm64((seed ^ THIN_SALT) & M64) ^ epoch) ^ jid)
    if not unit(sm64(c ^ M64)) < prob:
        return x.copy(), 1.0
    r = lo if lo == hi else math.exp(math.log(lo) + unit(sm64(c ^ (M64 - 1))) * (math.log(hi) - math.log(lo)))
    out = np.zeros_like(x)
    if r >= 1.0:
        return x.copy(), r
    g = np.flatnonzero(x)
    u = np.array([unit(sm64(c ^ int(k))) for k in g])
    n = x[g].astype(np.int64)
    with np.errstate(all="ignore"):  # each branch is evaluated on every entry; np.where keeps one
        out[g] = np.where(u <= 0.5, binom.ppf(u, n, r), binom.isf(1.0 - u, n, r))
    return out, r


def random_counts(n_cells: int, n_genes: int, seed: int) -> np.ndarray:
    """Mostly 1-3 UMI counts with a heavy tail up to ~1e4, like real cells."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_cells, n_genes)) < 0.3) * np.floor(rng.pareto(1.2, (n_cells, n_genes)) + 1)
    dense = np.minimum(dense, 20000)
    dense[:, 0] += 1  # no empty cell
    return dense


@pytest.mark.parametrize("seed,epoch", [(7, 3), (4, 1)])  # the (4, 1) key is below 2**63 (numba int64 trap)
def test_thinned_counts_equal_scipy_reference(seed, epoch):
    dense = random_counts(300, 120, 1)
    dense[5, 3] = 15000  # a deep entry: the pmf window and both tails are exercised
    X = sp.csr_matrix(dense)
    jids = np.arange(1000, 1300, dtype=np.int64)
    lo, hi, prob = 0.02, 0.9, 0.8
    ip, cols, vals, rates = thin_block(X.indptr, X.indices, X.data, jids, seed=seed, epoch=epoch,
                                       thin_range=(lo, hi), thin_prob=prob)
    got = sp.csr_matrix((vals, cols, ip), shape=dense.shape).toarray()
    assert (vals > 0).all()  # zeros are dropped from the CSR
    n_thinned = 0
    for i in range(len(dense)):
        want, r = ref_thin_cell(dense[i], int(jids[i]), seed, epoch, lo, hi, prob)
        assert np.array_equal(got[i], want), i
        assert rates[i] == r, i
        n_thinned += r < 1
    assert 200 < n_thinned < 290  # ~80% of the cells


@pytest.mark.parametrize("kind,max_len", [("rank", 2048), ("rank", 64), ("bin", 10_000), ("value", 10_000)])
def test_tokens_of_thinned_cells_equal_reference(tmp_path_factory, kind, max_len):
    uri, dense, _ = real_store(tmp_path_factory)
    med = independent_medians(dense)  # medians of the store (thinning never changes them)
    seed, epoch, lo, hi, prob = 4, 1, 0.05, 0.5, 0.7
    loader = make_loader(uri, LoaderConfig(tokenizer=kind, max_len=max_len, batch_size=20, window_cells=80,
                                           read_cells=40, chunk_cells=16, seed=seed, thin_range=(lo, hi),
                                           thin_prob=prob))
    loader.dataset.set_epoch(epoch)
    seen = shallower = 0
    for b in loader:
        for i, jid in enumerate(b["soma_joinid"].tolist()):
            n = int(b["lengths"][i])
            ids = b["input_ids"][i, :n].numpy()
            x, r = ref_thin_cell(dense[jid], jid, seed, epoch, lo, hi, prob)
            if kind == "rank":
                assert np.array_equal(ids, ref_rank(x, med, max_len)), jid
            elif not x.any():
                assert ids.tolist() == [CLS], jid
            elif kind == "bin":
                want_ids, want_bins = ref_bin(x, 51)
                assert np.array_equal(ids, want_ids) and np.array_equal(b["bins"][i, :n].numpy(), want_bins), jid
            else:
                want_ids, want_vals = ref_value(x)
                assert np.array_equal(ids, want_ids), jid
                assert np.array_equal(b["values"][i, :n].numpy(), want_vals.astype(np.float32)), jid
            seen += 1
            shallower += r < 1
    assert seen == len(dense) - len(dense) % 20 and shallower > seen // 2


def test_depth_follows_the_keep_rate():
    """Cell totals ~ Binomial(total, r): their z-scores have mean 0 and sd 1; the thinned share is
    thin_prob; log r is uniform on [log lo, log hi]."""
    dense = random_counts(3000, 60, 2)
    X = sp.csr_matrix(dense)
    lo, hi, prob = 0.05, 1.0, 0.5
    ip, cols, vals, rates = thin_block(X.indptr, X.indices, X.data, np.arange(3000), seed=1, epoch=0,
                                       thin_range=(lo, hi), thin_prob=prob)
    tot = dense.sum(1)
    kept = np.bincount(np.repeat(np.arange(3000), np.diff(ip)), weights=vals.astype(np.float64), minlength=3000)
    th = rates < 1
    assert abs(th.mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / 3000)
    assert np.array_equal(kept[~th], tot[~th])  # the others stay at natural depth
    r, t, k = rates[th], tot[th], kept[th]
    z = (k - r * t) / np.sqrt(t * r * (1 - r))
    m = len(z)
    assert abs(z.mean()) < 4 / math.sqrt(m), z.mean()  # 4 standard errors
    assert abs(z.std() - 1) < 0.08, z.std()
    assert abs(k.sum() - (r * t).sum()) < 4 * math.sqrt((t * r * (1 - r)).sum())
    assert kstest((np.log(r) - math.log(lo)) / (math.log(hi) - math.log(lo)), "uniform").pvalue > 1e-3


def test_tokenizer_on_a_scipy_block_and_epochs(tmp_path_factory):
    """The in-memory path (Tokenizer on a scipy CSR, as train/embed.py calls it): thinning per epoch."""
    dense = random_counts(50, 30, 3)
    X = sp.csr_matrix(dense)
    lut = np.arange(4, 34, dtype=np.int32)
    tok = Tokenizer("value", 64, 51, lut, None, 9, thin_range=(0.1, 0.6), thin_prob=1.0)
    jids = np.arange(50)
    for epoch in (0, 1):
        blk = tok(X.indptr, X.indices.astype(np.int64), X.data, jids, epoch)
        for i in range(50):
            x, _ = ref_thin_cell(dense[i], i, 9, epoch, 0.1, 0.6, 1.0)
            ids, vals = ref_value(x)
            s = slice(blk.offsets[i], blk.offsets[i + 1])
            assert np.array_equal(blk.ids[s], ids) and np.array_equal(blk.values[s], vals.astype(np.float32))
    a, b = (tok(X.indptr, X.indices, X.data, jids, e) for e in (0, 1))
    assert not np.array_equal(a.offsets, b.offsets)  # a new depth per epoch
    off = Tokenizer("value", 64, 51, lut, None, 9)(X.indptr, X.indices, X.data, jids, 0)
    same_rate = Tokenizer("value", 64, 51, lut, None, 9, thin_range=(1.0, 1.0), thin_prob=1.0)(
        X.indptr, X.indices, X.data, jids, 0)
    assert np.array_equal(off.ids, same_rate.ids) and np.array_equal(off.values, same_rate.values)


def test_bad_input_and_config_are_refused():
    X = sp.csr_matrix(np.array([[1.0, 0.5], [2.0, 0.0]]))
    with pytest.raises(ValueError, match=r"thin_range.*soma_joinid 10 .*0\.5"):
        thin_block(X.indptr, X.indices, X.data, np.array([10, 11]), seed=0, epoch=0, thin_range=(0.5, 0.5),
                   thin_prob=1.0)
    for kw, name in [({"thin_range": (0.0, 0.5)}, "thin_range"), ({"thin_range": (0.6, 0.5)}, "thin_range"),
                     ({"thin_range": (0.5, 1.5)}, "thin_range"), ({"thin_range": 0.5}, "thin_range"),
                     ({"thin_prob": 1.2}, "thin_prob"), ({"thin_prob": "half"}, "thin_prob")]:
        with pytest.raises(ValueError, match=f"LoaderConfig.{name}"):
            LoaderConfig(**kw)


SYN = dict(tokenizer="value", batch_size=16, chunk_cells=8, read_cells=64, window_cells=128, seed=3,
           thin_range=(0.1, 0.8), thin_prob=0.6)


def cells(batches) -> dict[int, tuple]:
    out = {}
    for b in batches:
        for i, jid in enumerate(b["soma_joinid"].tolist()):
            n = int(b["lengths"][i])
            out[jid] = (tuple(b["input_ids"][i, :n].tolist()), tuple(b["values"][i, :n].tolist()))
    return out


def test_same_cell_same_thinned_tokens_across_workers_ranks_and_resume(tmp_path_factory):
    uri = synth_store(tmp_path_factory)

    def epoch_cells(world, workers, epoch=1):
        got = {}
        for rank in range(world):
            loader = make_loader(uri, LoaderConfig(**SYN, num_workers=workers, rank=rank, world_size=world))
            loader.dataset.set_epoch(epoch)
            got.update(cells(loader))
        return got

    one = epoch_cells(1, 0)
    assert len(one) == 1280
    spread = epoch_cells(2, 2)
    assert spread == one
    natural = make_loader(uri, LoaderConfig(**{**SYN, "thin_range": None}, rank=0, world_size=1))
    natural.dataset.set_epoch(1)
    assert sum(t != one[j] for j, t in cells(natural).items()) > 500  # ~60% of the cells are thinned
    other_epoch = epoch_cells(1, 0, epoch=2)
    assert sum(other_epoch[j] != one[j] for j in one) > 500  # a new depth per epoch

    cfg = LoaderConfig(**SYN, rank=1, world_size=2)
    a = make_loader(uri, cfg)
    a.dataset.set_epoch(1)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = pickle.dumps(a.state_dict())
    expected = list(itertools.islice(it, 10))
    b = make_loader(uri, cfg)
    b.load_state_dict(pickle.loads(state))
    got = list(itertools.islice(iter(b), 10))
    assert len(got) == 10
    for x, y in zip(expected, got):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    assert all(one[j] == t for j, t in cells(got).items())
