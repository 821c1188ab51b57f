"""Fast X writes: cells pre-sorted in TileDB global order, so TileDB need not sort them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa


def write_x_global_order(x, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, row_major: bool = True) -> None:
    """Write COO cells to an open SparseNDArray, pre-sorted in TileDB global order.

    ``row_major``: the caller guarantees the cells are sorted by (row, col), as CSR order is.

    An unordered write makes TileDB sort the cells itself: measured 18 s for 17M cells, versus
    4.6 s with a stable argsort by (row tile, column tile) and a global-order write. A wrong order
    is refused by TileDB (never silently stored), and arrays whose tile or cell order is not
    row-major get a plain unordered write.
    """
    table = {"soma_dim_0": np.asarray(rows, dtype=np.int64), "soma_dim_1": np.asarray(cols, dtype=np.int64),
             "soma_data": np.asarray(vals).astype(np.float32, copy=False)}
    opts = x.schema_config_options()
    if opts.tile_order != "row-major" or opts.cell_order != "row-major" or not len(rows):
        x.write(pa.table(table))
        return
    if not row_major:
        rm = np.lexsort((table["soma_dim_1"], table["soma_dim_0"]))
        table = {k: v[rm] for k, v in table.items()}
    rows, cols = table["soma_dim_0"], table["soma_dim_1"]
    dims = json.loads(opts.dims)
    t0, t1 = int(dims["soma_dim_0"]["tile"]), int(dims["soma_dim_1"]["tile"])
    n_col_tiles = int(cols.max()) // t1 + 1
    key = (rows // t0 - rows[0] // t0) * n_col_tiles + cols // t1
    # stable: keeps row-major order inside each tile, which is TileDB's cell order
    order = np.argsort(key.astype(np.uint16) if key.max() < 2**16 else key, kind="stable")
    table = {k: v[order] for k, v in table.items()}
    x.write(pa.table(table), platform_config={"tiledb": {"write": {"sort_coords": False}}})
