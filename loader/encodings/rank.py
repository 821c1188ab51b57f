"""Geneformer rank encoding (Theodoris et al., Nature 2023).

For cell counts x with raw_sum = sum over ALL store genes and the store's per-gene nonzero median m_g
(of x_g / raw_sum * 1e4 over the cells expressing g): y_g = x_g / raw_sum * 1e4 / m_g in float64, in
that order. Tokens: ``<cls>``, the genes by y descending (ties: smaller gene joinid first), at most
max_len - 2 of them (the highest-ranked; nothing is sampled), ``<eos>``. Genes outside the vocabulary
take no slot.
"""

from __future__ import annotations

from .. import kernels as K
from ..tokenize import TokenBlock
from ..vocab import CLS, EOS
from . import Encoding


def tokenize(tok, indptr, cols, vals, joinids, epoch) -> TokenBlock:
    offsets, ids, _ = K.rank_tokens(indptr, cols, vals, tok.lut, tok.medians, tok.max_len, CLS, EOS, False)
    return TokenBlock(offsets, ids, joinids)


def warm() -> None:
    ip, cols, lut, vals_pair = K.sample_inputs()
    for vals in vals_pair:
        K.rank_tokens(ip, cols, vals, lut, K.np.ones(2), 10, CLS, EOS, False)


ENCODING = Encoding("rank", tokenize, warm, (K.rank_tokens,), positional=True, side=None, targets=("gene",),
                    needs_medians=True)
