"""The gene-ordered, seeded-sample sequence shared by ``bin``, ``ebin`` and ``value``: ``<cls>`` then
the cell's kept genes in ascending joinid order, at most max_len - 1 of them (a cell with more keeps
those with the smallest ``gene_hash(seed, epoch, soma_joinid, gene_joinid)``), with per-token
quantile bins (scGPT) or x / raw_sum * 1e4 (the others' input). One compiled pass per block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..kernels import _OPTS, _keep_counts, _kth_smallest_hash, _layout, _radix_sort, _splitmix64

HIST_MAX = 65535  # largest count binned through a histogram (beyond it: sort + binary search)


@njit(**_OPTS)
def _hist_edges(v32, m, top, qs, edges, hist, binv):
    """The cell's quantile edges (np.quantile, linear, as in seq_tokens) from a histogram of its
    integral values v32[:m] <= top, and binv[v] = np.digitize(v, edges) for v in 0..top."""
    hist[: top + 1] = 0
    for j in range(m):
        hist[int(v32[j])] += 1
    Q = len(qs)
    v = 0
    below = 0  # values < v
    for q in range(Q):
        vi = (m - 1) * qs[q]
        if vi >= m - 1:
            lo, gam, last = m - 1, 0.0, True
        else:
            f = np.floor(vi)
            lo, gam, last = int(f), vi - f, False
        while below + hist[v] <= lo:  # v = the lo-th smallest value (0-based)
            below += hist[v]
            v += 1
        a = np.float64(v)
        if last:
            edges[q] = a
            continue
        b = a
        if below + hist[v] <= lo + 1:  # the next order statistic is a larger value
            w = v + 1
            while hist[w] == 0:
                w += 1
            b = np.float64(w)
        d = b - a
        edges[q] = b - d * (1 - gam) if gam >= 0.5 else a + d * gam
    e = 0
    for x in range(top + 1):
        while e < Q and edges[e] <= x:
            e += 1
        binv[x] = e


@njit(**_OPTS)
def seq_tokens(indptr, cols, vals, lut, joinids, hash_state, max_len, cls_id, qs, want_bins):
    """scGPT order: <cls> then the kept genes in ascending id order. Returns offsets, ids, and
    either per-token bins (quantile edges at ``qs`` over ALL the cell's kept nonzero values,
    np.digitize) or per-token x / raw_sum * 1e4 (float64; the caller applies log1p). A cell with
    more than max_len - 1 genes keeps those with the smallest ``gene_hash`` (``hash_state`` =
    splitmix64(splitmix64(seed) ^ epoch)), ties in input order (as a stable lexsort)."""
    n = len(indptr) - 1
    raw_sum, cnt = _keep_counts(indptr, cols, vals, lut)
    limit = max_len - 1
    offsets, width = _layout(cnt, limit, 1)
    total = offsets[n]
    ids = np.empty(total, dtype=np.int32)
    bins = np.zeros(total if want_bins else 0, dtype=np.int16)
    norm = np.zeros(0 if want_bins else total, dtype=np.float64)
    nl = len(lut)
    v32 = np.empty(width, dtype=np.float32)
    vbits = v32.view(np.uint32)  # counts >= 0: float32 bits sort like the values
    keys = np.empty(width, dtype=np.uint64)
    tmp = np.empty(width, dtype=np.uint64)
    cnt11 = np.empty(2049, dtype=np.int64)
    Q = len(qs)
    h = np.empty(width, dtype=np.uint64)
    edges = np.empty(Q, dtype=np.float64)
    hist = np.zeros(HIST_MAX + 2 if want_bins else 1, dtype=np.int64)
    binv = np.zeros(HIST_MAX + 1 if want_bins else 1, dtype=np.int16)
    for i in range(n):
        o = offsets[i]
        ids[o] = cls_id
        use_hist = False
        if want_bins:
            m = 0
            top = 0.0
            integral = True
            for k in range(indptr[i], indptr[i + 1]):
                x = vals[k]
                g = cols[k]
                if x > 0 and g < nl and lut[g] >= 0:
                    v32[m] = x
                    m += 1
                    if x > top:
                        top = x
                    if x != np.floor(x):
                        integral = False
            # Counts (small integers): the quantiles come from a histogram and each value's bin
            # from a table, instead of a sort and a binary search per gene (same edges, same bins).
            use_hist = m > 0 and integral and top <= HIST_MAX and top <= 4 * m + 1024
            if use_hist:
                _hist_edges(v32, m, int(top), qs, edges, hist, binv)
            elif m > 0:
                for j in range(m):
                    keys[j] = np.uint64(vbits[j]) << np.uint64(32)
                ks, _ = _radix_sort(keys, tmp, m, cnt11, 32)
                for j in range(m):
                    vbits[j] = np.uint32(ks[j] >> np.uint64(32))
                s = v32[:m]
                for q in range(Q):  # np.quantile(..., method="linear") incl. its _lerp rounding
                    vi = (m - 1) * qs[q]
                    if vi >= m - 1:
                        edges[q] = np.float64(s[m - 1])
                    else:
                        lo = np.floor(vi)
                        gam = vi - lo
                        a = np.float64(s[int(lo)])
                        b = np.float64(s[int(lo) + 1])
                        d = b - a
                        edges[q] = b - d * (1 - gam) if gam >= 0.5 else a + d * gam
        long = cnt[i] > limit
        thr = np.uint64(0)
        at_thr = 0  # how many entries equal to the threshold hash may still be kept
        if long:
            c = _splitmix64(hash_state ^ np.uint64(joinids[i]))
            m = 0
            for k in range(indptr[i], indptr[i + 1]):
                g = cols[k]
                if vals[k] > 0 and g < nl and lut[g] >= 0:
                    h[m] = _splitmix64(c ^ np.uint64(g))
                    m += 1
            thr, at_thr = _kth_smallest_hash(h, m, limit, cnt11, tmp)
            m = 0
        j = 0
        for k in range(indptr[i], indptr[i + 1]):
            x = vals[k]
            g = cols[k]
            if not (x > 0 and g < nl and lut[g] >= 0):
                continue
            if long:
                hk = h[m]
                m += 1
                if hk > thr:
                    continue
                if hk == thr:
                    if at_thr == 0:
                        continue
                    at_thr -= 1
            if j >= limit:  # unreachable (the sample keeps exactly limit); guards the bounds
                break
            ids[o + 1 + j] = lut[g]
            if use_hist:
                bins[o + 1 + j] = binv[int(x)]
            elif want_bins:
                bins[o + 1 + j] = np.searchsorted(edges, np.float64(x), side="right")  # np.digitize, right=False
            else:
                norm[o + 1 + j] = np.float64(x) / raw_sum[i] * 1e4
            j += 1
    return offsets, ids, bins, norm, cnt


def warm_sequence(want_bins: bool) -> None:
    """Compile ``seq_tokens`` for the int and float count inputs (bin: with quantile bins; value,
    ebin: with the normalised values)."""
    from .. import kernels as K
    from ..vocab import CLS

    ip, cols, lut, vals_pair = K.sample_inputs()
    for vals in vals_pair:
        seq_tokens(ip, cols, vals, lut, np.zeros(1, dtype=np.int64), np.uint64(1), 10, CLS,
                   np.linspace(0, 1, 50), want_bins)
