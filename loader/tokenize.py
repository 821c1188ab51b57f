"""Tokenizers over a CSR block of cells: nonzero genes only, vectorized (no per-cell Python loop).

Definitions (the reference tests recompute these one cell at a time with dense numpy):

- raw_sum = sum of the cell's counts over ALL store genes (equals obs ``raw_sum``).
- ``rank`` (Geneformer): y = x / raw_sum * 1e4 / gene_median in float64, in that order; genes by
  y descending, ties by ascending gene joinid; ``<cls>``, at most max_len-2 genes, ``<eos>``.
- ``bin`` (scGPT): edges = ``np.quantile(v, np.linspace(0, 1, n_bins - 1))`` over the cell's
  nonzero raw counts v (float64, numpy's default linear method), bin = ``np.digitize(x, edges)``,
  so genes get 1..n_bins-1; ``<cls>`` (bin 0) then genes in ascending joinid order.
- ``value``: the same gene sequence as ``bin`` with log1p(x / raw_sum * 1e4) as float32.
- ``bin``/``value`` cells with more than max_len-1 genes keep the max_len-1 genes with the
  smallest ``gene_hash(seed, epoch, soma_joinid, gene_joinid)`` (a seeded sample without
  replacement that is the same whatever batch or worker the cell lands in).

Sorting uses one ``np.sort`` of packed uint64 keys (row | float32 bits | position): the float32
order agrees with the float64 order except inside float32 ties, which are re-sorted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocab import CLS, EOS

_U64 = np.uint64
_M32 = _U64(0xFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def gene_hash(seed: int, epoch: int, joinids: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ joinid) ^ gene), uint64."""
    s = splitmix64(np.array([seed], dtype=np.uint64))
    s = splitmix64(s ^ np.array([epoch], dtype=np.uint64))
    c = splitmix64(s ^ np.asarray(joinids, dtype=np.int64).astype(np.uint64))
    return splitmix64(c ^ np.asarray(genes, dtype=np.int64).astype(np.uint64))


@dataclass
class TokenBlock:
    """Tokenized cells as CSR: cell i's tokens are ids[offsets[i]:offsets[i+1]] (specials included)."""

    offsets: np.ndarray  # int64, n + 1
    ids: np.ndarray  # int32
    joinids: np.ndarray  # int64, n
    values: np.ndarray | None = None  # float32, aligned with ids
    bins: np.ndarray | None = None  # int16, aligned with ids
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # obs codes, int64, n

    def __len__(self) -> int:
        return len(self.joinids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        arrs = [self.offsets, self.ids, self.joinids, self.values, self.bins, *self.labels.values()]
        return int(sum(a.nbytes for a in arrs if a is not None))

    def take(self, idx: np.ndarray) -> "TokenBlock":
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        src = _gather_index(self.offsets[idx], lens, offsets)
        pick = lambda a: None if a is None else a[src]  # noqa: E731
        return TokenBlock(offsets, self.ids[src], self.joinids[idx], pick(self.values), pick(self.bins),
                          {k: v[idx] for k, v in self.labels.items()})

    @staticmethod
    def concat(blocks: list["TokenBlock"]) -> "TokenBlock":
        if len(blocks) == 1:
            return blocks[0]
        lens = np.concatenate([b.lengths for b in blocks])
        cat = lambda name: None if getattr(blocks[0], name) is None else \
            np.concatenate([getattr(b, name) for b in blocks])  # noqa: E731
        return TokenBlock(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), cat("ids"), cat("joinids"),
                          cat("values"), cat("bins"),
                          {k: np.concatenate([b.labels[k] for b in blocks]) for k in blocks[0].labels})


def _gather_index(starts: np.ndarray, lens: np.ndarray, out_offsets: np.ndarray) -> np.ndarray:
    """Flat source index of rows (start, len) laid end to end."""
    total = int(out_offsets[-1])
    return np.repeat(starts - out_offsets[:-1], lens) + np.arange(total, dtype=np.int64)


def _bits(v: int) -> int:
    return max(1, int(v).bit_length())


class Tokenizer:
    def __init__(self, kind: str, max_len: int, n_bins: int, lut: np.ndarray, medians: np.ndarray | None,
                 seed: int):
        if kind == "rank" and medians is None:
            raise ValueError("rank tokenizer: gene medians are required (run `atlasflow store stats STORE`)")
        self.kind, self.max_len, self.n_bins, self.seed = kind, max_len, n_bins, seed
        self.lut = lut
        self.medians = None if medians is None else np.where(np.isfinite(medians) & (medians > 0), medians, 1.0)

    def __call__(self, indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, joinids: np.ndarray,
                 epoch: int) -> TokenBlock:
        """``cols`` are store gene joinids, ascending within each row; ``vals`` raw counts."""
        n = len(indptr) - 1
        row = np.repeat(np.arange(n, dtype=np.int32), np.diff(indptr))
        raw_sum = np.bincount(row, weights=vals, minlength=n)
        lut = self.lut
        cols = np.asarray(cols)
        tok = lut[cols] if len(cols) and cols.max() < len(lut) else _safe_lookup(lut, cols)
        keep = (tok >= 0) & (vals > 0)
        if not keep.all():  # gene filter or explicit zeros; usually nothing to drop
            row, tok, vals, cols = row[keep], tok[keep], vals[keep], cols[keep]
        cnt = np.bincount(row, minlength=n).astype(np.int64)
        kptr = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
        if self.kind == "rank":
            return self._rank(n, row, tok, vals, cols, cnt, kptr, raw_sum, joinids)
        return self._bin_value(n, row, tok, vals, cols, cnt, kptr, raw_sum, joinids, epoch)

    # -- rank ------------------------------------------------------------------------------
    def _rank(self, n, row, tok, x, gene, cnt, kptr, raw_sum, joinids) -> TokenBlock:
        y = x.astype(np.float64) / raw_sum[row] * 1e4 / self.medians[gene]
        order = _sorted_by_row_key(row, y, gene, cnt, kptr, descending=True)
        r_sorted = row[order]
        q = np.arange(len(order), dtype=np.int64) - kptr[r_sorted]  # rank within the cell
        limit = self.max_len - 2
        lens = np.minimum(cnt, limit) + 2
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        ids[offsets[:-1]] = CLS
        ids[offsets[1:] - 1] = EOS
        ok = q < limit
        ids[offsets[r_sorted[ok]] + 1 + q[ok]] = tok[order[ok]]
        return TokenBlock(offsets, ids, np.asarray(joinids, dtype=np.int64))

    # -- bin / value ---------------------------------------------------------------------------
    def _bin_value(self, n, row, tok, x, gene, cnt, kptr, raw_sum, joinids, epoch) -> TokenBlock:
        limit = self.max_len - 1
        keep = None
        if cnt.max(initial=0) > limit:  # seeded sample without replacement, only for the (few) long cells
            keep = np.ones(len(row), dtype=bool)
            sel = np.flatnonzero((cnt > limit)[row])
            h = gene_hash(self.seed, epoch, np.asarray(joinids)[row[sel]], gene[sel])
            o = np.lexsort((h, row[sel]))
            rs = row[sel][o]
            q = np.arange(len(sel)) - np.searchsorted(rs, rs, side="left")
            keep[sel[o[q >= limit]]] = False
        lens = np.minimum(cnt, limit) + 1
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        ids[offsets[:-1]] = CLS
        rk = row if keep is None else row[keep]
        dest = np.arange(len(rk), dtype=np.int64) + rk + 1  # one <cls> ahead of each cell's genes
        pick = (lambda a: a) if keep is None else (lambda a: a[keep])  # noqa: E731
        ids[dest] = pick(tok)
        out = TokenBlock(offsets, ids, np.asarray(joinids, dtype=np.int64))
        if self.kind == "bin":
            bins = np.zeros(len(ids), dtype=np.int16)
            bins[dest] = pick(self._bins(n, row, x, cnt, kptr))
            out.bins = bins
        else:
            values = np.zeros(len(ids), dtype=np.float32)
            values[dest] = pick(np.log1p(x / raw_sum[row] * 1e4)).astype(np.float32)
            out.values = values
        return out

    def _bins(self, n, row, x, cnt, kptr) -> np.ndarray:
        Q = self.n_bins - 1
        xb = x.astype(np.float32).view(np.uint32).astype(np.uint64)  # counts >= 0: bits are monotone
        packed = (row.astype(np.uint64) << _U64(32)) | xb
        v = (np.sort(packed) & _M32).astype(np.uint32).view(np.float32).astype(np.float64)
        # np.quantile(v_row, linspace(0, 1, Q)), method "linear", replicated for all rows at once.
        qs = np.linspace(0, 1, Q)
        m = np.maximum(cnt, 1)[:, None]
        vi = (m - 1) * qs[None, :]
        prev = np.floor(vi)
        above = vi >= (m - 1)
        prev_i = np.where(above, m - 1, prev).astype(np.int64)
        next_i = np.where(above, m - 1, prev + 1).astype(np.int64)
        gamma = vi - np.where(above, -1.0, prev)
        base = np.minimum(kptr[:-1], max(len(v) - 1, 0))[:, None]
        if len(v) == 0:
            return np.zeros(0, dtype=np.int16)
        a, b = v[base + prev_i], v[base + next_i]
        diff = b - a
        edges = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        # Integer counts below K (nearly all): bin = #{edges <= x} from a per-cell table built from
        # ceil(edges) (for integer x, edge <= x <=> ceil(edge) <= x). Others: search packed float32 bits.
        K = 64
        c = np.clip(np.ceil(edges), 0, K).astype(np.int64)
        hist = np.bincount((np.arange(n, dtype=np.int64)[:, None] * (K + 1) + c).ravel(), minlength=n * (K + 1))
        table = np.cumsum(hist.reshape(n, K + 1), axis=1)[:, :K].astype(np.int16)
        out = np.empty(len(x), dtype=np.int16)
        small = (x < K) & (x == np.floor(x))
        if small.all():
            return table[row, x.astype(np.int64)]
        out[small] = table[row[small], x[small].astype(np.int64)]
        big = ~small
        # x >= edge  <=>  x >= (smallest float32 >= edge), so the search can run on packed float32 bits.
        e32 = edges.astype(np.float32)
        low = e32.astype(np.float64) < edges
        e32[low] = np.nextafter(e32[low], np.float32(np.inf))
        E = (np.arange(n, dtype=np.uint64)[:, None] << _U64(32)) | e32.view(np.uint32).astype(np.uint64)
        rb = row[big].astype(np.int64)
        b_idx = np.searchsorted(E.ravel(), (rb.astype(np.uint64) << _U64(32)) | xb[big], side="right")
        out[big] = (b_idx - rb * Q).astype(np.int16)
        return out


def _safe_lookup(lut: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.full(len(cols), -1, dtype=np.int32)
    ok = cols < len(lut)
    out[ok] = lut[cols[ok]]
    return out


def _sorted_by_row_key(row, y, gene, cnt, kptr, descending: bool) -> np.ndarray:
    """Indices grouping elements by row, each row by y (desc), ties by gene ascending. Exact in float64."""
    m = len(row)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    pb = _bits(int(cnt.max()))
    rows_per_pass = (1 << (32 - pb)) - 1
    n = len(cnt)
    out = []
    for r0 in range(0, n, rows_per_pass):  # a loop over sub-blocks only when a block is huge
        r1 = min(n, r0 + rows_per_pass)
        lo, hi = int(kptr[r0]), int(kptr[r1])
        rr = row[lo:hi] - r0
        key = y[lo:hi].astype(np.float32).view(np.uint32)
        if descending:
            key = np.uint32(0xFFFFFFFF) - key
        pos = np.arange(lo, hi, dtype=np.int64) - kptr[row[lo:hi]]
        packed = (rr.astype(np.uint64) << _U64(32 + pb)) | (key.astype(np.uint64) << _U64(pb)) | pos.astype(np.uint64)
        packed.sort()
        idx = kptr[(packed >> _U64(32 + pb)).astype(np.int64) + r0] + (packed & _U64((1 << pb) - 1)).astype(np.int64)
        head = packed >> _U64(pb)
        tie = head[1:] == head[:-1]
        if tie.any():  # equal float32 keys in one row: order exactly by (float64 y, gene)
            in_tie = np.zeros(len(packed), dtype=bool)
            in_tie[1:] |= tie
            in_tie[:-1] |= tie
            sel = np.flatnonzero(in_tie)
            grp = np.cumsum(np.concatenate([[True], head[sel][1:] != head[sel][:-1]]))
            sub = idx[sel]
            yk = -y[sub] if descending else y[sub]
            idx[sel] = sub[np.lexsort((gene[sub], yk, grp))]
        out.append(idx)
    return np.concatenate(out)
