"""Resolving SOURCE arguments (file, directory, glob, or a manifest file) to H5AD paths."""

from __future__ import annotations

import glob
import os


def resolve_sources(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (h5ad paths, [(argument, error)]) in a stable order, without duplicates.

    A manifest file is a text file (any extension but .h5ad) listing one path per line; relative
    paths are relative to the manifest; blank lines and ``#`` comments are ignored.
    """
    paths: list[str] = []
    errors: list[tuple[str, str]] = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(glob.glob(os.path.join(arg, "**", "*.h5ad"), recursive=True))
            if not found:
                errors.append((arg, "directory contains no .h5ad files"))
            paths += found
        elif any(ch in arg for ch in "*?["):
            found = sorted(glob.glob(arg, recursive=True))
            if not found:
                errors.append((arg, "glob matched no files"))
            paths += found
        elif os.path.isfile(arg) and not arg.endswith(".h5ad"):
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
