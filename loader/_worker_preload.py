"""Imported by the DataLoader workers' forkserver: the loader's imports and compiled kernels (loaded
once here, shared by every worker instead of loaded in each), the tuned allocator (``memory.py``;
workers inherit it), then ``gc.freeze()``.

Workers fork from the forkserver. Freezing moves every object imported so far (torch, tiledbsoma,
numba, ...) out of the cyclic collector's reach, so a worker's collections neither walk them nor
write to their headers, which would copy the shared pages into each worker (copy-on-write).
"""

import gc

import atlasflow.loader  # noqa: F401
from atlasflow.loader import kernels, memory

memory.tune_allocator()
kernels.warm()

gc.freeze()
