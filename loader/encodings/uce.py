"""UCE-style chromosome-ordered, expression-sampled sequences (Rosen et al., bioRxiv 2023, "Universal
Cell Embeddings"; the sampling of its ``sample_cell_sentences``).

For a cell, over its kept genes (nonzero, in the vocabulary, on a chromosome in ``CHROMOSOMES`` of
the CELLxGENE gene reference ``gene_coordinates_*``), with weights w_g = log1p(x_g) (raw counts, as
UCE weights its draws) and p_g = w_g / sum(w):

1. K = max_len - 1 - 2 d genes are drawn with replacement from p (d = the number of distinct
   chromosomes among the kept genes, so the sequence always fits max_len). Draw t uses
   u_t = (splitmix64(c ^ t) >> 11) * 2**-53 with c = splitmix64(splitmix64(splitmix64(seed) ^ epoch)
   ^ soma_joinid) and picks the first gene whose running sum of w (float64, gene joinid order)
   exceeds u_t * sum(w): inverse-CDF sampling, seeded per cell, new each epoch.
2. The sampled chromosomes are put in a random order (UCE shuffles them per cell: "there is no natural
   order to chromosomes"): ascending splitmix64(splitmix64(c ^ CHROM_SALT) ^ code) over the codes of
   ``CHROMOSOMES``.
3. Tokens: ``<cls>``, then per chromosome its start token ``<chrN>``, its sampled genes by genomic
   start (ties: smaller gene joinid; a gene drawn twice appears twice), and the shared end token
   ``</chr>``.

UCE embeds gene tokens with ESM2 protein embeddings and pretrains on binary expressed/not-expressed
prediction; here gene tokens are learned embeddings and the objective is atlasflow's (MLM on the gene
id, or next-token prediction), so the comparison isolates the encoding.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from .. import kernels as K
from ..tokenize import TokenBlock, epoch_state
from ..vocab import CLS
from .base import Encoding

log = logging.getLogger(__name__)

CHROMOSOMES = tuple(str(i) for i in range(1, 23)) + ("X", "Y", "M")
CHROM_SALT = np.uint64(0xD1B54A32D192ED03)
N_CHROM = len(CHROMOSOMES)
EXTRA_TOKENS = tuple(f"<chr{c}>" for c in CHROMOSOMES) + ("</chr>",)
START_BITS, COL_BITS = 31, 28  # sort key: chromosome rank (5 bits) | start | column


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def uce_tokens(indptr, cols, vals, weights, lut, chrom, start, joinids, hash_state, max_len, cls_id, chrom_base):
    """Offsets and ids of the UCE sequences of a CSR block (see the module docstring); ``weights`` =
    log1p(vals) in float64, ``chrom`` / ``start`` per store column (chrom -1: no coordinates)."""
    n_chrom = N_CHROM
    n = len(indptr) - 1
    nl, nc = len(lut), len(chrom)
    stamp = np.zeros(n_chrom, dtype=np.int64)
    draws = np.zeros(n, dtype=np.int64)
    bound, width = 0, 1
    for i in range(n):
        m, d = 0, 0
        for k in range(indptr[i], indptr[i + 1]):
            g = cols[k]
            if vals[k] > 0 and g < nl and g < nc and lut[g] >= 0 and chrom[g] >= 0:
                m += 1
                if stamp[chrom[g]] != i + 1:
                    stamp[chrom[g]] = i + 1
                    d += 1
        kk = max_len - 1 - 2 * d if m > 0 else 0
        draws[i] = kk
        bound += 1 + kk + 2 * d
        width = max(width, max(m, kk))
    out = np.empty(bound, dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    cum = np.empty(width, dtype=np.float64)
    colj = np.empty(width, dtype=np.int64)
    keys = np.empty(width, dtype=np.uint64)
    hk = np.empty(n_chrom, dtype=np.uint64)
    crank = np.empty(n_chrom, dtype=np.uint64)
    col_mask = np.uint64((1 << COL_BITS) - 1)
    pos = 0
    for i in range(n):
        offsets[i] = pos
        out[pos] = cls_id
        pos += 1
        m, s = 0, 0.0
        for k in range(indptr[i], indptr[i + 1]):
            g = cols[k]
            if vals[k] > 0 and g < nl and g < nc and lut[g] >= 0 and chrom[g] >= 0:
                s += weights[k]
                cum[m] = s
                colj[m] = g
                m += 1
        kk = draws[i]
        if m == 0 or kk <= 0:
            continue
        c = K._splitmix64(hash_state ^ np.uint64(joinids[i]))
        cs = K._splitmix64(c ^ CHROM_SALT)
        for q in range(n_chrom):
            hk[q] = K._splitmix64(cs ^ np.uint64(q))
        for q in range(n_chrom):
            r = 0
            for p in range(n_chrom):
                if hk[p] < hk[q]:
                    r += 1
            crank[q] = np.uint64(r)
        total = cum[m - 1]
        for t in range(kk):
            u = np.float64(K._splitmix64(c ^ np.uint64(t)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
            x = u * total
            lo, hi = 0, m
            while lo < hi:  # first j with cum[j] > x (np.searchsorted(cum, x, side="right"))
                mid = (lo + hi) // 2
                if cum[mid] > x:
                    hi = mid
                else:
                    lo = mid + 1
            g = colj[min(lo, m - 1)]
            keys[t] = (crank[chrom[g]] << np.uint64(START_BITS + COL_BITS)) | \
                (np.uint64(start[g]) << np.uint64(COL_BITS)) | np.uint64(g)
        srt = np.sort(keys[:kk])
        prev = -1
        for t in range(kk):
            g = np.int64(srt[t] & col_mask)
            cc = chrom[g]
            if cc != prev:
                if prev >= 0:
                    out[pos] = chrom_base + n_chrom
                    pos += 1
                out[pos] = chrom_base + cc
                pos += 1
                prev = cc
            out[pos] = lut[g]
            pos += 1
        out[pos] = chrom_base + n_chrom
        pos += 1
    offsets[n] = pos
    return offsets, out[:pos].copy()


def column_coordinates(var) -> tuple[np.ndarray, np.ndarray]:
    """(chromosome code int16, -1 where unknown; start int64) indexed by gene joinid, for a store's
    ``var`` (indexed by joinid, with Ensembl ``feature_id``)."""
    from atlasflow.store.genes import gene_coordinates

    j = var.index.to_numpy(np.int64)
    hit = gene_coordinates().reindex([str(f).split(".")[0] for f in var["feature_id"]])
    code = {c: i for i, c in enumerate(CHROMOSOMES)}
    chrom = np.full(int(j.max(initial=-1)) + 1, -1, dtype=np.int16)
    start = np.zeros(len(chrom), dtype=np.int64)
    chrom[j] = [code.get(c, -1) if isinstance(c, str) else -1 for c in hit["chrom"]]
    start[j] = np.nan_to_num(hit["start"].to_numpy(np.float64), nan=0).astype(np.int64)
    if len(chrom) >= 1 << COL_BITS or (start >= 1 << START_BITS).any():
        raise ValueError("uce tokenizer: more store genes or larger genomic starts than its sort key holds")
    if not (chrom >= 0).any():
        raise ValueError("uce tokenizer: no store gene has chromosome coordinates in the CELLxGENE gene "
                         "reference (are the var feature_ids Ensembl ids?)")
    log.info("uce: %d of %d store genes have chromosome coordinates", int((chrom >= 0).sum()), len(chrom))
    return chrom, start


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    weights = np.log1p(vals.astype(np.float64))
    chrom, start = tok.coordinates
    offsets, ids = uce_tokens(indptr, cols, vals, weights, tok.lut, chrom, start, joinids,
                              epoch_state(tok.seed, epoch), tok.max_len, CLS, tok.n_vocab)
    return TokenBlock(offsets, ids, joinids)


def warm() -> None:
    ip, cols, lut, vals_pair = K.sample_inputs()
    for vals in vals_pair:
        uce_tokens(ip, cols, vals, np.log1p(vals.astype(np.float64)), lut, np.zeros(2, dtype=np.int16),
                   np.zeros(2, dtype=np.int64), np.zeros(1, dtype=np.int64), np.uint64(1), 60, CLS, 6)


ENCODING = Encoding("uce", tokenize, warm, (uce_tokens,), positional=True, side=None, targets=("gene",),
                    needs_coordinates=True, extra_tokens=EXTRA_TOKENS, min_len=2 * len(CHROMOSOMES) + 2)
