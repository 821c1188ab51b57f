"""Malformed real files: each gets a clear error naming the file and field; the good ones still
ingest; the manifest records the failures; nothing half-written is visible; re-running adds nothing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from atlasflow.infra.cli import main as cli_main
from atlasflow.store import FAILED, open_store
from h5ad_factory import make_counts, write_h5ad


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    write_h5ad(d / "good_ids.h5ad", n_cells=150, seed=1, by="id")
    write_h5ad(d / "good_symbols.h5ad", n_cells=120, seed=2, by="symbol", gene_offset=100)
    (d / "empty.h5ad").write_bytes(b"")
    (d / "corrupt.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(0).bytes(4000))
    m = make_counts(50, 300, seed=3)
    m.data[5] = np.nan
    write_h5ad(d / "nan_counts.h5ad", counts=m, seed=3)
    m = make_counts(50, 300, seed=4)
    m.data[7] = -2
    write_h5ad(d / "negative_counts.h5ad", counts=m, seed=4)
    m = make_counts(50, 300, seed=5)
    m.data = m.data / 3.0
    write_h5ad(d / "normalized_counts.h5ad", counts=m, seed=5)
    write_h5ad(d / "dup_genes.h5ad", n_cells=40, seed=6)
    with h5py.File(d / "dup_genes.h5ad", "r+") as f:  # make two var names identical
        idx = f["var"][f["var"].attrs["_index"]]
        idx[1] = idx[0]
    a = write_h5ad(d / "unmappable.h5ad", n_cells=30, seed=7, by="symbol")
    with h5py.File(d / "unmappable.h5ad", "r+") as f:
        idx = f["var"][f["var"].attrs["_index"]]
        idx[...] = np.array([f"NOT_A_GENE_{i}".encode() for i in range(a.n_vars)], dtype=idx.dtype)
    write_h5ad(d / "no_cell_type.h5ad", n_cells=30, seed=8)
    with h5py.File(d / "no_cell_type.h5ad", "r+") as f:
        del f["obs"]["cell_type"]
        order = [c for c in f["obs"].attrs["column-order"] if c != "cell_type"]
        f["obs"].attrs["column-order"] = np.array(order, dtype=object)
    return d


EXPECTED = {  # file -> (field named in the error, words in the reason)
    "empty.h5ad": ("file", "empty"),
    "corrupt.h5ad": ("file", "not a readable"),
    "nan_counts.h5ad": ("X", "NaN"),
    "negative_counts.h5ad": ("X", "negative"),
    "normalized_counts.h5ad": ("X", "not integer"),
    "dup_genes.h5ad": ("var.index", "duplicate gene IDs"),  # refused under --duplicate-genes error only
    "unmappable.h5ad": ("var.index", "no gene maps"),
    "no_cell_type.h5ad": ("obs.cell_type", "missing"),
}


def test_bad_sources_fail_clearly_good_ones_ingest(sources, tmp_path, ray_session, capsys):
    store_uri = str(tmp_path / "store")
    rc = cli_main(["ingest", "--store", store_uri, str(sources), "--require-obs", "cell_type", "--no-progress",
                   "--duplicate-genes", "error"])
    err = capsys.readouterr().err
    assert rc == 1
    for name, (fld, reason) in EXPECTED.items():
        line = next(ln for ln in err.splitlines() if ln.startswith("FAILED") and name in ln)
        assert f"{name}: {fld}:" in line and reason in line, line

    store = open_store(store_uri)
    complete = {e.name: e for e in store.manifest.complete()}
    assert set(complete) == {"good_ids.h5ad", "good_symbols.h5ad"}
    failed = {e.name: e.error for e in store.manifest.sources.values() if e.status == FAILED}
    assert set(failed) == set(EXPECTED)
    # Nothing from failed sources is visible, and the good ones hold exactly their cells.
    obs = store.obs(["source_file", "source_row"])
    assert obs.source_file.value_counts().to_dict() == {"good_ids.h5ad": 150, "good_symbols.h5ad": 120}
    with store.experiment() as exp:
        n_obs_rows = exp.obs.count
    assert n_obs_rows == 270  # failed sources never wrote a row (validated before any write)

    # Re-running the same ingest adds nothing twice and still reports the bad files.
    rc = cli_main(["ingest", "--store", store_uri, str(sources), "--require-obs", "cell_type", "--no-progress",
                   "--duplicate-genes", "error"])
    assert rc == 1
    store2 = open_store(store_uri)
    assert store2.n_cells == 270
    assert sorted(store2.obs(["source_file"]).source_file.value_counts()) == [120, 150]


def test_normalized_flag_accepts_and_marks(sources, tmp_path, ray_session):
    from atlasflow.ingest import ingest_paths

    uri = str(tmp_path / "norm")
    rep = ingest_paths(uri, [str(sources / "normalized_counts.h5ad")], allow_normalized=True, progress=False)
    assert rep.ok
    (entry,) = open_store(uri).manifest.complete()
    assert entry.normalized is True


def test_pretraining_refuses_a_store_with_normalized_sources(sources, tmp_path, ray_session):
    from atlasflow.ingest import ingest_paths
    from atlasflow.train import load_preset
    from atlasflow.train.trainer import resolve

    uri = str(tmp_path / "mixed")
    assert ingest_paths(uri, [str(sources / "good_ids.h5ad")], progress=False).ok
    resolve(load_preset("debug").with_overrides({"data.store": uri}))  # raw counts only: accepted
    assert ingest_paths(uri, [str(sources / "normalized_counts.h5ad")], allow_normalized=True, progress=False).ok
    with pytest.raises(ValueError, match="normalized_counts.h5ad"):
        resolve(load_preset("debug").with_overrides({"data.store": uri}))


def test_sources_resolve_from_dirs_globs_and_manifest_files(tmp_path):
    from atlasflow.ingest.sources import resolve_sources

    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.h5ad", "d/sub/b.h5ad", "c.h5ad"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "sources.txt"
    listing.write_text("# my atlas\nc.h5ad\n\nd/sub/b.h5ad  # again\nmissing.h5ad\n")
    paths, errors = resolve_sources([str(tmp_path / "d"), str(tmp_path / "*.h5ad"), str(listing),
                                     str(tmp_path / "nope" / "*.h5ad")])
    assert paths == [str(tmp_path / "d/a.h5ad"), str(tmp_path / "d/sub/b.h5ad"), str(tmp_path / "c.h5ad")]
    assert [e for _, e in errors] == ["no such file", "glob matched no files"]
    assert "missing.h5ad" in errors[0][0]
