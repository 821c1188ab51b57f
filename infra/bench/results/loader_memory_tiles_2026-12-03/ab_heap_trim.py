import json, os, sys, time, resource
import numpy as np
import atlasflow.loader, atlasflow.loader.kernels, atlasflow.loader.dataset as _D
_inst = []
if os.environ.get("SWITCH"): sys.setswitchinterval(float(os.environ["SWITCH"]))
from atlasflow.loader import LoaderConfig, make_loader
if os.environ.get("NOTRIM"): _D.HeapTrimmer = lambda: (lambda: None)
if os.environ.get("OLD"):
    from atlasflow.loader.memory import release_memory as _rm; _D.HeapTrimmer = lambda: _rm
if os.environ.get("KEEP"):
    import atlasflow.loader.memory as _M; _orig0 = _M.HeapTrimmer
    def _mkk():
        t = _orig0(int(os.environ["KEEP"]) << 20); _inst.append(t); return t
    _D.HeapTrimmer = _mkk
ru = lambda: resource.getrusage(resource.RUSAGE_SELF)
cpu = lambda a, b: (b.ru_utime - a.ru_utime, b.ru_stime - a.ru_stime)
if os.environ.get("PEAK"):
    from atlasflow.infra.bench.util import PeakRSS; _pk = PeakRSS().start()
_orig = _D.HeapTrimmer
def _mk(*a):
    t = _orig(*a); _inst.append(t); return t
if not (os.environ.get("OLD") or os.environ.get("NOTRIM") or os.environ.get("KEEP")): _D.HeapTrimmer = _mk
r0 = ru(); t0 = time.perf_counter()
loader = make_loader(sys.argv[1], LoaderConfig(tokenizer="rank", batch_size=32, obs_columns=("dataset_id",),
                                             **json.loads(os.environ.get("CFG", "{}"))))
r1 = ru(); t1 = time.perf_counter()
n = 0
for b in loader:
    n += len(b["lengths"])
    if n == 32: r2 = ru(); t2 = time.perf_counter()
    if n >= int(sys.argv[2]): break
r3 = ru(); t3 = time.perf_counter()
bu, bs = cpu(r0, r1); fu, fs = cpu(r1, r2); su, ss = cpu(r2, r3)
print(json.dumps({"build_s": round(t1 - t0, 2), "build_cpu": round(bu + bs, 2), "first_s": round(t2 - t1, 2),
    "first_cpu_us": round((fu + fs) / 16384 * 1e6, 1), "whole": round(n / (t3 - t0)), "steady": round((n - 32) / (t3 - t2)),
    "steady_user_us": round(su / (n - 16384) * 1e6, 1), "steady_sys_us": round(ss / (n - 16384) * 1e6, 1),
    "maxrss_mb": r3.ru_maxrss // 1024, "trims": (_inst[0].trims if _inst else None), "load1": round(os.getloadavg()[0], 2)}))
