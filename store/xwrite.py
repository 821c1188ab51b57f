"""Fast X writes: cells pre-sorted in TileDB global order, so TileDB need not sort them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import scipy.sparse as sp


def write_x_global_order(x, X: sp.csr_matrix, row_start: int, col_map: np.ndarray | None = None) -> None:
    """Write CSR rows as soma_joinids row_start.. to an open SparseNDArray, pre-sorted in TileDB global order.

    ``col_map`` maps CSR columns to the array's column ids (identity if None). An unordered write
    makes TileDB sort the cells itself: measured 18 s for 17M cells, versus 4.6 s with a stable
    radix argsort by (row tile, column tile) and a global-order write. A wrong order is refused by
    TileDB (never silently stored); arrays whose tile or cell order is not row-major get a plain
    unordered write. Temporaries are kept to small dtypes: this runs on chunks of ~30M cells.
    """
    n = X.shape[0]
    per_row = np.diff(X.indptr)
    cols, data = X.indices, X.data
    if col_map is not None:
        cols = col_map[cols]
        if not np.all(np.diff(col_map) > 0):  # mapped columns are no longer sorted within rows
            Y = sp.csr_matrix((data, cols, X.indptr), shape=(n, int(col_map.max()) + 1))
            Y.has_sorted_indices = False
            Y.sort_indices()
            cols, data = Y.indices, Y.data
    opts = x.schema_config_options()
    if opts.tile_order != "row-major" or opts.cell_order != "row-major" or not len(cols):
        rows = np.repeat(np.arange(row_start, row_start + n, dtype=np.int64), per_row)
        x.write(pa.table({"soma_dim_0": rows, "soma_dim_1": cols.astype(np.int64),
                          "soma_data": data.astype(np.float32, copy=False)}))
        return
    dims = json.loads(opts.dims)
    t0, t1 = int(dims["soma_dim_0"]["tile"]), int(dims["soma_dim_1"]["tile"])
    n_col_tiles = int(cols.max()) // t1 + 1
    row_tile = np.arange(row_start, row_start + n, dtype=np.int64) // t0 - row_start // t0
    dtype = np.uint16 if (int(row_tile[-1]) + 1) * n_col_tiles <= 2**16 else np.int64
    key = np.repeat((row_tile * n_col_tiles).astype(dtype), per_row)
    key += (cols // t1).astype(dtype)
    # stable: keeps row-major order inside each tile, which is TileDB's cell order (uint16: radix sort)
    order = np.argsort(key, kind="stable")
    del key
    rows = np.repeat(np.arange(row_start, row_start + n, dtype=np.int64), per_row)[order]
    table = pa.table({"soma_dim_0": rows, "soma_dim_1": cols[order].astype(np.int64),
                      "soma_data": data[order].astype(np.float32, copy=False)})
    del order, rows
    x.write(table, platform_config={"tiledb": {"write": {"sort_coords": False}}})
