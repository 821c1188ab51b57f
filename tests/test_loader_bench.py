"""The loader benchmark runs end to end on a tiny store and prints a well-formed JSON document."""

from __future__ import annotations

import json

from atlasflow.infra.bench.loader import BENCH_FORMAT_VERSION, run

from test_loader_fixtures import synth_store


def test_bench_json_on_a_tiny_store(tmp_path_factory):
    uri = synth_store(tmp_path_factory)
    out = json.loads(json.dumps(run(uri, cells=320, batch_size=16, tokenizers=("value",), workers=(0,),
                                    with_ml=False)))
    assert out["bench_format_version"] == BENCH_FORMAT_VERSION
    scan, scan_tuned, ours, ours_tuned = out["runs"]
    for r, settings in ((scan, "store default"), (scan_tuned, "loader read threads'")):
        assert r["loader"] == "raw_sequential_scan" and r["cells_per_s"] > 0 and r["tiledb_settings"] == settings
    assert ours["loader"] == "atlasflow" and ours["tokenizer"] == "value" and ours["workers"] == 0
    assert ours["cells"] == 320  # stops at the first whole batch past the requested count
    assert 0 < ours["entropy_ratio"] <= 1.2 and 0 <= ours["pad_fraction"] < 1
    assert ours["peak_rss_gb"] > 0
    assert ours["allocator"] == "glibc default"
    # the same loader again in a process that called tune_allocator() (glibc here: all three applied)
    assert ours_tuned["loader"] == "atlasflow" and ours_tuned["cells"] == 320
    assert ours_tuned["allocator"] == {"arena_max": 1, "mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}
    assert out["summary"]["best_tuned_allocator"]["cells_per_s"] == ours_tuned["cells_per_s"]
    env = out["environment"]
    assert env["cpus"] >= 1 and env["tiledbsoma"] and env["torch"] and env["numba"]
    assert out["summary"]["best"]["cells_per_s"] == ours["cells_per_s"]
    ceiling = max(scan["cells_per_s"], scan_tuned["cells_per_s"])
    assert out["summary"]["sequential_scan_cells_per_s"] == ceiling
    assert out["summary"]["fraction_of_sequential_scan"] == round(ours["cells_per_s"] / ceiling, 3)
