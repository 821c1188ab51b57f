import time, numpy as np, json, sys
import atlasflow.loader
from atlasflow.store import open_store
from atlasflow.store.store import read_context
from atlasflow.store.schema import MEASUREMENT, X_LAYER
Xs, keep = {}, []
for i, c in enumerate(sys.argv[1:]):
    st = open_store(f"/tmp/cap{c}"); e = st.locator.open(context=read_context(i)); keep.append(e); Xs[c] = e.ms[MEASUREMENT].X[X_LAYER]
N = 50000
res = {f"{c}/{k}": [] for k in (256, 512, 1024) for c in Xs}
for rep in range(5):
  for k in (256, 512, 1024):
    for c, X in Xs.items():
        rng = np.random.default_rng(rep)
        t0 = time.process_time()
        for _ in range(10):
            starts = np.sort(rng.choice(N // k, 1024 // k, replace=False) * k)
            X.read(coords=(np.concatenate([np.arange(a, a + k) for a in starts]),)).tables().concat()
        res[f"{c}/{k}"].append(round((time.process_time() - t0) / (10 * 1024) * 1e6, 1))
print(json.dumps(res))
print(json.dumps({k: float(np.median(v)) for k, v in res.items()}))
