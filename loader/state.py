"""Versioned resume state of a CellStream (per worker) and of the loader (per rank).

Position is the number of batches already delivered in the epoch; since the order is a pure
function of (seed, epoch, world size, rank, workers, snapshot), that is all a resume needs:
the shard plan is recomputed and the reader restarts at the window holding the next batch.
"""

from __future__ import annotations

from atlasflow.store.schema import check_format

STATE_FORMAT_VERSION = 1
STREAM_FORMAT = "atlasflow.cellstream_state"
LOADER_FORMAT = "atlasflow.loader_state"

# fields that must match between the saved state and the running loader
# (the snapshot may differ as long as the query resolves to the same cells: the plan depends only on them)
_MUST_MATCH = ("seed", "world_size", "rank", "num_workers", "n_cells", "query_fingerprint", "tokenizer", "batch_size")


def check_state(saved: dict, current: dict, fmt: str) -> None:
    if not isinstance(saved, dict) or saved.get("format") != fmt:
        raise ValueError(f"load_state_dict: not an {fmt} (format={saved.get('format') if isinstance(saved, dict) else saved!r})")
    check_format("loader state", saved.get("version"), STATE_FORMAT_VERSION, "load_state_dict")
    for k in _MUST_MATCH:
        if k in current and saved.get(k) != current[k]:
            hint = " (resume with the same number of ranks)" if k == "world_size" else ""
            if k in ("n_cells", "query_fingerprint"):
                hint = (f"; the store changed since the state was saved: build the loader with "
                        f"LoaderConfig(timestamp_ms={saved.get('snapshot_ms')}) to resume on that snapshot")
            raise ValueError(f"load_state_dict: saved {k}={saved.get(k)!r} but this loader has {k}={current[k]!r}; "
                             f"the batch order would differ, refusing to resume{hint}")
