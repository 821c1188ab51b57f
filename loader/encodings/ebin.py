"""scBERT equal-width value bins (Yang et al., Nat Mach Intell 2022).

scBERT discretizes log-normalized expression on one fixed grid for every cell: the token of a gene
is floor(log1p(x / raw_sum * 1e4)) clipped to the top bin (its default: width 1, i.e. integer
parts of the log-normalized value). Here, with bin width w (``LoaderConfig.bin_width``, default 1.0)
and n_bins: bin = 1 + min(floor(log1p(x / raw_sum * 1e4) / w), n_bins - 2) in float64, so genes
get 1..n_bins-1 and ``<cls>`` bin 0, the same range as ``bin``. The gene sequence is the ``bin`` /
``value`` one (ascending joinid, the same seeded sample of max_len - 1 genes), so the two binnings
differ only in the grid: per-cell quantiles (every cell uses all bins evenly) vs one shared grid
(values pile up in a few bins: the review's caveat; ``bin_occupancy`` measures it).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ..tokenize import TokenBlock
from .base import Encoding
from . import value as V
from ._sequence import warm_sequence


def equal_width_bins(norm: np.ndarray, width: float, n_bins: int) -> np.ndarray:
    """Bins of x / raw_sum * 1e4 values (float64): 1 + min(floor(log1p(v) / width), n_bins - 2)."""
    b = np.floor(np.log1p(norm) / width)
    return (1 + np.minimum(b, n_bins - 2)).astype(np.int16)


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, norm = V.normalized(tok, indptr, cols, vals, joinids, epoch)
    bins = equal_width_bins(norm, tok.bin_width, tok.n_bins)
    bins[offsets[:-1]] = 0  # <cls>
    return TokenBlock(offsets, ids, joinids, bins=bins)


def bin_occupancy(bins: np.ndarray, lengths: np.ndarray | None = None, n_bins: int = 51) -> np.ndarray:
    """Share of gene tokens in each bin 1..n_bins-1 (index 0 of the result is bin 1); <cls> (0) excluded."""
    b = np.asarray(bins)
    b = b[b > 0]
    counts = np.bincount(b, minlength=n_bins)[1:n_bins].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


ENCODING = Encoding("ebin", tokenize, partial(warm_sequence, False), V.ENCODING.kernels, positional=False, side="bins", targets=("bin",))
