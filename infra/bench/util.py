"""Shared benchmark plumbing: hardware/version header, peak RSS of a process tree, the JSON report."""

from __future__ import annotations

import json
import os
import platform
import threading


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
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def emit(report: dict, out: str | None = None) -> int:
    """Print a benchmark's JSON report (the scripts' output) and, with ``out``, write it there too."""
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


class PeakRSS:
    """Peak memory of this process (or ``pid``) and all its descendants (DataLoader / Ray workers).

    RSS counts shared pages once per process; PSS splits them between the processes sharing them
    (sampled every 10th tick: it is costlier to read). Use as a context manager, or start()/stop().
    """

    def __init__(self, interval: float = 0.05, pid: int | None = None):
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self.interval, self.peak, self.peak_pss, self._n = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except Exception:  # the process just exited
            return
        rss = pss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                if self._n % 10 == 0:
                    pss += p.memory_full_info().pss
            except Exception:
                pass
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self._n += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> "PeakRSS":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_gb": round(self.peak / 2**30, 3), "peak_pss_gb": round(self.peak_pss / 2**30, 3)}

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 3)
