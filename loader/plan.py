"""The epoch order: a pure function of (config, epoch, query snapshot), independent of the number of
ranks and DataLoader workers; ranks and workers only take contiguous slices of it.

Cells are addressed by query position (see ``runs.py``). One epoch:

1. cut the query into chunks of ``chunk_cells`` consecutive cells (never across a stratum or
   balance-group boundary when those are given);
2. with balancing, draw each group's quota of cells (below) as whole chunks;
3. order the chunks: a stratified random permutation (every stratum, e.g. dataset, is spread
   evenly over the epoch, so any stretch of consecutive chunks holds the strata in proportion);
4. lay the ordered chunks end to end (the epoch's *sequence*, N cells) and cut it into windows of
   U = ``window_batches * batch_size`` cells (the last one shorter). Window w is read and tokenized
   as a whole and permuted by a generator seeded with (seed, epoch, w) alone; with length bucketing
   its batches are cut from that permutation by the same seeded rule. That permuted window is the
   window's *order*, and the epoch order is the windows' orders laid end to end: N *slots*, slot p
   being the cell at place p - wU of window w = p // U's order.

Nothing of this depends on the world size or the worker count. A *phase* (one run of the loader on
S = world_size x num_workers shards) takes a sorted list of disjoint slot intervals (the whole epoch
[0, N) at first; after a resume, what the previous phase left), lays them end to end (M slots) and
gives shard s = rank * num_workers + worker the contiguous slots [s*T, (s+1)*T) with
T = n_batches * batch_size: with ``remainder="drop"`` n_batches = (M // S) // batch_size and the last
M - S*T slots (< S * batch_size + S) are skipped if the phase runs to the end; with ``"pad"`` shard s
gets [sM/S, (s+1)M/S) topped up with its own first slots. A shard's batches are consecutive runs of
batch_size slots, so after k batches a shard has consumed exactly its first k * batch_size slots: the
loader state is that count (one integer per rank, equal on every rank in data-parallel training),
and what is left of the epoch is again a list of slot intervals, ready to be cut for any S.

Balancing (``balance_by``, ``alpha``): an epoch still has N cells (the query size). Group g gets
round(N * n_g^alpha / sum_h n_h^alpha) cells (largest remainder): whole passes over its shuffled
chunks, then a random subset of chunks for the rest. alpha=1 reproduces natural frequencies;
alpha=0 gives every group the same number of cells per epoch (small groups repeat, large
groups are subsampled, with a fresh subset every epoch).

Index memory is O(chunks), never O(cells): at 100M cells and chunk_cells=512 the epoch's sequence
is 195k pieces (3 MB), computed in each worker; a phase is a handful of intervals per resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasflow.store.runs import Labels

from .batching import batch_indices

_TAG_CHUNKS, _TAG_BALANCE, _TAG_WINDOW, _TAG_BUCKET = 0xC4, 0xBA, 0x5E, 0xB0


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def chunk_pieces(n_cells: int, chunk_cells: int, labels: Labels | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, stops, codes): chunks of <= chunk_cells that never cross a label segment."""
    if labels is None:
        starts = np.arange(0, n_cells, chunk_cells, dtype=np.int64)
        return starts, np.minimum(starts + chunk_cells, n_cells), np.zeros(len(starts), dtype=np.int32)
    seg_lo, seg_hi = labels.bounds[:-1], labels.bounds[1:]
    per = -(-(seg_hi - seg_lo) // chunk_cells)
    seg = np.repeat(np.arange(len(seg_lo)), per)
    k = np.arange(len(seg)) - np.repeat(np.cumsum(per) - per, per)
    starts = seg_lo[seg] + k * chunk_cells
    stops = np.minimum(starts + chunk_cells, seg_hi[seg])
    return starts, stops, labels.codes[seg].astype(np.int32)


def stratified_order(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order in which every code's items are evenly spread (systematic sampling):
    item j of code c (in a random order within c) gets key (j + u_c) / n_c, u_c ~ U(0, 1)."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    perm = rng.permutation(n)
    n_codes = int(codes.max()) + 1
    u = rng.random(n_codes)
    by_code = perm[np.argsort(codes[perm], kind="stable")]
    c = codes[by_code]
    counts = np.bincount(codes, minlength=n_codes)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    j = np.arange(n) - first[c]
    key = np.empty(n)
    key[by_code] = (j + u[c]) / counts[c]
    return np.argsort(key, kind="stable")


def balanced_pieces(starts, stops, codes, n_total: int, alpha: float, rng: np.random.Generator):
    """Draw each group's quota of cells as whole chunks (see module doc). Returns pieces + codes."""
    n_codes = int(codes.max()) + 1 if len(codes) else 0
    sizes = np.bincount(codes, weights=stops - starts, minlength=n_codes).astype(np.int64)
    present = sizes > 0
    w = np.where(present, np.power(sizes.astype(np.float64), alpha, where=present, out=np.zeros(n_codes)), 0.0)
    exact = w / w.sum() * n_total
    quota = np.floor(exact).astype(np.int64)
    short = n_total - int(quota.sum())
    if short:  # largest remainder, ties by group code: deterministic
        quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    out_s, out_e, out_c = [], [], []
    for g in np.flatnonzero(present):  # a loop over groups, not cells
        idx = np.flatnonzero(codes == g)
        s, e = starts[idx], stops[idx]
        left = int(quota[g])
        while left > 0:
            p = rng.permutation(len(idx))
            cum = np.cumsum((e - s)[p])
            k = int(np.searchsorted(cum, left, side="left"))
            take = p if k >= len(p) else p[: k + 1]  # a whole pass, or the chunks that reach the quota
            ss, ee = s[take].copy(), e[take].copy()
            if k < len(p):
                ee[-1] = ss[-1] + left - (int(cum[k - 1]) if k else 0)
            out_s.append(ss), out_e.append(ee), out_c.append(np.full(len(ss), g, dtype=np.int32))
            left -= int((ee - ss).sum())
    if not out_s:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z.astype(np.int32)
    return np.concatenate(out_s), np.concatenate(out_e), np.concatenate(out_c)


def clip_pieces(starts: np.ndarray, stops: np.ndarray, lo: int, hi: int, cum: np.ndarray | None = None):
    """Sub-pieces covering [lo, hi) of the sequence formed by the pieces laid end to end."""
    lens = stops - starts
    cum = np.concatenate([[0], np.cumsum(lens)]) if cum is None else cum
    a = int(np.searchsorted(cum, lo, side="right")) - 1
    b = int(np.searchsorted(cum, hi, side="left"))
    s, e = starts[a:b].copy(), stops[a:b].copy()
    if len(s):
        s[0] += lo - cum[a]
        e[-1] -= cum[b] - hi
    return s, e


@dataclass(frozen=True)
class EpochOrder:
    """The epoch's sequence of cells (query-position pieces laid end to end) and its windows."""

    starts: np.ndarray
    stops: np.ndarray
    window_cells: int  # U, a multiple of batch_size
    batch_size: int
    bucket_batches: int
    seed: int
    epoch: int
    shuffle: bool

    @property
    def n_slots(self) -> int:
        return int((self.stops - self.starts).sum())

    @property
    def n_windows(self) -> int:
        return -(-self.n_slots // self.window_cells)

    def window_pieces(self, w: int, cum: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Query-position pieces of window ``w``, in sequence order (the order they are read in)."""
        lo = w * self.window_cells
        return clip_pieces(self.starts, self.stops, lo, min(self.n_slots, lo + self.window_cells), cum)

    def window_order(self, w: int, lengths: np.ndarray) -> np.ndarray:
        """Window ``w``'s order: indices into its cells as read. Seeded by (seed, epoch, w) only;
        with bucketing, also a function of the cells' token counts (which do not depend on who reads)."""
        n = len(lengths)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        perm = rng_for(self.seed, self.epoch, w, _TAG_WINDOW).permutation(n)
        if self.bucket_batches <= 1:
            return perm
        batches = batch_indices(perm, lengths, self.batch_size, self.bucket_batches,
                                rng_for(self.seed, self.epoch, w, _TAG_BUCKET))
        return np.concatenate(batches) if batches else perm


def epoch_order(n_cells: int, *, batch_size: int, chunk_cells: int, window_cells: int, seed: int, epoch: int,
                shuffle: bool, strata: Labels | None = None, groups: Labels | None = None, alpha: float = 1.0,
                bucket_batches: int = 0) -> EpochOrder:
    labels = groups if groups is not None else strata
    starts, stops, codes = chunk_pieces(n_cells, chunk_cells, labels)
    if groups is not None:
        starts, stops, codes = balanced_pieces(starts, stops, codes, n_cells, alpha,
                                               rng_for(seed, epoch, _TAG_BALANCE))
    if shuffle:
        order = stratified_order(codes, rng_for(seed, epoch, _TAG_CHUNKS))
        starts, stops = starts[order], stops[order]
    elif groups is not None:
        order = np.lexsort((starts,))
        starts, stops = starts[order], stops[order]
    window = max(1, window_cells // batch_size) * batch_size
    return EpochOrder(starts, stops, window, batch_size, bucket_batches, seed, epoch, shuffle)


def as_intervals(x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.int64).reshape(-1, 2)
    arr = arr[arr[:, 1] > arr[:, 0]]
    if len(arr) > 1 and np.any(arr[1:, 0] < arr[:-1, 1]):
        raise ValueError("slot intervals must be sorted and disjoint")
    return arr


def merge_intervals(arr: np.ndarray) -> np.ndarray:
    """Sorted, disjoint intervals with touching neighbours joined."""
    arr = as_intervals(arr)
    if len(arr) < 2:
        return arr
    brk = np.flatnonzero(arr[1:, 0] != arr[:-1, 1]) + 1
    return np.stack([arr[np.concatenate([[0], brk]), 0], arr[np.concatenate([brk - 1, [len(arr) - 1]]), 1]], axis=1)


def clip_intervals(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Slots [lo, hi) of the sequence formed by the intervals laid end to end, as intervals."""
    s, e = clip_pieces(arr[:, 0], arr[:, 1], lo, hi) if len(arr) else (arr[:, 0], arr[:, 1])
    return np.stack([s, e], axis=1).reshape(-1, 2)


@dataclass(frozen=True)
class Phase:
    """The part of an epoch one loader run (S shards) streams: slot intervals cut into S shards."""

    intervals: np.ndarray  # (m, 2) sorted, disjoint slot intervals
    n_shards: int
    batch_size: int
    remainder: str

    @property
    def n_slots(self) -> int:
        return int((self.intervals[:, 1] - self.intervals[:, 0]).sum())

    @property
    def n_batches(self) -> int:
        """Batches per shard (the same for every shard)."""
        M, S, bs = self.n_slots, self.n_shards, self.batch_size
        return (M // S) // bs if self.remainder == "drop" else -(-(-(-M // S)) // bs)

    def _own(self, s: int) -> tuple[int, int]:
        if self.remainder == "drop":
            T = self.n_batches * self.batch_size
            return s * T, (s + 1) * T
        return (s * self.n_slots) // self.n_shards, ((s + 1) * self.n_slots) // self.n_shards

    def shard_slots(self, s: int) -> np.ndarray:
        """Shard ``s``'s slots in streaming order (n_batches * batch_size of them), as intervals."""
        lo, hi = self._own(s)
        own = clip_intervals(self.intervals, lo, hi)
        T = self.n_batches * self.batch_size
        if self.remainder == "drop" or T == 0:
            return own
        if hi == lo:
            raise ValueError(f"remainder='pad': {self.n_slots} cells cannot fill {self.n_shards} shards")
        parts, have = [own], hi - lo
        while have < T:  # top up with the shard's own first slots
            take = min(T - have, hi - lo)
            parts.append(clip_intervals(own, 0, take))
            have += take
        return np.concatenate(parts)

    def remaining(self, consumed_batches: list[int]) -> np.ndarray:
        """Slots not yet consumed when shard s has delivered ``consumed_batches[s]`` batches: the
        unconsumed rest of every shard, plus (drop) the tail the phase would have skipped."""
        if len(consumed_batches) != self.n_shards:
            raise ValueError(f"remaining: {len(consumed_batches)} shard positions for {self.n_shards} shards")
        parts = []
        for s, k in enumerate(consumed_batches):
            lo, hi = self._own(s)
            parts.append(clip_intervals(self.intervals, min(hi, lo + int(k) * self.batch_size), hi))
        if self.remainder == "drop":
            parts.append(clip_intervals(self.intervals, self._own(self.n_shards - 1)[1], self.n_slots))
        return merge_intervals(np.concatenate(parts))


def window_spans(slots: np.ndarray, window_cells: int) -> list[tuple[int, int, int]]:
    """(window, lo, hi) spans, in order: the places [lo, hi) of each window's order that ``slots``
    (intervals) cover; neighbouring spans of one window are joined."""
    out: list[list[int]] = []
    for a, b in slots.tolist():
        while a < b:
            w = a // window_cells
            end = min(b, (w + 1) * window_cells)
            lo, hi = a - w * window_cells, end - w * window_cells
            if out and out[-1][0] == w and out[-1][2] == lo:
                out[-1][2] = hi
            else:
                out.append([w, lo, hi])
            a = end
    return [tuple(x) for x in out]


def worker_batches_done(rank_batches: int, num_workers: int, worker: int) -> int:
    """Batches DataLoader worker ``worker`` delivered when its rank delivered ``rank_batches``
    (torch's DataLoader takes batches from its workers in turn)."""
    k = max(1, num_workers)
    return max(0, -(-(rank_batches - worker) // k))


def read_groups(starts: np.ndarray, stops: np.ndarray, read_cells: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a window's pieces into consecutive reads of at most read_cells cells."""
    total = int((stops - starts).sum())
    cum = np.concatenate([[0], np.cumsum(stops - starts)])
    return [clip_pieces(starts, stops, lo, min(total, lo + read_cells), cum) for lo in range(0, total, read_cells)]
