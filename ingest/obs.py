"""Mapping a source's obs onto the store's obs schema (Census column names + provenance)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from atlasflow.store import schema


def _as_str(col: pd.Series) -> list[str]:
    s = col.astype(object).where(col.notna(), schema.MISSING)
    return [str(v) for v in s]


def to_store_obs(obs: pd.DataFrame, *, source_id: str, source_file: str, source_rows: np.ndarray,
                 nnz: np.ndarray, raw_sum: np.ndarray, default_dataset_id: str) -> pa.Table:
    """One pyarrow table with OBS_SCHEMA (no soma_joinid), rows in block order.

    Census columns present in the source are carried over as strings; absent ones are ``unknown``,
    except ``dataset_id`` which defaults to the source's own id so dataset-level splits still work.
    """
    n = len(obs)
    cols: dict[str, pa.Array] = {}
    for c in schema.CENSUS_STRING_COLUMNS:
        if c in obs.columns:
            values = _as_str(obs[c])
        elif c == "dataset_id":
            values = [default_dataset_id] * n
        else:
            values = [schema.MISSING] * n
        cols[c] = pa.array(values, pa.large_string())
    if "is_primary_data" in obs.columns:
        prim = obs["is_primary_data"].astype(object).map(lambda v: str(v).lower() in ("true", "1")).to_numpy(bool)
    else:
        prim = np.ones(n, dtype=bool)
    cols["is_primary_data"] = pa.array(prim)
    cols["raw_sum"] = pa.array(np.asarray(raw_sum, dtype=np.float64))
    cols["nnz"] = pa.array(np.asarray(nnz, dtype=np.int64))
    cols["source_id"] = pa.array([source_id] * n, pa.large_string())
    cols["source_file"] = pa.array([source_file] * n, pa.large_string())
    cols["source_row"] = pa.array(np.asarray(source_rows, dtype=np.int64))
    return pa.table(cols, schema=schema.OBS_SCHEMA)
