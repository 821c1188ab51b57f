"""Encodings: how a cell's nonzero counts become a token sequence, one module each.

An encoding is an ``Encoding`` (below) plus its module's ``tokenize`` function. Everything else in
atlasflow reads only the ``Encoding``'s declarations: the loader (which fields a batch carries, which
gene statistics it needs), the model (position embedding, expression side channel, prediction heads),
masking and the objective (what a masked token's targets are), embedding and evaluation. A new
encoding is one module here, one line in ``_MODULES`` and its reference test (an independent
one-cell-at-a-time numpy computation the tokens must equal).

| name | paper | order | per-token channel | MLM targets |
|---|---|---|---|---|
| ``rank`` | Geneformer (Theodoris et al. 2023) | expression / gene median, descending | - | gene id |
| ``bin`` | scGPT (Cui et al. 2024) | gene id | per-cell quantile bin | bin |
| ``ebin`` | scBERT (Yang et al. 2022) | gene id | equal-width bin of log1p(CP10k) | bin |
| ``value`` | scFoundation-style value projection | gene id | log1p(CP10k) | value |
| ``rank_value`` | GeneCompass (Yang et al. 2024) | as ``rank`` | log1p(CP10k) | gene id + value |
| ``uce`` | UCE (Rosen et al. 2023) | chromosome, then genomic position | - | gene id |
"""

from __future__ import annotations

import importlib

from .base import SIDES, TARGETS, Encoding  # noqa: F401  (the declaration, re-exported)

_MODULES = ("rank", "bin", "ebin", "value", "rank_value", "uce")
ENCODINGS: dict[str, Encoding] = {m: importlib.import_module(f"{__name__}.{m}").ENCODING for m in _MODULES}
NAMES = tuple(ENCODINGS)


def get_encoding(name: str) -> Encoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"tokenizer: {name!r} is not one of {'|'.join(NAMES)}") from None
