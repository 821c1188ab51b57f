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
    seen: dict[str, int] = {}
    bounds, codes = [], []
    pos = 0
    last = -1
    for tbl in _obs_batches(exp, [column], value_filter, runs):
        ids = tbl["soma_joinid"].to_numpy()
        keep = _in_runs(ids, runs)
        if not keep.any():
            continue
        col = tbl[column].filter(pa.array(keep))
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.large_string())
        enc = pc.dictionary_encode(col.combine_chunks())
        local = np.array([seen.setdefault(str(v), len(seen)) for v in enc.dictionary.to_pylist()], dtype=np.int32)
        c = local[enc.indices.to_numpy(zero_copy_only=False)]
        if rle:
            change = np.flatnonzero(np.concatenate([[c[0] != last], c[1:] != c[:-1]]))
            bounds.extend((pos + change).tolist())
            codes.extend(c[change].tolist())
            last = int(c[-1])
        pos += len(c)
    categories = sorted(seen)
    if not rle:
        return categories
    if pos != runs.n_cells:
        raise ValueError(f"obs column {column!r}: {pos} rows for {runs.n_cells} query cells (store incomplete?)")
    remap = np.zeros(max(len(seen), 1), dtype=np.int32)
    for v, k in seen.items():
        remap[k] = categories.index(v)
    b = np.asarray(bounds + [pos], dtype=np.int64)
    return Labels(b, remap[np.asarray(codes, dtype=np.int32)], categories)


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
