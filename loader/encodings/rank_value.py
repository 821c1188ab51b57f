"""Rank plus value (GeneCompass, Yang et al., Cell Research 2024).

GeneCompass orders a cell's genes by their median-normalized expression (the Geneformer rank) and
gives every gene token its expression value as well; pretraining masks tokens and predicts both the
gene id (cross-entropy) and the value (mean squared error), L = L_id + beta * L_value
(``objective.value_weight`` = beta). Here: the ``rank`` sequence exactly (``<cls>``, at most max_len - 2
genes by x / raw_sum * 1e4 / median descending, ``<eos>``), each token with log1p(x / raw_sum * 1e4)
as float32 (0 at ``<cls>`` / ``<eos>``).
"""

from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..tokenize import TokenBlock
from ..vocab import CLS, EOS
from .base import Encoding
from .rank import rank_tokens


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, norm = rank_tokens(indptr, cols, vals, tok.lut, tok.medians, tok.max_len, CLS, EOS, True)
    return TokenBlock(offsets, ids, joinids, values=np.log1p(norm, out=norm).astype(np.float32))


def warm() -> None:
    ip, cols, lut, vals_pair = K.sample_inputs()
    for vals in vals_pair:
        rank_tokens(ip, cols, vals, lut, np.ones(2), 10, CLS, EOS, True)


ENCODING = Encoding("rank_value", tokenize, warm, (rank_tokens,), positional=True, side="values",
                    targets=("gene", "value"), needs_medians=True, ranked=True)
