"""Compiled per-cell kernels (numba) shared by the encodings, and the CSR assembly of a read.

An encoding's own kernel lives in its module (``encodings/rank.py``, ``encodings/_sequence.py`` for
bin / ebin / value, ``encodings/uce.py``) and builds on the helpers here. Each kernel walks a CSR block once per cell with O(nnz of the cell) scratch memory, releases the
GIL (the read and tokenize threads run at the same time) and reproduces the numpy definitions in
``tokenize.py`` bit for bit: the same float64 operations in the same order, stable sorts for ties.
Compiled once per machine (``cache=True`` writes next to this file, or to ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@njit(**_OPTS)
def csr_from_coo_rows(dim0, ids, contiguous):
    """indptr over ``ids`` (sorted unique joinids) for COO rows ``dim0``; ok=False when the
    entries are not grouped by row in ascending order (the caller then sorts). A row id is looked
    up once per run of equal ids (TileDB returns a cell's entries together), not once per entry."""
    n = len(ids)
    counts = np.zeros(n + 1, dtype=np.int64)
    ok = True
    base = ids[0] if n else 0
    last = np.int64(-1)
    r = -1
    prev = -1
    for k in range(len(dim0)):
        d = dim0[k]
        if d != last or r < 0:
            if contiguous:
                r = d - base
            elif r + 1 < n and ids[r + 1] == d:
                r = r + 1
            else:
                r = np.searchsorted(ids, d)
            if r < 0 or r >= n or (not contiguous and ids[r] != d):
                raise ValueError("X read returned a row that was not requested")
            if r < prev:
                ok = False
            prev = r
            last = d
        counts[r + 1] += 1
    for i in range(n):
        counts[i + 1] += counts[i]
    return counts, ok


@njit(**_OPTS)
def scatter_rows(offsets, src, cells, rows, width, out):
    """Row ``rows[j]`` of the flat (B, width) ``out`` := cell ``cells[j]``'s entries
    ``src[offsets[c]:offsets[c + 1]]`` then zeros (padding) to ``width``: every byte of the row is
    written once, so ``out`` need not be zeroed first."""
    for j in range(len(cells)):
        a = offsets[cells[j]]
        n = offsets[cells[j] + 1] - a
        o = rows[j] * width
        for k in range(n):
            out[o + k] = src[a + k]
        for k in range(n, width):
            out[o + k] = 0


@njit(**_OPTS)
def cols_sorted_within_rows(indptr, cols):
    for i in range(len(indptr) - 1):
        for k in range(indptr[i] + 1, indptr[i + 1]):
            if cols[k] <= cols[k - 1]:
                return False
    return True


@njit(**_OPTS)
def _keep_counts(indptr, cols, vals, lut):
    """Per cell: raw_sum over all stored genes (float64, in order) and the count of kept genes."""
    n = len(indptr) - 1
    raw_sum = np.zeros(n, dtype=np.float64)
    cnt = np.zeros(n, dtype=np.int64)
    nl = len(lut)
    for i in range(n):
        s = 0.0
        c = 0
        for k in range(indptr[i], indptr[i + 1]):
            v = np.float64(vals[k])
            s += v
            g = cols[k]
            if v > 0 and g < nl and lut[g] >= 0:
                c += 1
        raw_sum[i] = s
        cnt[i] = c
    return raw_sum, cnt


@njit(**_OPTS)
def _splitmix64(x):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(**_OPTS)
def _radix_sort(keys, tmp, m, cnt, lowest_bit, max_bits=64):
    """Stable LSD radix sort of keys[:m] by their bits from ``lowest_bit`` up, in O(m) per digit.
    Only the bits that differ between the keys are sorted, in as few digits of at most 11 bits as
    cover them; with ``max_bits`` only the highest that many of those (the caller then orders runs
    of equal sorted bits itself). numba's own sort ran 5-6x slower than this inside these kernels
    (measured). Keys with equal sorted bits keep their input order.
    Returns (the sorted view, the lowest bit sorted)."""
    lo = np.uint64(lowest_bit)
    diff = np.uint64(0)
    first = keys[0] >> lo if m > 0 else np.uint64(0)
    for j in range(m):
        diff |= (keys[j] >> lo) ^ first
    nbits = 0
    while diff != np.uint64(0):
        diff >>= np.uint64(1)
        nbits += 1
    if nbits == 0:
        return keys[:m], lowest_bit
    if nbits > max_bits:
        lowest_bit += nbits - max_bits
        nbits = max_bits
    passes = (nbits + 10) // 11
    width = (nbits + passes - 1) // passes
    nb = 1 << width
    mask = np.uint64(nb - 1)
    src, dst = keys, tmp
    for p in range(passes):
        sh = np.uint64(lowest_bit + p * width)
        cnt[: nb + 1] = 0
        for j in range(m):
            cnt[((src[j] >> sh) & mask) + 1] += 1
        for b in range(nb):
            cnt[b + 1] += cnt[b]
        for j in range(m):
            d = (src[j] >> sh) & mask
            dst[cnt[d]] = src[j]
            cnt[d] += 1
        src, dst = dst, src
    return src[:m], lowest_bit


@njit(**_OPTS)
def _kth_smallest_hash(h, m, k, cnt, tmp):
    """(t, c): t = the k-th smallest of h[:m], c = how many of the k smallest equal t. One pass
    buckets the (uniform) hashes by their top 11 bits; only the bucket holding the k-th is sorted
    (a few entries): O(m) instead of a full 64-bit sort."""
    sh = np.uint64(53)
    cnt[:] = 0
    for j in range(m):
        cnt[h[j] >> sh] += 1
    below, b = 0, 0
    while below + cnt[b] < k:
        below += cnt[b]
        b += 1
    t = 0
    for j in range(m):
        if (h[j] >> sh) == b:
            tmp[t] = h[j]
            t += 1
    for p in range(1, t):  # insertion sort of one bucket
        cur = tmp[p]
        q = p - 1
        while q >= 0 and tmp[q] > cur:
            tmp[q + 1] = tmp[q]
            q -= 1
        tmp[q + 1] = cur
    need = k - below
    thr = tmp[need - 1]
    c = 0
    for q in range(need):
        if tmp[q] == thr:
            c += 1
    return thr, c


@njit(**_OPTS)
def _layout(cnt, limit, specials):
    """Token offsets (at most ``limit`` genes + ``specials`` per cell) and the longest cell (>= 1)."""
    n = len(cnt)
    offsets = np.zeros(n + 1, dtype=np.int64)
    width = 1
    for i in range(n):
        offsets[i + 1] = offsets[i] + min(cnt[i], limit) + specials
        width = max(width, cnt[i])
    return offsets, width


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


def sample_inputs():
    """A two-gene block (indptr, cols, lut) and its values both writable and read-only (Arrow's
    buffers are read-only: a separate numba signature), for warming kernels."""
    ip, cols, lut = np.array([0, 2], dtype=np.int64), np.array([0, 1], dtype=np.int32), np.array([4, 5], dtype=np.int32)
    return ip, cols, lut, (np.array([1, 2], dtype=np.float32), _readonly(np.array([1, 2], dtype=np.float32)))


def warm(tokenizer: str | None = None, thin: bool = False) -> None:
    """Compile (or load from the cache) the kernels for the arrays the loader passes: every kernel
    (``tokenizer`` None: at image build time and in the DataLoader workers' forkserver) or those one
    encoding uses (its own ``warm``, see ``encodings``), and the thinning kernel with ``thin``."""
    from .encodings import ENCODINGS

    if tokenizer is None or thin:
        from .thinning import warm as warm_thinning  # thinning.py builds on this module's helpers

        warm_thinning()
    chosen = list(ENCODINGS.values()) if tokenizer is None else [ENCODINGS[tokenizer]]
    for enc in chosen:
        enc.warm()
    ip, cols, _, _ = sample_inputs()
    for dim0 in (np.zeros(2, dtype=np.int64), _readonly(np.zeros(2, dtype=np.int64))):
        csr_from_coo_rows(dim0, np.zeros(1, dtype=np.int64), True)
    cols_sorted_within_rows(ip, cols)
    cells, rows = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    fields = {"ids": (cols, np.zeros(2, dtype=np.int64))}
    for side in {enc.side for enc in chosen}:
        if side == "values":
            fields[side] = (np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32))
        elif side == "bins":
            fields[side] = (np.zeros(2, dtype=np.int16), np.zeros(2, dtype=np.int64))
    for src, out in fields.values():
        scatter_rows(ip, src, cells, rows, 2, out)
