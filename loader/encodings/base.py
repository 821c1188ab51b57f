"""The declaration every encoding module exports as ``ENCODING`` (see the package docstring)."""

from __future__ import annotations

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
    ranked: bool = False  # genes in descending order of the cell's (relative) expression: position = rank

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"Encoding {self.name}: side {self.side!r} is not one of {SIDES}")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise ValueError(f"Encoding {self.name}: targets {self.targets!r} must be drawn from {TARGETS}")

    @property
    def causal_ok(self) -> bool:
        """Next-token prediction needs a meaningful order (and a gene-id head)."""
        return self.positional and "gene" in self.targets
