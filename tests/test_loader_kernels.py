"""kernels.warm() compiles exactly the signatures the loader uses: after it, streaming a store in any
tokenizer compiles nothing new (so an image that ran warm() never compiles on a first batch)."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.loader import kernels as K
from atlasflow.loader.encodings import ENCODINGS, NAMES
from atlasflow.loader.encodings._sequence import seq_tokens
from atlasflow.loader.encodings.rank import rank_tokens

from test_loader_fixtures import real_store

KERNELS = tuple({k.py_func.__name__: k for e in ENCODINGS.values() for k in e.kernels}.values()) + \
    (K.csr_from_coo_rows, K.cols_sorted_within_rows, K.scatter_rows)


def test_warm_covers_every_signature_the_loader_uses(tmp_path_factory):
    uri, _, _ = real_store(tmp_path_factory)  # has gene stats: the rank tokenizer runs too
    K.warm()
    before = {k.py_func.__name__: set(k.signatures) for k in KERNELS}
    for tok in NAMES:
        for batch in make_loader(uri, LoaderConfig(tokenizer=tok, batch_size=20, window_cells=80, read_cells=40,
                                                   chunk_cells=16)):
            assert len(batch["soma_joinid"]) == 20
    after = {k.py_func.__name__: set(k.signatures) for k in KERNELS}
    assert after == before
    assert all(before.values())


_ONE_TOKENIZER = """
import sys
from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.loader import kernels as K
from atlasflow.loader.encodings import ENCODINGS, NAMES
kernels = tuple({k.py_func.__name__: k for e in ENCODINGS.values() for k in e.kernels}.values()) + \
    (K.csr_from_coo_rows, K.cols_sorted_within_rows, K.scatter_rows)
for tok in NAMES:
    K.warm(tok)
    before = {k.py_func.__name__: set(k.signatures) for k in kernels}
    for batch in make_loader(sys.argv[1], LoaderConfig(tokenizer=tok, batch_size=20, window_cells=80,
                                                       read_cells=40, chunk_cells=16)):
        pass
    after = {k.py_func.__name__: set(k.signatures) for k in kernels}
    assert after == before, (tok, {k: after[k] - before[k] for k in after})
print("ok")
"""


def test_warm_one_tokenizer_covers_what_its_loader_uses(tmp_path_factory):
    """The in-process loader loads only its tokenizer's kernels (while obs is read): in a fresh process,
    warm(tok) then streaming tok compiles nothing new, for each tokenizer in turn."""
    import subprocess
    import sys

    uri, _, _ = real_store(tmp_path_factory)
    p = subprocess.run([sys.executable, "-c", _ONE_TOKENIZER, uri], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def _reference_indptr(dim0, ids):
    """Straightforward CSR row pointers over ``ids``: count the entries of each requested row."""
    pos = {int(j): r for r, j in enumerate(ids)}
    rows = np.array([pos[int(d)] for d in dim0], dtype=np.int64)
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("shuffled", [False, True])
def test_csr_from_coo_rows_matches_a_direct_count(contiguous, shuffled):
    rng = np.random.default_rng(7)
    ids = np.arange(100, 140) if contiguous else np.sort(rng.choice(10_000, 40, replace=False))
    per_row = rng.integers(0, 6, len(ids))  # some rows are empty
    dim0 = np.repeat(ids, per_row).astype(np.int64)
    cols = np.concatenate([np.sort(rng.choice(50, k, replace=False)) for k in per_row]).astype(np.int32)
    if shuffled:
        o = rng.permutation(len(dim0))
        dim0, cols = dim0[o], cols[o]
    indptr, grouped = K.csr_from_coo_rows(dim0, ids.astype(np.int64), contiguous)
    want_indptr = _reference_indptr(dim0, ids)
    np.testing.assert_array_equal(indptr, want_indptr)
    assert grouped == (not shuffled)


@pytest.mark.parametrize("contiguous", [True, False])
def test_csr_from_coo_rows_refuses_a_row_that_was_not_requested(contiguous):
    ids = np.array([10, 11, 12], dtype=np.int64) if contiguous else np.array([10, 12, 14], dtype=np.int64)
    for bad in (9, 13 if not contiguous else 15, 99):
        dim0 = np.array([10, 10, bad], dtype=np.int64)
        with pytest.raises(ValueError, match="not requested"):
            K.csr_from_coo_rows(dim0, ids, contiguous)


def _block(rows):
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    vals = np.concatenate(rows).astype(np.float32)
    cols = np.concatenate([np.arange(len(r)) for r in rows]).astype(np.int32)
    return indptr, cols, vals


@pytest.mark.parametrize("kind", ["counts", "all_equal", "one_gene", "huge_counts", "fractional"])
def test_bin_kernel_equals_numpy_quantile_and_digitize(kind):
    """Both ways the kernel bins a cell (histogram of integral counts, sort of anything else) give
    np.digitize(v, np.quantile(v, linspace(0, 1, n_bins - 1)))."""
    rng = np.random.default_rng(3)
    n_bins, rows = 51, []
    for _ in range(40):
        m = int(rng.integers(1, 300))
        if kind == "counts":
            r = rng.geometric(0.3, m) + rng.integers(0, 2, m) * rng.integers(0, 200, m)
        elif kind == "all_equal":
            r = np.full(m, 7)
        elif kind == "one_gene":
            r = rng.integers(1, 50, 1)
        elif kind == "huge_counts":
            r = rng.integers(1, 10**6, m)
        else:
            r = rng.gamma(1.0, 3.0, m) + 0.01
        rows.append(r)
    indptr, cols, vals = _block(rows)
    lut = np.arange(400, dtype=np.int32) + 4
    _, ids, bins, _, _ = seq_tokens(indptr, cols, vals, lut, np.arange(len(rows), dtype=np.int64), np.uint64(1),
                                      10_000, 2, np.linspace(0, 1, n_bins - 1), True)
    off = 0
    for r in rows:
        v = np.asarray(r, dtype=np.float32).astype(np.float64)
        want = np.digitize(v, np.quantile(v, np.linspace(0, 1, n_bins - 1)))
        np.testing.assert_array_equal(bins[off + 1: off + 1 + len(r)], want)
        off += len(r) + 1


@pytest.mark.parametrize("spread", ["uniform", "one_bucket", "duplicates"])
def test_kth_smallest_hash_equals_a_sort(spread):
    rng = np.random.default_rng(11)
    for _ in range(30):
        m = int(rng.integers(1, 400))
        h = rng.integers(0, 2**63, m, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, m, dtype=np.uint64)
        if spread == "one_bucket":  # same top 11 bits: the whole input lands in one bucket
            h = (h >> np.uint64(11)) | np.uint64(0xABC << 52)
        elif spread == "duplicates":
            h = rng.choice(h[: max(1, m // 4)], m)
        k = int(rng.integers(1, m + 1))
        thr, at = K._kth_smallest_hash(h.copy(), m, k, np.empty(2049, dtype=np.int64), np.empty(m, dtype=np.uint64))
        s = np.sort(h)
        assert thr == s[k - 1]
        assert at == int((s[:k] == s[k - 1]).sum())


@pytest.mark.parametrize("spread", [1e-9, 1e-6, 1e-3, 1.0])
def test_rank_kernel_orders_nearly_equal_values_exactly(spread):
    """Genes whose y differ only far below float32 precision, or not at all: the order is still y
    descending (float64), then ascending gene id, as a plain sort computes it."""
    rng = np.random.default_rng(5)
    n_genes, rows = 600, []
    med = 1.0 + rng.integers(0, 4, n_genes) * spread * rng.random(n_genes)
    for _ in range(20):
        g = np.sort(rng.choice(n_genes, int(rng.integers(1, n_genes)), replace=False))
        rows.append((g, rng.integers(1, 4, len(g)).astype(np.float32)))
    indptr = np.concatenate([[0], np.cumsum([len(g) for g, _ in rows])]).astype(np.int64)
    cols = np.concatenate([g for g, _ in rows]).astype(np.int32)
    vals = np.concatenate([v for _, v in rows])
    lut = np.arange(n_genes, dtype=np.int32) + 4
    offsets, ids, _ = rank_tokens(indptr, cols, vals, lut, med, 10_000, 2, 3)
    for i, (g, v) in enumerate(rows):
        x = v.astype(np.float64)
        y = x / x.sum() * 1e4 / med[g]
        want = [4 + int(g[k]) for k in sorted(range(len(g)), key=lambda k: (-y[k], g[k]))]
        np.testing.assert_array_equal(ids[offsets[i] + 1: offsets[i + 1] - 1], want)


def test_tune_allocator_takes_effect_and_the_stream_is_unchanged(tmp_path_factory):
    """In a fresh process: glibc accepts every setting (mallopt returns 1), and the batches under the
    tuned allocator are byte-identical to those of a default process (same seed)."""
    import subprocess
    import sys

    uri, _, _ = real_store(tmp_path_factory)
    script = """
import hashlib, json, sys
from atlasflow.loader import LoaderConfig, make_loader, tune_allocator
applied = tune_allocator() if sys.argv[2] == "tuned" else {}
h, n = hashlib.sha256(), 0
for b in make_loader(sys.argv[1], LoaderConfig(tokenizer="value", batch_size=20, window_cells=80, read_cells=40,
                                               chunk_cells=16)):
    n += 1
    for k in sorted(b):
        h.update(k.encode()); h.update(b[k].numpy().tobytes())
print(json.dumps({"applied": applied, "digest": h.hexdigest(), "batches": n}))
"""
    out = {}
    for mode in ("default", "tuned"):
        p = subprocess.run([sys.executable, "-c", script, uri, mode], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out[mode] = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    assert out["tuned"]["applied"] == {"arena_max": 1, "mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}
    assert out["tuned"]["digest"] == out["default"]["digest"]
    assert out["tuned"]["batches"] == out["default"]["batches"] > 0


@pytest.mark.parametrize("n_blocks", [1, 5])
def test_collate_pads_each_cell_of_a_multi_block_window_like_numpy(n_blocks):
    """A batch whose cells sit in any order across the window's blocks: every row is the cell's own
    tokens (ids, values, bins) then zeros, the mask marks exactly its length, labels follow the cells."""
    from atlasflow.loader.batching import TokenWindow, collate
    from atlasflow.loader.tokenize import TokenBlock

    rng = np.random.default_rng(n_blocks)
    blocks, cells = [], []
    for b in range(n_blocks):
        lens = rng.integers(1, 40, size=int(rng.integers(3, 9)))
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = rng.integers(1, 1000, off[-1]).astype(np.int32)
        vals = rng.random(off[-1]).astype(np.float32)
        bins = rng.integers(0, 50, off[-1]).astype(np.int16)
        j0 = 100 * b
        lab = rng.integers(0, 7, len(lens))
        blocks.append(TokenBlock(off, ids, np.arange(j0, j0 + len(lens)), vals, bins, {"dataset_id": lab}))
        cells += [(j0 + i, ids[off[i]:off[i + 1]], vals[off[i]:off[i + 1]], bins[off[i]:off[i + 1]], lab[i])
                  for i in range(len(lens))]
    window = TokenWindow(blocks)
    idx = rng.permutation(len(window))[: max(1, len(window) - 2)]
    out = collate(window, idx, ("dataset_id",))
    L = max(len(cells[i][1]) for i in idx)
    assert out["input_ids"].shape == (len(idx), L)
    for row, i in enumerate(idx):
        joinid, ids, vals, bins, lab = cells[i]
        n = len(ids)
        assert int(out["soma_joinid"][row]) == joinid and int(out["obs.dataset_id"][row]) == lab
        assert int(out["lengths"][row]) == n
        np.testing.assert_array_equal(out["input_ids"][row].numpy(), np.pad(ids.astype(np.int64), (0, L - n)))
        np.testing.assert_array_equal(out["values"][row].numpy(), np.pad(vals, (0, L - n)))
        np.testing.assert_array_equal(out["bins"][row].numpy(), np.pad(bins.astype(np.int64), (0, L - n)))
        np.testing.assert_array_equal(out["attention_mask"][row].numpy(), np.arange(L) < n)
    empty = collate(window, np.array([], dtype=np.int64), ("dataset_id",))
    assert empty["input_ids"].shape == (0, 0)


def test_heap_trimmer_keeps_free_heap_up_to_its_budget_and_returns_the_rest():
    """In a fresh process, with real freed heap: under the budget the pages stay resident (no trim),
    over it they go back to the OS; keep=0 trims at every call."""
    import subprocess
    import sys

    script = """
import json
import numpy as np
from atlasflow.loader.memory import HeapTrimmer, resident_bytes

def churn():  # ~320 MB of 64 KB heap chunks, touched, then freed but for the last one (pins the heap top)
    chunks = [np.ones(8000) for _ in range(5000)]
    last = chunks.pop()
    del chunks
    return last

MB = 1 << 20
out, pins = {}, [churn()]
t = HeapTrimmer(keep=1 << 30)
out["first"] = t()                      # the first call trims and sets the floor
floor = resident_bytes()
pins.append(churn())
grown = resident_bytes()
out["grown_mb"] = (grown - floor) // MB
out["under_budget"] = t()               # ~320 MB over the floor, budget 1 GB: kept
out["kept_mb"] = (resident_bytes() - floor) // MB
t.keep = 64 * MB
out["over_budget"] = t()                # over a 64 MB budget: trimmed
out["after_trim_mb"] = (resident_bytes() - floor) // MB
every = HeapTrimmer(keep=0)
out["keep0"] = [every(), every()]
out["trims"] = [t.trims, every.trims]
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    assert out["first"] is True
    assert out["grown_mb"] >= 250, out          # the churn left its pages resident
    assert out["under_budget"] is False and out["kept_mb"] >= 250, out
    assert out["over_budget"] is True and out["after_trim_mb"] <= 64, out
    assert out["keep0"] == [True, True] and out["trims"] == [2, 2], out
