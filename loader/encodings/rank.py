"""Geneformer rank encoding (Theodoris et al., Nature 2023).

For cell counts x with raw_sum = sum over ALL store genes and the store's per-gene nonzero median m_g
(of x_g / raw_sum * 1e4 over the cells expressing g): y_g = x_g / raw_sum * 1e4 / m_g in float64, in
that order. Tokens: ``<cls>``, the genes by y descending (ties: smaller gene joinid first), at most
max_len - 2 of them (the highest-ranked; nothing is sampled), ``<eos>``. Genes outside the vocabulary
take no slot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import kernels as K
from ..kernels import _OPTS, _keep_counts, _layout, _radix_sort
from ..tokenize import TokenBlock
from ..vocab import CLS, EOS
from .base import Encoding


@njit(**_OPTS)
def _exact_ties(ks, y, low):
    """Runs of keys equal from bit ``low`` up: order by float64 y descending, then position
    (insertion sort; such runs are short, and already in position order where y is equal)."""
    m = len(ks)
    sh = np.uint64(low)
    a = 0
    while a < m:
        b = a + 1
        hi = ks[a] >> sh
        while b < m and (ks[b] >> sh) == hi:
            b += 1
        if b - a > 1:
            for p in range(a + 1, b):
                cur = ks[p]
                yc = y[cur & np.uint64(0xFFFFFFFF)]
                q = p - 1
                while q >= a:
                    yq = y[ks[q] & np.uint64(0xFFFFFFFF)]
                    if yq < yc or (yq == yc and ks[q] > cur):
                        ks[q + 1] = ks[q]
                        q -= 1
                    else:
                        break
                ks[q + 1] = cur
        a = b


@njit(**_OPTS)
def rank_tokens(indptr, cols, vals, lut, medians, max_len, cls_id, eos_id, want_values=False):
    """Geneformer rank: y = x / raw_sum * 1e4 / median, descending, ties by ascending gene id.
    Returns offsets, ids and, with ``want_values``, each token's x / raw_sum * 1e4 (float64, 0 at
    <cls> / <eos>; the caller applies log1p), else an empty array."""
    n = len(indptr) - 1
    raw_sum, cnt = _keep_counts(indptr, cols, vals, lut)
    limit = max_len - 2
    offsets, width = _layout(cnt, limit, 2)
    ids = np.empty(offsets[n], dtype=np.int32)
    norm = np.zeros(offsets[n] if want_values else 0, dtype=np.float64)
    nl = len(lut)
    y = np.empty(width, dtype=np.float64)
    xv = np.empty(width if want_values else 0, dtype=np.float64)
    y32 = np.empty(width, dtype=np.float32)
    u32 = y32.view(np.uint32)
    tok = np.empty(width, dtype=np.int32)
    keys = np.empty(width, dtype=np.uint64)
    tmp = np.empty(width, dtype=np.uint64)
    cnt11 = np.empty(2049, dtype=np.int64)
    for i in range(n):
        m = 0
        for k in range(indptr[i], indptr[i + 1]):
            v = vals[k]
            g = cols[k]
            if v > 0 and g < nl and lut[g] >= 0:
                yy = np.float64(v) / raw_sum[i] * 1e4 / medians[g]  # the numpy expression's order
                y[m] = yy
                y32[m] = yy
                tok[m] = lut[g]
                if want_values:
                    xv[m] = np.float64(v) / raw_sum[i] * 1e4
                m += 1
        for j in range(m):  # descending float32 bits, then position (= ascending gene id)
            keys[j] = ((np.uint64(0xFFFFFFFF) - np.uint64(u32[j])) << np.uint64(32)) | np.uint64(j)
        # The top 22 bits that differ (two passes) put the genes in order up to runs of nearly
        # equal y; _exact_ties orders those runs by the float64 y, then gene id (exact).
        ks, low = _radix_sort(keys, tmp, m, cnt11, 32, 22)
        _exact_ties(ks, y, low)
        o = offsets[i]
        ids[o] = cls_id
        take = min(m, limit)
        for j in range(take):
            src = ks[j] & np.uint64(0xFFFFFFFF)
            ids[o + 1 + j] = tok[src]
            if want_values:
                norm[o + 1 + j] = xv[src]
        ids[o + 1 + take] = eos_id
    return offsets, ids, norm


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, _ = rank_tokens(indptr, cols, vals, tok.lut, tok.medians, tok.max_len, CLS, EOS, False)
    return TokenBlock(offsets, ids, joinids)


def warm() -> None:
    ip, cols, lut, vals_pair = K.sample_inputs()
    for vals in vals_pair:
        rank_tokens(ip, cols, vals, lut, np.ones(2), 10, CLS, EOS, False)


ENCODING = Encoding("rank", tokenize, warm, (rank_tokens,), positional=True, side=None, targets=("gene",),
                    needs_medians=True, ranked=True)
