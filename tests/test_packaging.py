"""One import namespace: atlasflow.<pkg> from the folders, no bare top-level modules installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKGS = ["ingest", "store", "loader", "train", "infra"]


def test_wheel_holds_only_the_atlasflow_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("atlasflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"atlasflow", next(t for t in tops if t.endswith(".dist-info"))}
    for pkg in PKGS:
        assert f"atlasflow/{pkg}/__init__.py" in names
    # every source module travels, subpackages included (they must be listed in pyproject's packages)
    sources = {f"atlasflow/{p.relative_to(ROOT).as_posix()}" for pkg in PKGS for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources - set(names) == set()
    assert "atlasflow/train/presets/debug.toml" in names  # package data travels with the wheel
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "atlasflow = atlasflow.infra.cli:main" in entry_points


def test_imports_from_outside_the_repo(tmp_path):
    code = ("import importlib.util, atlasflow.store, atlasflow.ingest, atlasflow.loader, atlasflow.train;"
            "print(all(importlib.util.find_spec(m) is None for m in ['store', 'ingest', 'loader', 'train', 'infra']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_every_subcommand_has_help():
    from atlasflow.infra.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ["synth", "ingest", "store", "train", "quickstart"]:
        assert name in sub.choices
        assert sub.choices[name].format_help().strip()
