"""Ingest's per-source obs cost: every block reading the whole obs (before) vs one read cut into the
blocks' slices (``ingest.pipeline._obs_blocks``, after). No Ray: the two read paths only. Prints JSON.

    python -m atlasflow.infra.bench.obs_reads --cells 1000000 --block-cells 10000 [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def make_h5ad(path: str, n: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice([f"t{i}" for i in range(30)], n)),
                        "donor_id": pd.Categorical(rng.choice([f"d{i}" for i in range(50)], n)),
                        "n_genes": rng.integers(200, 5000, n), "pct_mito": rng.random(n),
                        "note": [f"note{i % 1000}" for i in range(n)]}, index=[f"cell{i}" for i in range(n)])
    ad.AnnData(X=sp.csr_matrix((n, 10), dtype=np.float32), obs=obs).write_h5ad(path)


def main(argv=None) -> int:
    from atlasflow.infra.bench.util import environment
    from atlasflow.ingest.h5ad import read_obs
    from atlasflow.ingest.pipeline import _obs_blocks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--block-cells", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--path", default=None, help="h5ad to read (built if missing)")
    a = p.parse_args(argv)
    path = a.path or f"/tmp/atlasflow_obs_bench_{a.cells}.h5ad"
    if not os.path.exists(path):
        make_h5ad(path, a.cells)
    bounds = [(lo, min(a.cells, lo + a.block_cells)) for lo in range(0, a.cells, a.block_cells)]
    before, after = [], []
    for _ in range(a.repeats):  # interleaved
        t = time.perf_counter()
        for lo, hi in bounds:
            read_obs(path).iloc[lo:hi]
        before.append(time.perf_counter() - t)
        t = time.perf_counter()
        _obs_blocks(path, bounds)
        after.append(time.perf_counter() - t)
    out = {"cells": a.cells, "block_cells": a.block_cells, "blocks": len(bounds), "per_block_read_s": before,
           "read_once_s": after, "ratio_of_medians": statistics.median(before) / statistics.median(after),
           "environment": environment()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
