"""Depth augmentation: seeded binomial thinning of a CSR block of raw counts, before tokenization.

scFoundation's read-depth-aware pretraining (Hao et al., Nature Methods 2024; biomap-research/scFoundation)
down-samples each training cell's total count with binomial sampling at a random rate so the model sees
the same cell at many depths; here a cell keeps each of its UMIs independently with probability ``r``,
i.e. every count x becomes k ~ Binomial(x, r), and the tokenizer then sees the thinned cell only
(its raw sum, ranks, bins and values; genes thinned to 0 disappear).

Exact definition (reproduced one cell at a time with scipy in tests/test_loader_thinning.py):

- ``h(g) = gene_hash(seed ^ THIN_SALT, epoch, soma_joinid, g)`` (``tokenize.gene_hash``: splitmix64 of
  seed, epoch, cell, gene), ``unit(h) = ((h >> 12) + 0.5) / 2**52`` in (0, 1).
- the cell is thinned iff ``unit(h(2**64 - 1)) < thin_prob``;
- its keep-rate ``r = exp(log(lo) + unit(h(2**64 - 2)) * (log(hi) - log(lo)))`` (log-uniform in [lo, hi];
  exactly ``lo`` when lo == hi); a rate of 1 leaves the cell as it is;
- each stored count x of gene g becomes the smallest k with ``BinomCDF(k; x, r) >= unit(h(g))``
  (inverse-CDF sampling on a per-entry uniform; ``g`` is the column index the tokenizer receives:
  the store gene joinid in the loader).

So a cell's thinned counts depend only on (seed, epoch, cell): not on the batch, worker, rank or
resume position it lands in; they change per epoch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .kernels import _OPTS, _splitmix64

THIN_SALT = 0x7468696E5F646570  # "thin_dep": thinning draws never reuse the truncation sample's hashes
_APPLY_GENE = np.uint64(0xFFFFFFFFFFFFFFFF)  # gene slots no real gene (< 2**32) can take
_RATE_GENE = np.uint64(0xFFFFFFFFFFFFFFFE)


def thin_state(seed: int, epoch: int) -> np.uint64:
    """splitmix64(splitmix64(seed ^ THIN_SALT) ^ epoch): the per-epoch key of every thinning draw."""
    m = (1 << 64) - 1
    s = np.uint64((int(seed) ^ THIN_SALT) & m)
    # np.uint64 both ways: numba returns a Python int, which it would type as int64 when below 2**63
    return np.uint64(_splitmix64(np.uint64(_splitmix64(s)) ^ np.uint64(int(epoch) & m)))


@njit(**_OPTS)
def _unit(h):  # via int64: exact (52 bits) and a faster conversion than from uint64
    return (np.float64(np.int64(h >> np.uint64(12))) + 0.5) * 2.220446049250313e-16  # 2**-52


@njit(**_OPTS)
def _cell_rate(state, joinid, lo, hi, prob):
    """(cell key, keep-rate): rate 1.0 for a cell left at its natural depth."""
    c = _splitmix64(state ^ np.uint64(joinid))
    if not _unit(_splitmix64(c ^ _APPLY_GENE)) < prob:
        return c, 1.0
    if lo == hi:
        return c, lo
    return c, math.exp(math.log(lo) + _unit(_splitmix64(c ^ _RATE_GENE)) * (math.log(hi) - math.log(lo)))


@njit(**_OPTS)
def _binom_ppf(x, r, u, w):
    """Smallest k with CDF(k; x, r) >= u. The pmf is built relative to its mode (weight 1) by the
    ratio recurrence over mode +- 12 sd + 12 (the mass outside is < 1e-30 of the total), so it never
    under- or overflows at any depth or rate; ``w`` is scratch for the window's weights."""
    if x == 1:
        return 1 if u > 1.0 - r else 0
    q = 1.0 - r
    if x <= 32:  # short walk from the nearer end, pmf(0) = q**x or pmf(x) = r**x (most counts are small)
        if u <= 0.5:
            p = q ** x
            if p > 1e-280:
                t = u
                acc = p
                k = 0
                while acc < t and k < x:
                    p = p * (x - k) / (k + 1) * (r / q)
                    k += 1
                    acc += p
                return k
        else:
            p = r ** x
            if p > 1e-280:
                s = 1.0 - u
                tail = 0.0
                k = x
                while k > 0 and tail + p <= s:
                    tail += p
                    p = p * k / ((x - k + 1) * (r / q))
                    k -= 1
                return k
    mode = min(x, int((x + 1) * r))
    half = int(12.0 * math.sqrt(x * r * q)) + 12
    lo = max(0, mode - half)
    hi = min(x, mode + half)
    rq = r / q
    w[mode - lo] = 1.0
    for k in range(mode, lo, -1):  # pmf(k - 1) = pmf(k) * k / (x - k + 1) * q / r
        w[k - 1 - lo] = w[k - lo] * k / ((x - k + 1) * rq)
    for k in range(mode, hi):  # pmf(k + 1) = pmf(k) * (x - k) / (k + 1) * r / q
        w[k + 1 - lo] = w[k - lo] * (x - k) / (k + 1) * rq
    z = 0.0
    for j in range(hi - lo + 1):
        z += w[j]
    if u > 0.5:  # sum the upper tail instead: accurate where 1 - CDF is tiny (1 - u is exact here)
        s = (1.0 - u) * z
        tail = 0.0
        k = hi
        while k > lo and tail + w[k - lo] <= s:  # CDF(k - 1) = 1 - (tail + pmf(k)) >= u still
            tail += w[k - lo]
            k -= 1
        return k
    t = u * z
    acc = 0.0
    for j in range(hi - lo + 1):
        acc += w[j]
        if acc >= t:
            return lo + j
    return hi  # rounding left the running sum a hair below u * z


@njit(**_OPTS)
def thin_kernel(indptr, cols, vals, joinids, state, lo, hi, prob):
    """-> (indptr, cols, vals, rates, bad): the thinned block, zeros dropped (one pass, compacting),
    each cell's keep-rate (1.0 = left as is), and the first entry holding a non-integral or
    negative count (-1 if none; the block is then not thinned)."""
    n = len(indptr) - 1
    out_ip = np.zeros(n + 1, dtype=np.int64)
    out_c = np.empty(len(cols), dtype=cols.dtype)
    out_v = np.empty(len(vals), dtype=vals.dtype)
    rates = np.ones(n, dtype=np.float64)
    w = np.empty(256, dtype=np.float64)  # grown for deep entries (the pmf window is ~12 sd wide)
    o = 0
    for i in range(n):
        c, r = _cell_rate(state, joinids[i], lo, hi, prob)
        rates[i] = r
        for k in range(indptr[i], indptr[i + 1]):
            v = vals[k]
            x = int(v)
            if x != v or x < 0:
                return out_ip, out_c[:0], out_v[:0], rates, k
            if x == 0:
                continue
            if r < 1.0:
                if x > 32:
                    need = 2 * (int(6.0 * math.sqrt(x)) + 12) + 3
                    if need > len(w):
                        w = np.empty(need, dtype=np.float64)
                x = _binom_ppf(x, r, _unit(_splitmix64(c ^ np.uint64(cols[k]))), w)
                if x == 0:
                    continue
            out_c[o] = cols[k]
            out_v[o] = x
            o += 1
        out_ip[i + 1] = o
    return out_ip, out_c[:o], out_v[:o], rates, -1


def thin_block(indptr, cols, vals, joinids, *, seed: int, epoch: int, thin_range: tuple[float, float],
               thin_prob: float = 0.5):
    """Thinned (indptr int64, cols, vals float32, keep-rate per cell) of a CSR block of raw counts.
    ``cols`` must be non-negative gene indices (the store joinids in the loader)."""
    lo, hi = (float(v) for v in thin_range)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"thin_range: need 0 < lo <= hi <= 1 (keep-rates), got {thin_range!r}")
    if not 0.0 <= float(thin_prob) <= 1.0:
        raise ValueError(f"thin_prob: a probability in [0, 1], got {thin_prob!r}")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int32)
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    joinids = np.ascontiguousarray(joinids, dtype=np.int64)
    state = thin_state(seed, epoch)
    ip, c, v, rates, bad = thin_kernel(indptr, cols, vals, joinids, state, lo, hi,
                                       float(thin_prob))
    if bad >= 0:
        cell = int(np.searchsorted(indptr, bad, side="right")) - 1
        raise ValueError(f"depth augmentation (LoaderConfig.thin_range): needs raw integer counts, but cell "
                         f"soma_joinid {int(joinids[cell])} holds {float(vals[bad])!r} for gene {int(cols[bad])} "
                         f"(normalized data? thin only raw counts, or set thin_range=None)")
    return ip, c, v, rates


def warm() -> None:
    """Compile (or load from the cache) the thinning kernel for the arrays the loader passes."""
    ip, cols, jid = np.array([0, 2], dtype=np.int64), np.array([0, 1], dtype=np.int32), np.zeros(1, dtype=np.int64)
    for writable in (True, False):  # Arrow hands over read-only counts: a separate numba signature
        vals = np.array([1, 5], dtype=np.float32)
        vals.setflags(write=writable)
        thin_kernel(ip, cols, vals, jid, np.uint64(1), 0.5, 1.0, 1.0)
