"""On-disk formats carry versions that readers check."""

from __future__ import annotations

import json

import pytest
import tiledbsoma as soma

from atlasflow.store import Manifest, SourceEntry, StoreWriter, open_store
from atlasflow.store import schema
from atlasflow.store.manifest import MANIFEST_FORMAT_VERSION


def test_manifest_round_trip_and_version_check():
    m = Manifest()
    m.reserve(SourceEntry(source_id="a", kind="h5ad", name="a.h5ad", fingerprint="f", n_cells=5))
    m.reserve(SourceEntry(source_id="b", kind="h5ad", name="b.h5ad", fingerprint="g", n_cells=3))
    m.set_status("a", "complete")
    back = Manifest.from_json(m.to_json())
    assert back == m and back.complete_ranges() == [(0, 5)] and back.next_joinid == 8
    d = json.loads(m.to_json())
    d["format_version"] = MANIFEST_FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="manifest format_version"):
        Manifest.from_json(json.dumps(d), where="somewhere")


def test_pending_range_is_reused_not_reallocated():
    m = Manifest()
    first = m.reserve(SourceEntry(source_id="a", kind="h5ad", name="a.h5ad", fingerprint="f", n_cells=5))
    again = m.reserve(SourceEntry(source_id="a2", kind="h5ad", name="a.h5ad", fingerprint="f", n_cells=5))
    assert (again.joinid_start, again.joinid_stop) == (first.joinid_start, first.joinid_stop) == (0, 5)
    assert list(m.sources) == ["a2"] and m.next_joinid == 5


def test_reader_refuses_unknown_store_version_and_non_stores(tmp_path):
    uri = str(tmp_path / "s")
    StoreWriter(uri)
    assert open_store(uri).n_cells == 0
    with soma.Experiment.open(uri, "w") as exp:
        exp.metadata[schema.FORMAT_KEY] = schema.STORE_FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="store format_version"):
        open_store(uri)
    other = str(tmp_path / "plain")
    soma.Experiment.create(other).close()
    with pytest.raises(ValueError, match="not an atlasflow store"):
        open_store(other)


def test_stats_absent_is_a_clear_error(tmp_path):
    uri = str(tmp_path / "s")
    StoreWriter(uri)
    with pytest.raises(LookupError, match="atlasflow store stats"):
        open_store(uri).gene_stats()


def test_one_version_check_for_every_artifact():
    """store/schema.check_format is the single check: it names the place and the artifact, accepts the
    readable versions only, and every versioned reader goes through it (no hand-written comparisons)."""
    import re
    from pathlib import Path

    from atlasflow.store.schema import check_format

    check_format("manifest", 2, (1, 2), "S")
    for bad in (3, None, "x"):
        with pytest.raises(ValueError, match=r"^S: manifest format_version .* unsupported \(this atlasflow reads 1, 2\)"):
            check_format("manifest", bad, (1, 2), "S")
    root = Path(__file__).resolve().parents[1]
    hand = [f"{p.relative_to(root)}:{i}" for pkg in ("store", "ingest", "loader", "train")
            for p in (root / pkg).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"(FORMAT_VERSION|format_version|\"version\"|\.version)\W*(!=|not in)", line)]
    assert hand == []
    users = {p.name for pkg in ("store", "loader", "train") for p in (root / pkg).rglob("*.py")
             if "check_format(" in p.read_text()}
    assert {"store.py", "manifest.py", "lease.py", "stats.py", "state.py", "vocab.py", "config.py", "signals.py",
            "checkpoint.py", "finetune.py", "finetune_data.py"} <= users


def test_a_new_store_x_has_the_configured_tiling(tmp_path):
    """The X tiling the loader's reads were measured with reaches TileDB: data-tile capacity, one
    space tile per row's genes, and the filter pipelines (tiledbsoma drops unknown keys silently)."""
    from atlasflow.store.store import create_store

    uri = str(tmp_path / "s")
    create_store(uri)
    want = schema.X_PLATFORM_CONFIG["tiledb"]["create"]
    with soma.SparseNDArray.open(f"{uri}/ms/RNA/X/raw") as X:
        opts = X.schema_config_options()
        dims, attrs = json.loads(opts.dims), json.loads(opts.attrs)
    assert opts.capacity == want["capacity"] == 25_000
    assert opts.cell_order == opts.tile_order == "row-major"
    for d in ("soma_dim_0", "soma_dim_1"):
        assert int(dims[d]["tile"]) == want["dims"][d]["tile"]
    assert [f["name"] for f in dims["soma_dim_1"]["filters"]] == ["BYTESHUFFLE", "ZSTD"]
    assert [f["name"] for f in attrs["soma_data"]["filters"]] == ["BYTESHUFFLE", "ZSTD"]
    assert [f["name"] for f in dims["soma_dim_0"]["filters"]] == ["ZSTD"]
