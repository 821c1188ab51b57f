"""Versioned resume state of the loader: the epoch's phase and one global position per rank.

The epoch order is a pure function of (seed, epoch, query snapshot, order fields), so the state
only records which part of it the current phase streams (slot intervals, see ``plan.py``), how
many shards it was cut into, and how many batches this rank delivered. World size and worker
count may change between save and resume; everything that defines the order must not.

Version 2 (elastic resume) replaced version 1's per-worker positions, which were tied to one
world size and worker count.
"""

from __future__ import annotations

from atlasflow.store.schema import check_format

STATE_FORMAT_VERSION = 2
STREAM_FORMAT = "atlasflow.cellstream_state"
LOADER_FORMAT = "atlasflow.loader_state"

# fields that must match between the saved state and the running loader (world_size and
# num_workers may differ: the rest of the epoch is re-cut for the new shards)
_MUST_MATCH = ("seed", "n_cells", "query_fingerprint", "tokenizer", "batch_size")


def check_state(saved: dict, current: dict, fmt: str) -> None:
    if not isinstance(saved, dict) or saved.get("format") != fmt:
        raise ValueError(f"load_state_dict: not an {fmt} (format={saved.get('format') if isinstance(saved, dict) else saved!r})")
    if saved.get("version") == 1:
        raise ValueError("load_state_dict: loader state version 1 (per-worker positions, one fixed world size) "
                         "cannot be resumed by this loader (version 2); restart the epoch from its beginning "
                         "(set_epoch) or resume with the atlasflow release that wrote it")
    check_format("loader state", saved.get("version"), STATE_FORMAT_VERSION, "load_state_dict")
    for k in _MUST_MATCH:
        if k in current and saved.get(k) != current[k]:
            hint = ""
            if k in ("n_cells", "query_fingerprint"):
                hint = (f"; the store changed since the state was saved: build the loader with "
                        f"LoaderConfig(timestamp_ms={saved.get('snapshot_ms')}) to resume on that snapshot")
            raise ValueError(f"load_state_dict: saved {k}={saved.get(k)!r} but this loader has {k}={current[k]!r}; "
                             f"the batch order would differ, refusing to resume{hint}")
    for k, v in current.get("order", {}).items():
        if saved.get("order", {}).get(k) != v:
            raise ValueError(f"load_state_dict: saved LoaderConfig.{k}={saved.get('order', {}).get(k)!r} but this "
                             f"loader has {k}={v!r}; the epoch order would differ, refusing to resume")
