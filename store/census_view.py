"""A Census experiment (a local mirror opened as ``cellxgene_census.open_soma(uri=ROOT)`` would) seen as
a read-only ``Store``, so the streaming loader reads it in place, without copying it into a store.

Census experiments share the store's layout (``obs``, ``ms["RNA"].var`` keyed by ``feature_id``,
``ms["RNA"].X["raw"]`` counts), but have no manifest and no gene statistics:

- the readable cells are the joinids present in obs (one streaming pass over the joinid column,
  kept as runs: Census joinids are dense, so this is one range);
- ``gene_stats`` raises: the ``rank`` tokenizer needs gene medians, which only ``atlasflow store
  stats`` computes (on a store written with ``atlasflow query --out-store``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .genes import organism_key
from .runs import Runs
from .store import Store, StoreLocator

CENSUS_VIEW_VERSION = 1
# cellxgene_census defaults to 1 GiB read buffers per context; several workers share 24 GiB here.
_TILEDB_CONFIG = {"soma.init_buffer_bytes": 128 * 1024**2, "py.init_buffer_bytes": 128 * 1024**2}


@dataclass(frozen=True)
class CensusSpec:
    """Picklable description of which Census to open: a version (S3), or the uri of a mirror."""

    census_version: str | None
    uri: str | None
    organism: str

    def open(self):
        import cellxgene_census

        if self.uri:
            return cellxgene_census.open_soma(uri=self.uri, tiledb_config=_TILEDB_CONFIG)
        return cellxgene_census.open_soma(census_version=self.census_version or "stable", tiledb_config=_TILEDB_CONFIG)

    @property
    def label(self) -> str:
        return f"census:{self.census_version}" if not self.uri else f"census:{self.uri}"

    def experiment(self, census):
        """``census_data/<organism>``; a missing organism is a ValueError naming the Census and what it has."""
        key = organism_key(self.organism)
        try:
            return census["census_data"][key]
        except KeyError:
            raise ValueError(f"{self.uri or self.label}: no organism {key!r} in census_data "
                             f"(has {sorted(census['census_data'].keys())})") from None


def census_experiment_uri(root: str, organism: str) -> str:
    """The URI of ``census_data/<organism>`` under a Census root, checked the way cellxgene_census opens it."""
    spec = CensusSpec(None, root, organism)
    with spec.open() as census:
        return spec.experiment(census).uri


class CensusView(Store):
    """``Store`` interface over a Census experiment, pinned to one TileDB timestamp."""

    def __init__(self, root: str, organism: str = "homo_sapiens", timestamp_ms: int | None = None):
        self.root = str(root)
        ts = int(timestamp_ms if timestamp_ms is not None else time.time() * 1000)
        self.locator = StoreLocator(census_experiment_uri(self.root, organism), ts)
        self.manifest = None
        with self.locator.open() as exp:
            self.n_genes = int(exp.ms["RNA"].var.count)
            self._ranges = _joinid_runs(exp)

    @property
    def n_cells(self) -> int:
        return sum(b - a for a, b in self._ranges)

    def complete_ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def require_counts(self, purpose: str = "pretraining") -> None:
        return None  # Census X["raw"] holds raw counts by definition

    def gene_stats(self):
        raise ValueError(f"LoaderConfig.tokenizer: rank / rank_value need per-gene medians, which the Census "
                         f"experiment {self.root} does not have; use tokenizer bin, ebin, value or uce, or write the query to a "
                         f"store (atlasflow query --out-store) and run `atlasflow store stats` on it")


def _joinid_runs(exp) -> list[tuple[int, int]]:
    """Half-open runs of the joinids present in obs, from Arrow batches of the joinid column only."""
    import numpy as np

    runs = [Runs.from_sorted_ids(np.sort(tbl["soma_joinid"].to_numpy())).ranges()
            for tbl in exp.obs.read(column_names=["soma_joinid"])]
    return Runs.from_ranges([r for part in runs for r in part]).ranges()
