"""Ingest benchmark (a script, not a test): atlasflow's Ray ingest vs serial tiledbsoma.io.from_h5ad.

    python -m atlasflow.infra.bench.ingest --cells 50000 --genes 20000 --datasets 8 [--workdir DIR]

Prints JSON: environment, cells/s and peak RSS (summed over the process tree, Ray workers included)
of each method on the same synthetic H5AD inputs, and the ratio atlasflow / from_h5ad.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _phase_atlasflow(inputs: list[str], store: str, num_cpus: int) -> dict:
    from atlasflow.ingest import ingest_paths

    t0 = time.time()
    rep = ingest_paths(store, inputs, num_cpus=num_cpus, progress=False)
    assert rep.ok, rep.failed
    return {"cells": rep.cells, "seconds": time.time() - t0}


def _phase_from_h5ad(inputs: list[str], uri: str) -> dict:
    import tiledbsoma.io as sio

    t0 = time.time()
    n = 0
    rd = sio.register_h5ads(None, inputs, measurement_name="RNA", obs_field_name="cell_id", var_field_name="feature_id")
    kw = dict(measurement_name="RNA", registration_mapping=rd, obs_id_name="cell_id", var_id_name="feature_id",
              uns_keys=[])
    # tiledbsoma's documented multi-file append: schema from the first file, prepare, then write each.
    sio.from_h5ad(uri, inputs[0], ingest_mode="schema_only", **kw)
    rd.prepare_experiment(uri)
    for path in inputs:
        sio.from_h5ad(uri, path, ingest_mode="write", **kw)
    import tiledbsoma

    with tiledbsoma.Experiment.open(uri) as exp:
        n = exp.obs.count
    return {"cells": n, "seconds": time.time() - t0}


def _run_phase(args: list[str]) -> dict:
    from atlasflow.infra.bench.util import PeakRSS

    proc = subprocess.Popen([sys.executable, "-m", "atlasflow.infra.bench.ingest", *args], stdout=subprocess.PIPE, text=True)
    with PeakRSS(pid=proc.pid) as rss:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"phase {args[:2]} failed ({proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gib"] = rss.peak_gib
    res["cells_per_s"] = round(res["cells"] / res["seconds"], 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--phase", choices=["atlasflow", "from_h5ad"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase == "atlasflow":
        print(json.dumps(_phase_atlasflow(a.inputs, a.target, a.num_cpus)))
        return 0
    if a.phase == "from_h5ad":
        print(json.dumps(_phase_from_h5ad(a.inputs, a.target)))
        return 0

    from atlasflow.infra.bench.util import environment
    from atlasflow.ingest.synth import synthesize

    work = a.workdir or tempfile.mkdtemp(prefix="atlasflow-bench-ingest-")
    src = os.path.join(work, "h5ad")
    if not glob.glob(os.path.join(src, "*.h5ad")):
        synthesize(src, a.cells, a.genes, a.datasets, seed=0, layout="h5ad")
    inputs = sorted(glob.glob(os.path.join(src, "*.h5ad")))
    results = {}
    for name in ("atlasflow", "from_h5ad"):
        target = os.path.join(work, f"store_{name}")
        shutil.rmtree(target, ignore_errors=True)
        results[name] = _run_phase(["--phase", name, "--target", target, "--num-cpus", str(a.num_cpus),
                                    "--inputs", *inputs])
    out = {
        "benchmark": "ingest",
        "bench_format_version": 1,
        "environment": environment(),
        "inputs": {"files": len(inputs), "cells": a.cells, "genes": a.genes,
                   "bytes": sum(os.path.getsize(f) for f in inputs)},
        "atlasflow_ray": results["atlasflow"],
        "tiledbsoma_from_h5ad_serial": results["from_h5ad"],
        "speedup_vs_from_h5ad": round(results["atlasflow"]["cells_per_s"] / results["from_h5ad"]["cells_per_s"], 3),
        "note": "wall time includes Ray start-up for atlasflow; peak RSS sums the whole process tree",
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
