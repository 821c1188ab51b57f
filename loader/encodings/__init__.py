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
from dataclasses import dataclass
from typing import Callable

SIDES = (None, "bins", "values")
TARGETS = ("gene", "bin", "value")


@dataclass(frozen=True)
class Encoding:
    name: str
    tokenize: Callable  # (tokenizer, indptr, cols, vals, joinids, epoch) -> TokenBlock
    warm: Callable[[], None]  # compiles the module's kernels for the loader's array types
    kernels: tuple  # its numba kernels (tests check that warm covers every signature used)
    positional: bool  # the token order carries information: the model adds a position embedding
    side: str | None  # per-token channel beside the gene id: "bins" | "values" | None
    targets: tuple[str, ...]  # what a masked token's MLM targets are
    needs_medians: bool = False  # per-gene nonzero medians (store gene stats)
    needs_coordinates: bool = False  # chromosome and start of each gene (CELLxGENE gene reference)
    extra_tokens: tuple[str, ...] = ()  # tokens of the encoding's own, numbered after the vocabulary
    min_len: int = 3  # smallest max_len that leaves room for one gene

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"Encoding {self.name}: side {self.side!r} is not one of {SIDES}")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise ValueError(f"Encoding {self.name}: targets {self.targets!r} must be drawn from {TARGETS}")

    @property
    def causal_ok(self) -> bool:
        """Next-token prediction needs a meaningful order (and a gene-id head)."""
        return self.positional and "gene" in self.targets


_MODULES = ("rank", "bin", "ebin", "value", "rank_value", "uce")
ENCODINGS: dict[str, Encoding] = {m: importlib.import_module(f"{__name__}.{m}").ENCODING for m in _MODULES}
NAMES = tuple(ENCODINGS)


def get_encoding(name: str) -> Encoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"tokenizer: {name!r} is not one of {'|'.join(NAMES)}") from None
