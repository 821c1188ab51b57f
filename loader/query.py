"""Resolve a loader query against a pinned store snapshot into compact structures.

Everything here runs once, at ``CellStream`` construction, streaming obs in row-major batches
(memory bounded by one batch plus the result): the query as ``Runs`` of committed joinids, and
obs columns as run-length ``Labels`` over query positions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .runs import Labels, Runs
from .split import split_of


OBS_SLICE = 65_536  # rows per obs read: bounds the construction-time peak whatever the corpus size


def _obs_batches(exp, columns: list[str], value_filter: str | None, within: Runs):
    """obs rows (joinid order) inside ``within``, read in joinid slices of OBS_SLICE rows."""
    cols = ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
    if within.n_runs == 0:
        return
    lo, hi = int(within.starts[0]), int(within.stops[-1])
    for a in range(lo, hi, OBS_SLICE):
        b = min(hi, a + OBS_SLICE)
        k0 = int(np.searchsorted(within.stops, a, side="right"))
        if k0 >= within.n_runs or within.starts[k0] >= b:
            continue  # no query cell in this slice
        try:
            it = exp.obs.read(coords=(slice(a, b - 1),), column_names=cols, value_filter=value_filter,
                              result_order="row-major")
            for tbl in it:
                yield tbl
        except Exception as exc:  # surface the field the user set
            if value_filter is not None and any(w in str(exc).lower() for w in ("filter", "parse", "column")):
                raise ValueError(f"LoaderConfig.obs_filter: {value_filter!r} is not a valid SOMA value filter "
                                 f"on obs ({exc})") from exc
            raise


def check_columns(exp, columns, field: str) -> None:
    names = set(exp.obs.schema.names)
    for c in columns:
        if c is not None and c not in names:
            raise ValueError(f"LoaderConfig.{field}: obs has no column {c!r} (columns: {sorted(names)[:12]}...)")


def query_runs(exp, complete: Runs, value_filter: str | None) -> Runs:
    """Committed cells matching the filter, as runs."""
    if value_filter is None:
        return complete
    starts, stops = [], []
    for tbl in _obs_batches(exp, [], value_filter, complete):
        ids = tbl["soma_joinid"].to_numpy()
        if len(ids):
            r = Runs.from_sorted_ids(np.sort(ids))
            starts.append(r.starts), stops.append(r.stops)
    if not starts:
        return Runs.from_ranges([])
    return Runs.from_ranges(np.stack([np.concatenate(starts), np.concatenate(stops)], axis=1)).intersect(complete)


def column_labels(exp, runs: Runs, column: str, value_filter: str | None, rle: bool = True):
    """Run-length labels of one obs column over the query's positions (or just its categories)."""
    return obs_labels(exp, runs, {column: rle}, value_filter)[column]


def obs_labels(exp, runs: Runs, columns: dict[str, bool | int], value_filter: str | None) -> dict:
    """Several obs columns in ONE pass over obs: for each ``column: rle``, run-length ``Labels``
    over the query's positions (``rle`` True) or just its sorted categories (False: a per-cell label
    column such as cell_type would make O(cells) runs). An int ``rle`` asks for ``Labels`` while the
    column has at most that many runs, and for its categories beyond (memory stays bounded)."""
    seen = {c: {} for c in columns}
    bounds = {c: [] for c in columns if columns[c] is True or columns[c] > 0}
    codes = {c: [] for c in bounds}
    last = {c: -1 for c in columns}
    pos = 0
    for tbl in _obs_batches(exp, list(columns), value_filter, runs):
        keep = _in_runs(tbl["soma_joinid"].to_numpy(), runs)
        if not keep.any():
            continue
        mask = pa.array(keep)
        for column, rle in columns.items():
            col = tbl[column].filter(mask)
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                col = pc.cast(col, pa.large_string())
            enc = pc.dictionary_encode(col.combine_chunks())
            cseen = seen[column]
            local = np.array([cseen.setdefault(str(v), len(cseen)) for v in enc.dictionary.to_pylist()],
                             dtype=np.int32)
            if column in bounds:
                c = local[enc.indices.to_numpy(zero_copy_only=False)]
                change = np.flatnonzero(np.concatenate([[c[0] != last[column]], c[1:] != c[:-1]]))
                bounds[column].extend((pos + change).tolist())
                codes[column].extend(c[change].tolist())
                last[column] = int(c[-1])
                if rle is not True and len(codes[column]) > rle:  # too many runs: categories only
                    del bounds[column], codes[column]
        pos += int(keep.sum())
    out = {}
    for column, rle in columns.items():
        categories = sorted(seen[column])
        if column not in bounds:
            out[column] = categories
            continue
        if pos != runs.n_cells:
            raise ValueError(f"obs column {column!r}: {pos} rows for {runs.n_cells} query cells (store incomplete?)")
        at = {v: i for i, v in enumerate(categories)}
        remap = np.zeros(max(len(categories), 1), dtype=np.int32)
        for v, k in seen[column].items():
            remap[k] = at[v]
        b = np.asarray(bounds[column] + [pos], dtype=np.int64)
        out[column] = Labels(b, remap[np.asarray(codes[column], dtype=np.int32)], categories)
    return out


def _in_runs(ids: np.ndarray, runs: Runs) -> np.ndarray:
    k = np.searchsorted(runs.starts, ids, side="right") - 1
    ok = k >= 0
    ok[ok] = ids[ok] < runs.stops[k[ok]]
    return ok


def restrict_to_split(runs: Runs, labels: Labels, split: str, fractions) -> Runs:
    """Keep the query cells whose group (labels) falls in ``split``."""
    wanted = np.array([split_of(v, fractions) == split for v in labels.categories], dtype=bool)
    seg = np.flatnonzero(wanted[labels.codes])
    cum = runs.cum()
    ranges = []
    for k in seg:  # a loop over label segments (datasets), not cells
        ranges.extend(runs.to_joinids(int(labels.bounds[k]), int(labels.bounds[k + 1]), cum))
    return Runs.from_ranges(ranges)
