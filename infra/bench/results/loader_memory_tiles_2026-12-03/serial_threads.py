"""Serial read->tokenize->collate loop: 1 thread, 2 threads in one process, to find in-process contention."""
import json, os, sys, threading, time, resource
import numpy as np
from atlasflow.loader import LoaderConfig
from atlasflow.loader import plan as P
from atlasflow.loader.batching import TokenWindow, collate
from atlasflow.loader.dataset import CellStream
from atlasflow.loader.memory import tune_allocator

store, mode, cells = sys.argv[1], sys.argv[2], int(sys.argv[3])
if os.environ.get("TUNE"): tune_allocator()
cfg = LoaderConfig(tokenizer="rank", batch_size=32, obs_columns=("dataset_id",))
ds = CellStream(store, cfg)
phase, _ = ds.begin()
order = ds.epoch_order(0)
spans = P.window_spans(phase.shard_slots(0), order.window_cells)
tasks = list(ds._read_tasks(order, spans))
tok = ds._tokenizer()

def work(slot, my_tasks, out):
    reader = ds._reader(slot=slot)
    ds._tokenize(tok, 0, my_tasks[0][2], reader.read(my_tasks[0][2]))  # warm
    n = 0; pending = []
    t0 = time.perf_counter()
    for i, last, ranges in my_tasks:
        pending.append(ds._tokenize(tok, 0, ranges, reader.read(ranges)))
        if len(pending) == 16 or (i, last, ranges) == my_tasks[-1]:
            window, pending = TokenWindow(pending), []
            idx = np.random.default_rng(0).permutation(len(window))
            for j in range(0, len(idx) - 31, 32):
                collate(window, idx[j:j + 32], cfg.obs_columns)
            n += len(idx)
    out[slot] = (n, time.perf_counter() - t0)
    reader.close()

per = cells // 1024
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
out = {}
if mode == "1t":
    work(0, tasks[:per], out)
else:
    th = [threading.Thread(target=work, args=(s, tasks[s * per:(s + 1) * per], out)) for s in range(2)]
    [t.start() for t in th]; [t.join() for t in th]
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = sum(v[0] for v in out.values())
print(json.dumps({"mode": mode, "cells": n, "cells_per_s": round(n / wall), "user_us": round((r1.ru_utime - r0.ru_utime) / n * 1e6, 1),
                  "sys_us": round((r1.ru_stime - r0.ru_stime) / n * 1e6, 1), "minflt": round((r1.ru_minflt - r0.ru_minflt) / n, 2),
                  "load1": os.getloadavg()[0]}))
