"""The token vocabulary: 4 specials, then the store's genes (optionally filtered) in joinid order.

Saved with every checkpoint (``to_dict`` is JSON-able and versioned) so a model always decodes
its input ids with the gene list it was trained on, even after the store gains genes.

``Vocab.from_var(var, gene_filter, gene_nnz=...)`` also drops the genes no cell of the store ever
expresses (gene stats ``nnz == 0``): they can never be an input or a target, yet every one costs a
row of the softmax (on a Census-like store with 35k genes about half are never seen). Version 2
records that rule (``expressed_only``); version-1 dictionaries still load (``expressed_only`` False).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasflow.store.schema import check_format

VOCAB_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PAD, MASK, CLS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
N_SPECIAL = len(SPECIALS)


@dataclass(frozen=True)
class Vocab:
    gene_joinids: np.ndarray  # int64, ascending store var joinids
    gene_feature_ids: tuple[str, ...]  # Ensembl ids, same order
    gene_filter: str | None = None
    expressed_only: bool = False  # genes with no nonzero count in the store were left out

    def __post_init__(self):
        j = np.asarray(self.gene_joinids, dtype=np.int64)
        object.__setattr__(self, "gene_joinids", j)
        object.__setattr__(self, "gene_feature_ids", tuple(str(f) for f in self.gene_feature_ids))
        if len(j) != len(self.gene_feature_ids):
            raise ValueError(f"Vocab.gene_feature_ids: {len(self.gene_feature_ids)} ids for {len(j)} gene joinids")
        if len(j) > 1 and np.any(np.diff(j) <= 0):
            raise ValueError("Vocab.gene_joinids: must be strictly ascending")

    def __len__(self) -> int:
        return N_SPECIAL + len(self.gene_joinids)

    @property
    def specials(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(SPECIALS)}

    def token_of(self, feature_id: str) -> int:
        try:
            return N_SPECIAL + self.gene_feature_ids.index(feature_id)
        except ValueError:
            raise KeyError(f"Vocab: gene {feature_id!r} is not in the vocabulary") from None

    def lookup_table(self, n_store_genes: int) -> np.ndarray:
        """int32 array: store gene joinid -> token id, -1 for genes outside the vocabulary."""
        lut = np.full(max(n_store_genes, int(self.gene_joinids.max(initial=-1)) + 1), -1, dtype=np.int32)
        lut[self.gene_joinids] = N_SPECIAL + np.arange(len(self.gene_joinids), dtype=np.int32)
        return lut

    def token_of_feature(self) -> dict[str, int]:
        """Ensembl feature_id -> token id, for every gene of this vocabulary."""
        return {f: N_SPECIAL + i for i, f in enumerate(self.gene_feature_ids)}

    def lookup_table_for_var(self, var) -> np.ndarray:
        """int32 array: gene joinid of ANOTHER store's ``var`` -> token id of this vocabulary, matched by
        Ensembl ``feature_id`` (joinids differ between stores); -1 for genes this vocabulary lacks."""
        token = self.token_of_feature()
        j = var.index.to_numpy(np.int64)
        lut = np.full(int(j.max(initial=-1)) + 1, -1, dtype=np.int32)
        lut[j] = [token.get(str(f), -1) for f in var["feature_id"]]
        return lut

    def to_dict(self) -> dict:
        return {"format": "atlasflow.vocab", "version": VOCAB_FORMAT_VERSION, "specials": list(SPECIALS),
                "gene_filter": self.gene_filter, "expressed_only": self.expressed_only, "gene_joinids": self.gene_joinids.tolist(),
                "gene_feature_ids": list(self.gene_feature_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if d.get("format") != "atlasflow.vocab":
            raise ValueError(f"Vocab.from_dict: not a vocabulary (format={d.get('format')!r})")
        check_format("vocabulary", d.get("version"), READABLE_VERSIONS, "Vocab.from_dict")
        if tuple(d.get("specials", ())) != SPECIALS:
            raise ValueError(f"Vocab.from_dict: specials {d.get('specials')} differ from {list(SPECIALS)}")
        return cls(np.asarray(d["gene_joinids"], dtype=np.int64), tuple(d["gene_feature_ids"]), d.get("gene_filter"),
                   bool(d.get("expressed_only", False)))

    @classmethod
    def from_var(cls, var, gene_filter: str | None = None, gene_nnz=None) -> "Vocab":
        """From ``Store.var()`` (indexed by gene joinid); ``gene_filter`` keeps one feature_type;
        ``gene_nnz`` (the store's gene stats ``nnz``: a Series indexed by gene joinid, or an array
        indexed by joinid) drops the genes with no nonzero count."""
        var = var.sort_index()
        if gene_nnz is not None:
            if not hasattr(gene_nnz, "reindex"):  # an array indexed by gene joinid
                gene_nnz = pd.Series(np.asarray(gene_nnz))
            nnz = gene_nnz.reindex(var.index).to_numpy(np.float64)
            if np.isnan(nnz).any():
                raise ValueError(f"Vocab.from_var: gene_nnz: no count for {int(np.isnan(nnz).sum())} store genes "
                                 "(gene stats older than the store? rerun `atlasflow store stats`)")
            var = var[nnz > 0]
            if len(var) == 0:
                raise ValueError("Vocab.from_var: gene_nnz: no gene has a nonzero count in the store")
        if gene_filter is not None:
            types = sorted(set(var["feature_type"]))
            var = var[var["feature_type"] == gene_filter]
            if len(var) == 0:
                raise ValueError(f"LoaderConfig.gene_filter: no gene has feature_type {gene_filter!r} "
                                 f"(store has {types[:8]})")
        return cls(var.index.to_numpy(np.int64), tuple(var["feature_id"].astype(str)), gene_filter,
                   gene_nnz is not None)
