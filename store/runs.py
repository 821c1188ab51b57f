"""Compact sets of cells: sorted, disjoint half-open soma_joinid runs.

A query result is held as runs, never as one int64 per cell: a store ingested source by source
answers most filters (dataset, donor, assay) with a handful of runs. Cells of a query are
addressed by *position* 0..n-1 (the k-th cell of the query in joinid order); positions map to
joinids through the runs' cumulative counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Runs:
    starts: np.ndarray  # int64, sorted
    stops: np.ndarray  # int64, half-open, starts[i] < stops[i] <= starts[i+1]

    @staticmethod
    def from_ranges(ranges) -> "Runs":
        arr = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 2)
        arr = arr[arr[:, 1] > arr[:, 0]]
        return _merge(arr[:, 0], arr[:, 1])

    @staticmethod
    def from_sorted_ids(ids: np.ndarray) -> "Runs":
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        brk = np.flatnonzero(np.diff(ids) != 1) + 1
        starts = ids[np.concatenate([[0], brk])]
        stops = ids[np.concatenate([brk - 1, [len(ids) - 1]])] + 1
        return Runs(starts, stops)

    @property
    def n_runs(self) -> int:
        return len(self.starts)

    @property
    def n_cells(self) -> int:
        return int((self.stops - self.starts).sum())

    @property
    def nbytes(self) -> int:
        return int(self.starts.nbytes + self.stops.nbytes)

    def cum(self) -> np.ndarray:
        """Position of each run's first cell (length n_runs + 1)."""
        return np.concatenate([[0], np.cumsum(self.stops - self.starts)]).astype(np.int64)

    def intersect(self, other: "Runs") -> "Runs":
        """Cells in both (linear merge of the two boundary lists, vectorized)."""
        if self.n_runs == 0 or other.n_runs == 0:
            return Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        # Each pair (i, j) overlaps on [max(start), min(stop)); candidates found by searchsorted.
        j_lo = np.searchsorted(other.stops, self.starts, side="right")
        j_hi = np.searchsorted(other.starts, self.stops, side="left")
        counts = np.maximum(j_hi - j_lo, 0)
        i = np.repeat(np.arange(self.n_runs), counts)
        j = np.concatenate([np.arange(a, b) for a, b in zip(j_lo, j_hi) if b > a]) if counts.sum() else \
            np.zeros(0, np.int64)
        starts = np.maximum(self.starts[i], other.starts[j])
        stops = np.minimum(self.stops[i], other.stops[j])
        keep = stops > starts
        return _merge(starts[keep], stops[keep])

    def to_joinids(self, pos_lo: int, pos_hi: int, cum: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Joinid ranges holding query positions [pos_lo, pos_hi)."""
        cum = self.cum() if cum is None else cum
        out = []
        k = int(np.searchsorted(cum, pos_lo, side="right")) - 1
        while pos_lo < pos_hi:
            take = min(pos_hi, int(cum[k + 1])) - pos_lo
            a = int(self.starts[k]) + pos_lo - int(cum[k])
            out.append((a, a + take))
            pos_lo += take
            k += 1
        return out

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which ids fall in a run."""
        ids = np.asarray(ids)
        k = np.searchsorted(self.starts, ids, side="right") - 1
        ok = k >= 0
        ok[ok] = ids[ok] < self.stops[k[ok]]
        return ok

    def ranges(self) -> list[tuple[int, int]]:
        """The runs as a list of (start, stop) ints (the manifest's and the ingest plan's form)."""
        return [(int(a), int(b)) for a, b in zip(self.starts, self.stops)]

    def positions_of(self, joinids: np.ndarray, cum: np.ndarray | None = None) -> np.ndarray:
        """Query position of each joinid (which must be in the runs)."""
        cum = self.cum() if cum is None else cum
        k = np.searchsorted(self.starts, joinids, side="right") - 1
        return cum[k] + (joinids - self.starts[k])


def _merge(starts: np.ndarray, stops: np.ndarray) -> Runs:
    if len(starts) == 0:
        return Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    run_end = np.maximum.accumulate(stops)
    new = np.concatenate([[True], starts[1:] > run_end[:-1]])
    idx = np.flatnonzero(new)
    out_starts = starts[idx]
    out_stops = np.maximum.reduceat(run_end, idx)
    return Runs(out_starts.astype(np.int64), out_stops.astype(np.int64))


@dataclass(frozen=True)
class Labels:
    """A column over query positions, run-length encoded: position p has code codes[k] where
    bounds[k] <= p < bounds[k+1]. ``categories[code]`` is the value."""

    bounds: np.ndarray  # int64, length n_segments + 1, bounds[0] = 0, bounds[-1] = n_cells
    codes: np.ndarray  # int32
    categories: list[str]

    def at(self, positions: np.ndarray) -> np.ndarray:
        return self.codes[np.searchsorted(self.bounds, positions, side="right") - 1]

    def counts(self) -> np.ndarray:
        return np.bincount(self.codes, weights=np.diff(self.bounds), minlength=len(self.categories)).astype(np.int64)

    def segments_of(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        k = np.flatnonzero(self.codes == code)
        return self.bounds[k], self.bounds[k + 1]
