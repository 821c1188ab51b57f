"""Metadata tokens: sample-level obs values (assay, species, dataset, perturbation...) as tokens.

``LoaderConfig.meta_columns`` names the obs columns; every cell's sequence becomes ``<cls>``, one token
per column (in that order), then its encoding's tokens. Each column has its own block of token ids,
after the vocabulary's genes and the encoding's own tokens: ``<unk:column>`` (a value the vocabulary
does not know, e.g. a dataset no pretraining saw) then one token per known value. The vocabulary of
values (``MetaVocab``, versioned) is the training query's values at the first start and is saved with
the checkpoint, so a resumed run, an embedding or a fine-tune maps values to the same ids. The tokens
sit on top of ``max_len`` (a cell has up to max_len + len(meta_columns) tokens) and are never masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasflow.store.schema import check_format

from .tokenize import prepend_tokens  # noqa: F401  (re-exported: TokenBlock ops live there)

META_VOCAB_VERSION = 1


@dataclass(frozen=True)
class MetaVocab:
    columns: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # per column, its known values (token order)
    base: int  # the first token id of the first column's block

    def __post_init__(self):
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "values", tuple(tuple(str(x) for x in v) for v in self.values))
        if len(self.columns) != len(self.values):
            raise ValueError(f"MetaVocab: {len(self.values)} value lists for {len(self.columns)} columns")

    @classmethod
    def from_categories(cls, columns, categories: dict, base: int) -> "MetaVocab":
        return cls(tuple(columns), tuple(tuple(str(v) for v in categories[c]) for c in columns), base)

    def column_base(self, i: int) -> int:
        return self.base + sum(1 + len(v) for v in self.values[:i])

    @property
    def n_tokens(self) -> int:
        return sum(1 + len(v) for v in self.values)

    def token_names(self) -> list[str]:
        out = []
        for c, vals in zip(self.columns, self.values):
            out += [f"<unk:{c}>"] + [f"<{c}={v}>" for v in vals]
        return out

    def lookup(self, i: int, categories) -> np.ndarray:
        """Token of each category code of column i (index -1, the last entry: a missing value -> unknown)."""
        pos = {v: k for k, v in enumerate(self.values[i])}
        b = self.column_base(i)
        lut = np.array([b + 1 + pos[str(c)] if str(c) in pos else b for c in categories] + [b], dtype=np.int32)
        return lut

    def unknown(self, n: int) -> np.ndarray:
        """[n, k] tokens for cells whose values are not known (every column's ``<unk>``)."""
        return np.tile(np.array([self.column_base(i) for i in range(len(self.columns))], dtype=np.int32), (n, 1))

    def to_dict(self) -> dict:
        return {"format": "atlasflow.meta_vocab", "version": META_VOCAB_VERSION, "columns": list(self.columns),
                "values": [list(v) for v in self.values], "base": self.base}

    @classmethod
    def from_dict(cls, d: dict) -> "MetaVocab":
        if d.get("format") != "atlasflow.meta_vocab":
            raise ValueError(f"MetaVocab.from_dict: not a metadata vocabulary (format={d.get('format')!r})")
        check_format("metadata vocabulary", d.get("version"), META_VOCAB_VERSION, "MetaVocab.from_dict")
        return cls(tuple(d["columns"]), tuple(tuple(v) for v in d["values"]), int(d["base"]))
