"""The loader benchmark runs end to end on a tiny store and prints a well-formed JSON document."""

from __future__ import annotations

import json

from atlasflow.loader.bench import BENCH_FORMAT_VERSION, run

from test_loader_fixtures import synth_store


def test_bench_json_on_a_tiny_store(tmp_path_factory):
    uri = synth_store(tmp_path_factory)
    out = json.loads(json.dumps(run(uri, cells=320, batch_size=16, tokenizers=("value",), workers=(0,),
                                    with_ml=False)))
    assert out["bench_format_version"] == BENCH_FORMAT_VERSION
    scan, ours = out["runs"]
    assert scan["loader"] == "raw_sequential_scan" and scan["cells_per_s"] > 0
    assert ours["loader"] == "atlasflow" and ours["tokenizer"] == "value" and ours["workers"] == 0
    assert ours["cells"] == 320  # stops at the first whole batch past the requested count
    assert 0 < ours["entropy_ratio"] <= 1.2 and 0 <= ours["pad_fraction"] < 1
    assert ours["peak_rss_gb"] > 0
    env = out["environment"]
    assert env["cpus"] >= 1 and env["tiledbsoma"] and env["torch"] and env["numba"]
    assert out["summary"]["best"]["cells_per_s"] == ours["cells_per_s"]
    assert 0 < out["summary"]["fraction_of_sequential_scan"]
