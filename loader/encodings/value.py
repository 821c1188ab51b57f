"""Continuous values: the ``bin`` encoding's gene sequence (ascending joinid, the same seeded sample
of max_len - 1 genes) with each gene's log1p(x / raw_sum * 1e4) as float32 (0 at ``<cls>``), fed to
the model through a learned projection and predicted by regression (MSE), as scFoundation and
scGPT's continuous-value variant do.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ._sequence import seq_tokens, warm_sequence
from ..tokenize import TokenBlock, epoch_state
from ..vocab import CLS
from .base import Encoding


def normalized(tok, indptr, cols, vals, joinids, epoch):
    """(offsets, ids, x / raw_sum * 1e4 per token in float64) of the gene-ordered, sampled sequence."""
    offsets, ids, _, norm, _ = seq_tokens(indptr, cols, vals, tok.lut, joinids, epoch_state(tok.seed, epoch),
                                            tok.max_len, CLS, tok.quantile_points, False)
    return offsets, ids, norm


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, norm = normalized(tok, indptr, cols, vals, joinids, epoch)
    return TokenBlock(offsets, ids, joinids, values=np.log1p(norm, out=norm).astype(np.float32))


ENCODING = Encoding("value", tokenize, partial(warm_sequence, False), (seq_tokens,), positional=False, side="values", targets=("value",))
