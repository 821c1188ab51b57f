"""Resolving SOURCE arguments (file, directory, glob, or a manifest file) to source paths.

A source is an ``.h5ad`` file, a 10x ``.h5`` file, an AnnData ``.zarr`` directory, or a 10x MTX
directory (one holding ``matrix.mtx[.gz]``). A directory that is not itself a source is searched
recursively; found source directories are not searched further.
"""

from __future__ import annotations

import glob
import logging
import os

from .readers import detect_format

log = logging.getLogger(__name__)
SOURCE_SUFFIXES = (".h5ad", ".h5")


def _scan_dir(root: str) -> list[str]:
    found: list[str] = []
    for d, subdirs, files in os.walk(root):
        keep = []
        for s in sorted(subdirs):
            sp = os.path.join(d, s)
            (found.append(sp) if detect_format(sp) else keep.append(s))
        subdirs[:] = keep  # never descend into a source (zarr chunks, MTX files)
        found += [os.path.join(d, f) for f in files if f.endswith(SOURCE_SUFFIXES)]
    # Cell Ranger writes the same matrix as X.h5 and X/ (MTX): take the .h5 once.
    h5 = {p[:-3] for p in found if p.endswith(".h5")}
    dropped = [p for p in found if detect_format(p) == "10x_mtx" and p.rstrip("/") in h5]
    for p in dropped:
        log.info("%s: same matrix as %s.h5, which is ingested instead", p, p)
    return sorted(p for p in found if p not in dropped)


def resolve_sources(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (source paths, [(argument, error)]) in a stable order, without duplicates.

    A manifest file is a text file (any extension but .h5ad/.h5) listing one path per line; relative
    paths are relative to the manifest; blank lines and ``#`` comments are ignored.
    """
    paths: list[str] = []
    errors: list[tuple[str, str]] = []
    for arg in args:
        if os.path.isdir(arg):
            if detect_format(arg):
                paths.append(arg)
                continue
            found = _scan_dir(arg)
            if not found:
                errors.append((arg, "directory contains no sources (.h5ad, .h5, .zarr, 10x MTX directories)"))
            paths += found
        elif any(ch in arg for ch in "*?["):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p) or detect_format(p))
            if not found:
                errors.append((arg, "glob matched no files"))
            paths += found
        elif os.path.isfile(arg) and not arg.endswith(SOURCE_SUFFIXES):
            base = os.path.dirname(os.path.abspath(arg))
            with open(arg) as fh:
                listed = [ln.split("#", 1)[0].strip() for ln in fh]
            listed = [os.path.join(base, p) if not os.path.isabs(p) else p for p in listed if p]
            sub_paths, sub_errors = resolve_sources(listed)
            paths += sub_paths
            errors += [(f"{arg}: {a}", e) for a, e in sub_errors]
        elif os.path.exists(arg):
            paths.append(arg)
        else:
            errors.append((arg, "no such file"))
    seen, out = set(), []
    for p in paths:
        ap = os.path.abspath(p)
        if ap not in seen:
            seen.add(ap)
            out.append(ap)
    return out, errors
