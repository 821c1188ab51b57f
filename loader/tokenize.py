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
- Truncation of ``rank``: a cell with more than max_len-2 expressed genes keeps its max_len-2
  highest-ranked ones (largest y = depth-normalized count over the gene's nonzero median; equal y:
  smaller gene joinid first) and drops the rest; nothing is sampled, so the kept set is the same
  every epoch for the same counts. Genes outside the vocabulary take no slot.
- Depth augmentation (``thin_range``, see ``thinning.py``): the block is binomially thinned
  first, so all of the above (raw_sum included) is computed on the thinned cell.

The per-cell work runs in compiled kernels (``kernels.py``): one pass over the block, a stable
sort per cell, no Python loop per cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels as K
from .thinning import thin_block
from .vocab import CLS, EOS

_U64 = np.uint64


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


class Tokenizer:
    """CSR block of raw counts -> TokenBlock. ``lut`` maps a column index to its token (-1: not in the
    vocabulary); ``medians`` (rank) are indexed by column. ``thin_range`` / ``thin_prob``: depth
    augmentation as ``LoaderConfig.thin_range`` / ``thin_prob`` (None: off), seeded by (seed, epoch,
    joinid, column), applied to every block before tokenizing."""

    def __init__(self, kind: str, max_len: int, n_bins: int, lut: np.ndarray, medians: np.ndarray | None,
                 seed: int, *, thin_range: tuple[float, float] | None = None, thin_prob: float = 0.5):
        if thin_range is not None:
            lo, hi = (float(v) for v in thin_range)
            if not 0.0 < lo <= hi <= 1.0 or not 0.0 <= float(thin_prob) <= 1.0:
                raise ValueError(f"Tokenizer: thin_range needs 0 < lo <= hi <= 1 and thin_prob in [0, 1], got "
                                 f"thin_range={thin_range!r}, thin_prob={thin_prob!r}")
            thin_range = (lo, hi)
        self.thin_range, self.thin_prob = thin_range, float(thin_prob)
        if kind == "rank" and medians is None:
            raise ValueError("rank tokenizer: gene medians are required (run `atlasflow store stats STORE`)")
        self.kind, self.max_len, self.n_bins, self.seed = kind, max_len, n_bins, seed
        self.lut = np.ascontiguousarray(lut, dtype=np.int32)
        self.medians = None if medians is None else \
            np.where(np.isfinite(medians) & (medians > 0), medians, 1.0).astype(np.float64)
        if self.medians is not None and len(self.medians) < len(self.lut):  # kernels skip bounds checks
            raise ValueError(f"rank tokenizer: {len(self.medians)} gene medians for {len(self.lut)} store genes")
        self._qs = np.linspace(0, 1, n_bins - 1)  # numpy's own quantile points, passed to the kernel

    def __call__(self, indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, joinids: np.ndarray,
                 epoch: int) -> TokenBlock:
        """``cols`` are store gene joinids, ascending within each row; ``vals`` raw counts."""
        indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        cols = np.ascontiguousarray(cols, dtype=np.int32)
        vals = np.ascontiguousarray(vals, dtype=np.float32)
        joinids = np.asarray(joinids, dtype=np.int64)
        if self.thin_range is not None and self.thin_prob > 0:
            indptr, cols, vals, _ = thin_block(indptr, cols, vals, joinids, seed=self.seed, epoch=epoch,
                                               thin_range=self.thin_range, thin_prob=self.thin_prob)
        if self.kind == "rank":
            offsets, ids = K.rank_tokens(indptr, cols, vals, self.lut, self.medians, self.max_len, CLS, EOS)
            return TokenBlock(offsets, ids, joinids)
        state = splitmix64(splitmix64(np.array([self.seed], dtype=np.uint64)) ^ np.array([epoch], dtype=np.uint64))
        offsets, ids, bins, norm, _ = K.seq_tokens(indptr, cols, vals, self.lut, joinids, state[0], self.max_len,
                                                   CLS, self._qs, self.kind == "bin")
        out = TokenBlock(offsets, ids, joinids)
        if self.kind == "bin":
            out.bins = bins
        else:
            out.values = np.log1p(norm, out=norm).astype(np.float32)  # log1p(0) = 0 at <cls>
        return out


def _safe_lookup(lut: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.full(len(cols), -1, dtype=np.int32)
    ok = cols < len(lut)
    out[ok] = lut[cols[ok]]
    return out
