"""The layering rule, checked on the source: store <- {ingest, loader} <- train <- infra.

Every ``import`` of an atlasflow module anywhere in a file counts (also the ones inside functions: a
lazy import is still a dependency). A package may import its own modules and the layers below it;
ingest and loader are peers that do not import each other. Module-level imports must not form a
cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BELOW = {"store": set(), "ingest": {"store"}, "loader": {"store"}, "train": {"store", "ingest", "loader"},
         "infra": {"store", "ingest", "loader", "train"}}


def _module(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path, top_level_only: bool = False, modules: set | None = None,
            root: Path = ROOT) -> list[tuple[str, int]]:
    """(imported atlasflow module without the 'atlasflow.' prefix, line) for every import in the file.

    ``from pkg import name``: the dependency is ``pkg.name`` where that is a module (given
    ``modules``), else ``pkg`` itself.
    """
    mod = _module(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for n in nodes:
        if isinstance(n, ast.ImportFrom):
            if n.level:  # relative: resolve against this module's package
                pkg = mod.split(".") if _is_package(path) else mod.split(".")[:-1]
                base = pkg[:len(pkg) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            elif n.module and n.module.startswith("atlasflow."):
                target = n.module[len("atlasflow."):]
            else:
                continue
            for a in n.names:
                sub = f"{target}.{a.name}"
                out.append((sub if modules is not None and sub in modules else target, n.lineno))
        elif isinstance(n, ast.Import):
            out += [(a.name[len("atlasflow."):], n.lineno) for a in n.names if a.name.startswith("atlasflow.")]
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in BELOW for p in (ROOT / pkg).rglob("*.py"))


def upward_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for f in files:
        layer = f.relative_to(root).parts[0]
        for target, line in imports(f, root=root):
            top = target.split(".")[0]
            if top in BELOW and top != layer and top not in BELOW[layer]:
                bad.append(f"{f.relative_to(root)}:{line} ({layer}) imports atlasflow.{target} ({top})")
    return bad


def module_cycles(files: list[Path], root: Path = ROOT) -> list[list[str]]:
    known = {_module(f, root) for f in files}
    graph = {_module(f, root): {t for t, _ in imports(f, True, known, root) if t in known and t != _module(f, root)}
             for f in files}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_no_upward_or_sideways_import():
    files = sources()
    assert len(files) > 50
    assert upward_imports(files) == []


def test_no_module_level_import_cycle():
    assert module_cycles(sources()) == []


@pytest.mark.parametrize("layer,line,expect", [
    ("store", "from atlasflow.train.config import Config", True),
    ("loader", "from atlasflow.ingest import ingest_paths", True),  # peers
    ("ingest", "    from ..infra import cli", True),  # relative, inside a function
    ("train", "from atlasflow.loader import make_loader", False),
    ("store", "from .schema import X", False),
])
def test_the_check_catches_an_upward_import(tmp_path, layer, line, expect):
    """The checker itself, on a planted file in a tree of the same shape (the checkout is not touched)."""
    planted = tmp_path / layer / "_layer_probe.py"
    planted.parent.mkdir()
    planted.write_text(f"def f():\n    pass\n\n\n{line}\n" if not line.startswith(" ") else f"def f():\n{line}\n")
    bad = upward_imports([planted], root=tmp_path)
    assert bool(bad) is expect, bad


def test_the_check_catches_a_cycle(tmp_path):
    (tmp_path / "store").mkdir()
    a, b = tmp_path / "store" / "_cycle_a.py", tmp_path / "store" / "_cycle_b.py"
    a.write_text("from . import _cycle_b\n")
    b.write_text("from atlasflow.store import _cycle_a\n")
    cyc = module_cycles([a, b], root=tmp_path)
    assert cyc and set(cyc[0]) == {"store._cycle_a", "store._cycle_b"}
