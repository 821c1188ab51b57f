"""``StoreView``: what every reader of cells needs from a source, whether an atlasflow store or a Census
experiment read in place (``CensusView``); ``open_view`` opens either one.

The loader, the query layer and the downstream tasks program against this protocol only, so a new
kind of source (another atlas in the Census layout) is one class, not a change in every reader.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import pandas as pd

from .store import StoreLocator


@runtime_checkable
class StoreView(Protocol):
    """A pinned, read-only SOMA Experiment with raw counts in ``ms["RNA"].X["raw"]``."""

    locator: StoreLocator  # picklable: worker processes reopen the same snapshot from it
    n_genes: int

    @property
    def n_cells(self) -> int: ...

    def complete_ranges(self) -> list[tuple[int, int]]:
        """Half-open joinid ranges that may be read (a store's committed sources; a Census's obs)."""
        ...

    def experiment(self) -> AbstractContextManager: ...

    def var(self) -> pd.DataFrame: ...

    def gene_stats(self) -> pd.DataFrame:
        """Per-gene nnz and nonzero median; raises where the source has none (Census)."""
        ...

    def require_counts(self, purpose: str = "pretraining") -> None: ...


def open_view(uri: str, census_organism: str | None = None, timestamp_ms: int | None = None) -> StoreView:
    """The store at ``uri``, or (``census_organism`` given) the Census mirror rooted at ``uri``."""
    if census_organism:
        from .census_view import CensusView

        return CensusView(uri, census_organism, timestamp_ms)
    from .store import open_store

    return open_store(uri, timestamp_ms)
