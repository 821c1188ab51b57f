"""scGPT per-cell value binning (Cui et al., Nat Methods 2024, "value binning").

Over the cell's kept nonzero raw counts v (float64): edges = ``np.quantile(v, np.linspace(0, 1,
n_bins - 1))`` (numpy's default linear method), bin = ``np.digitize(x, edges)``, so genes get bins
1..n_bins-1; ``<cls>`` (bin 0) then the genes in ascending joinid order. A cell with more than
max_len - 1 genes keeps the max_len - 1 with the smallest ``gene_hash(seed, epoch, soma_joinid,
gene_joinid)``: a seeded sample without replacement, the same whichever batch or worker the cell
lands in, new each epoch. The bins are adaptive: each cell spreads its genes over all bins.
"""

from __future__ import annotations

from functools import partial

from ._sequence import seq_tokens, warm_sequence
from ..tokenize import TokenBlock, epoch_state
from ..vocab import CLS
from .base import Encoding


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, bins, _, _ = seq_tokens(indptr, cols, vals, tok.lut, joinids, epoch_state(tok.seed, epoch),
                                            tok.max_len, CLS, tok.quantile_points, True)
    return TokenBlock(offsets, ids, joinids, bins=bins)


ENCODING = Encoding("bin", tokenize, partial(warm_sequence, True), (seq_tokens,), positional=False, side="bins", targets=("bin",))
