"""The tokenizer over a CSR block of cells: nonzero genes only, vectorized (no per-cell Python loop).

What a sequence is depends on the encoding (``encodings/``: one module each, with its definition and
the paper it follows): ``rank`` (Geneformer), ``bin`` (scGPT), ``ebin`` (scBERT), ``value``,
``rank_value`` (GeneCompass), ``uce`` (UCE). Common to all of them:

- raw_sum = sum of the cell's counts over ALL store genes (equals obs ``raw_sum``); genes outside the
  vocabulary take no slot; ``max_len`` counts the special tokens.
- Seeded draws (a sampled subset of genes, UCE's draws) are a pure function of (seed, epoch,
  soma_joinid, gene or draw index), so a cell's tokens do not depend on the batch, worker, rank or
  resume position it lands in.
- Depth augmentation (``thin_range``, see ``thinning.py``): the block is binomially thinned first, so
  everything (raw_sum included) is computed on the thinned cell.

The per-cell work runs in compiled kernels (``kernels.py`` and the encodings' own): one pass over the
block, a stable sort per cell, no Python loop per cell. Each encoding's tokens are tested against an
independent one-cell-at-a-time numpy computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .thinning import thin_block
from .vocab import N_SPECIAL

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


def prepend_tokens(block: TokenBlock, tokens: np.ndarray) -> TokenBlock:
    """``block`` with ``tokens`` [n, k] inserted after each cell's first token (its ``<cls>``); their
    values / bins are 0 (what ``<cls>`` carries). Metadata tokens (``meta_tokens.py``) use it."""
    tokens = np.asarray(tokens, dtype=np.int32)
    n, k = tokens.shape
    if n != len(block):
        raise ValueError(f"prepend_tokens: {n} rows of tokens for {len(block)} cells")
    if k == 0:
        return block
    if (block.lengths < 1).any():
        raise ValueError("prepend_tokens: a cell without its first (<cls>) token")
    offsets = block.offsets + k * np.arange(n + 1, dtype=np.int64)
    total = int(offsets[-1])
    meta_at = (offsets[:-1, None] + 1 + np.arange(k)).ravel()
    keep = np.ones(total, dtype=bool)
    keep[meta_at] = False

    def spread(a, fill):
        if a is None:
            return None
        out = np.empty(total, dtype=a.dtype)
        out[keep] = a
        out[meta_at] = fill
        return out

    return TokenBlock(offsets, spread(block.ids, tokens.ravel()), block.joinids, spread(block.values, 0),
                      spread(block.bins, 0), block.labels)


def _gather_index(starts: np.ndarray, lens: np.ndarray, out_offsets: np.ndarray) -> np.ndarray:
    """Flat source index of rows (start, len) laid end to end."""
    total = int(out_offsets[-1])
    return np.repeat(starts - out_offsets[:-1], lens) + np.arange(total, dtype=np.int64)


def epoch_state(seed: int, epoch: int) -> np.uint64:
    """splitmix64(splitmix64(seed) ^ epoch): the per-epoch state every seeded draw starts from."""
    return splitmix64(splitmix64(np.array([seed], dtype=np.uint64)) ^ np.array([epoch], dtype=np.uint64))[0]


class Tokenizer:
    """CSR block of raw counts -> TokenBlock, by the encoding ``kind`` (``encodings.NAMES``).

    ``lut`` maps a store column to its token (-1: not in the vocabulary); ``medians`` (encodings that
    need them) are indexed by column; ``coordinates`` = (chromosome code, start) per column (``uce``);
    ``n_vocab`` = the vocabulary's size (specials + genes): an encoding's own tokens are numbered from
    there. ``prefix_tokens``: the same tokens after every cell's ``<cls>`` (a checkpoint's metadata
    tokens for cells whose values it does not know). ``thin_range`` / ``thin_prob``: depth augmentation as ``LoaderConfig.thin_range`` /
    ``thin_prob`` (None: off), seeded by (seed, epoch, joinid, column), applied before tokenizing."""

    def __init__(self, kind: str, max_len: int, n_bins: int, lut: np.ndarray, medians: np.ndarray | None,
                 seed: int, *, thin_range: tuple[float, float] | None = None, thin_prob: float = 0.5,
                 coordinates: tuple[np.ndarray, np.ndarray] | None = None, n_vocab: int | None = None,
                 bin_width: float = 1.0, prefix_tokens=None):
        from .encodings import get_encoding

        self.encoding = enc = get_encoding(kind)
        if thin_range is not None:
            lo, hi = (float(v) for v in thin_range)
            if not 0.0 < lo <= hi <= 1.0 or not 0.0 <= float(thin_prob) <= 1.0:
                raise ValueError(f"Tokenizer: thin_range needs 0 < lo <= hi <= 1 and thin_prob in [0, 1], got "
                                 f"thin_range={thin_range!r}, thin_prob={thin_prob!r}")
            thin_range = (lo, hi)
        self.thin_range, self.thin_prob = thin_range, float(thin_prob)
        if enc.needs_medians and medians is None:
            raise ValueError(f"{kind} tokenizer: gene medians are required (run `atlasflow store stats STORE`)")
        if enc.needs_coordinates and coordinates is None:
            raise ValueError(f"{kind} tokenizer: gene coordinates are required (chromosome, start per store gene)")
        if max_len < enc.min_len:
            raise ValueError(f"{kind} tokenizer: max_len {max_len} is below its minimum {enc.min_len}")
        if not float(bin_width) > 0:
            raise ValueError(f"Tokenizer: bin_width must be > 0, got {bin_width!r}")
        self.kind, self.max_len, self.n_bins, self.seed = kind, max_len, n_bins, seed
        self.bin_width = float(bin_width)
        self.lut = np.ascontiguousarray(lut, dtype=np.int32)
        if n_vocab is None and enc.extra_tokens:
            raise ValueError(f"{kind} tokenizer: n_vocab is required (its own tokens are numbered after the vocabulary)")
        self.n_vocab = int(n_vocab) if n_vocab is not None else int(self.lut.max(initial=N_SPECIAL - 1)) + 1
        self.medians = None if medians is None else \
            np.where(np.isfinite(medians) & (medians > 0), medians, 1.0).astype(np.float64)
        if self.medians is not None and len(self.medians) < len(self.lut):  # kernels skip bounds checks
            raise ValueError(f"{kind} tokenizer: {len(self.medians)} gene medians for {len(self.lut)} store genes")
        self.coordinates = None if coordinates is None else \
            (np.ascontiguousarray(coordinates[0], dtype=np.int16), np.ascontiguousarray(coordinates[1], dtype=np.int64))
        self.quantile_points = np.linspace(0, 1, n_bins - 1)  # numpy's own quantile points, passed to the kernel
        self.prefix_tokens = None if prefix_tokens is None or len(prefix_tokens) == 0 else \
            np.asarray(prefix_tokens, dtype=np.int32)

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
        block = self.encoding.tokenize(self, indptr, cols, vals, joinids, epoch)
        if self.prefix_tokens is not None:
            block = prepend_tokens(block, np.broadcast_to(self.prefix_tokens, (len(block), len(self.prefix_tokens))))
        return block


def _safe_lookup(lut: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.full(len(cols), -1, dtype=np.int32)
    ok = cols < len(lut)
    out[ok] = lut[cols[ok]]
    return out
