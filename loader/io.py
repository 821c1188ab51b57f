"""Grouped chunk reads from the pinned snapshot, and a background prefetch thread.

One TileDB read per group of chunks (sorted point coordinates, or one slice when the group is a
single range); TileDB releases the GIL while reading, so the thread overlaps I/O with the
tokenization and collation of the previous group.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from atlasflow.store.schema import MEASUREMENT, X_LAYER
from atlasflow.store.store import read_context

from .kernels import cols_sorted_within_rows, csr_from_coo_rows


class BlockReader:
    """Reads cells (X rows as CSR + obs label codes) by joinid ranges. Opens lazily, once per process."""

    def __init__(self, locator, obs_columns: tuple[str, ...] = (), categories: dict | None = None,
                 slot: int | None = None):
        self.locator, self.slot = locator, slot  # slot: this read thread's own TileDB context
        self.obs_columns = tuple(obs_columns)
        self.categories = categories or {}
        self._value_sets: dict[str, pa.Array] = {}
        self._exp = None

    def _open(self):
        if self._exp is None:
            self._exp = self.locator.open(context=None if self.slot is None else read_context(self.slot))
            self._X = self._exp.ms[MEASUREMENT].X[X_LAYER]
        return self._exp

    def close(self):
        if self._exp is not None:
            self._exp.close()
            self._exp = None

    def __getstate__(self):  # handles never cross processes
        d = dict(self.__dict__)
        d["_exp"], d["_value_sets"] = None, {}
        d.pop("_X", None)
        return d

    def read(self, ranges: list[tuple[int, int]]):
        """-> (joinids sorted unique, indptr, cols, vals, labels); rows follow ``joinids``."""
        exp = self._open()
        parts = [np.arange(a, b, dtype=np.int64) for a, b in ranges]
        ids = np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0]
        if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
            ids = ids[np.concatenate([[True], ids[1:] != ids[:-1]])]
        contiguous = len(ids) == 0 or int(ids[-1]) - int(ids[0]) + 1 == len(ids)
        coords = (slice(int(ids[0]), int(ids[-1])),) if contiguous and len(ids) else (ids,)
        tbl = self._X.read(coords=coords).tables().concat()
        dim0 = tbl["soma_dim_0"].to_numpy()
        cols = tbl["soma_dim_1"].to_numpy().astype(np.int32)  # 20 -> 8 bytes per nonzero once the table goes
        vals = tbl["soma_data"].to_numpy()
        del tbl
        indptr, grouped = csr_from_coo_rows(dim0, ids, contiguous)
        if not (grouped and cols_sorted_within_rows(indptr, cols)):  # TileDB may return unordered cells
            o = np.lexsort((cols, np.searchsorted(ids, dim0)))  # CSR needs (row, col) order
            cols, vals = cols[o], vals[o]
        labels = self._labels(exp, coords, ids) if self.obs_columns else {}
        return ids, indptr, cols, vals, labels

    def _labels(self, exp, coords, ids) -> dict[str, np.ndarray]:
        """Codes into ``categories`` (built by ``query.obs_labels`` from Arrow's string cast of
        the column, so non-string columns are cast the same way here); -1 only if a row is missing."""
        tbl = exp.obs.read(coords=coords, column_names=["soma_joinid", *self.obs_columns]).concat()
        at = np.searchsorted(ids, tbl["soma_joinid"].to_numpy())
        out = {}
        for c in self.obs_columns:
            if c not in self._value_sets:
                self._value_sets[c] = pa.array(self.categories[c], type=pa.large_string())
            col = tbl[c]
            if col.type != pa.large_string():
                col = pc.cast(col, pa.large_string())
            codes = np.full(len(ids), -1, dtype=np.int64)
            codes[at] = pc.index_in(col, value_set=self._value_sets[c]).fill_null(-1).to_numpy()
            out[c] = codes
        return out


_DONE, _ERR, _FUT = 1, 2, 3
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all():  # a thread still inside TileDB at interpreter exit aborts the process
    for pf in list(_LIVE):
        pf.close()


class Prefetcher:
    """Yields ``fn(task)`` for each task, in task order, computed in the background at most
    ``depth`` ahead, on a pool of ``threads`` threads (a feeder thread submits the tasks). TileDB
    and the numba kernels release the GIL, so two threads keep both cores of a small machine busy.
    ``close()`` waits for every running task: no thread may be left inside TileDB when the caller
    closes its handles (that aborts the process)."""

    def __init__(self, tasks, fn, depth: int, threads: int = 1):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="atlasflow-io")
        self._thread = threading.Thread(target=self._run, args=(iter(tasks), fn), daemon=True,
                                        name="atlasflow-prefetch")
        self._thread.start()
        _LIVE.add(self)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, tasks, fn):
        try:
            for task in tasks:
                if self._stop.is_set() or not self._put((_FUT, self._pool.submit(fn, task))):
                    return
            self._put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((_ERR, exc))

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                kind, item = self._q.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if kind == _FUT:
            try:
                return item.result()
            except BaseException:
                self.close()
                raise
        if kind == _ERR:
            self.close()
            raise item
        raise StopIteration

    def close(self):
        self._stop.set()
        while True:
            try:
                kind, item = self._q.get_nowait()
                if kind == _FUT:
                    item.cancel()
            except queue.Empty:
                break
        self._thread.join(timeout=5)  # the feeder only submits: it stops within one queue timeout
        self._pool.shutdown(wait=True, cancel_futures=True)
