"""Shared benchmark plumbing: hardware/version header and peak RSS of a process tree."""

from __future__ import annotations

import os
import platform
import threading
import time


def environment() -> dict:
    import numpy
    import pyarrow
    import tiledbsoma

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "platform": platform.platform(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
           "tiledbsoma": tiledbsoma.__version__}
    try:
        import psutil

        out["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("torch", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


class PeakRSS:
    """Sample the summed RSS of this process and all its descendants (e.g. Ray workers)."""

    def __init__(self, interval: float = 0.2, pid: int | None = None):
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except Exception:  # the process just exited
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 3)
