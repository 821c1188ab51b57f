"""LoaderConfig: every option of the streaming loader, validated at construction.

Memory knobs (per DataLoader worker process, defaults measured on the 200k x 20k bench store):

- ``chunk_cells`` (256): contiguous cells per chunk, the unit of shuffling. Smaller chunks mix
  better but read slower (each chunk is one range in the TileDB read). With the dataset-stratified
  chunk order, 64 chunks per window give a batch dataset entropy of 0.99 of a true permutation's on
  a Zipf-skewed 20-dataset corpus (32 chunks: 0.97).
- ``read_cells`` (1024): cells per TileDB read (several chunks in one read). At ~1.7k nonzeros
  per cell a read's results fit the read threads' 16 MB TileDB buffers in one pass (larger reads
  take two passes and a copy; larger buffers are mmap'd afresh and page-faulted on every read:
  measured on 2 cores, 2048-cell reads with 128 MB buffers spent 48 us/cell in the kernel, vs
  ~35 with these defaults, and ~15 once TileDB's per-query malloc_trim was off).
- ``window_cells`` (16384): cells shuffled together: a window of the epoch's world-independent order
  (see ``plan.py``), whichever rank or DataLoader worker reads it, so every worker holds whole windows;
  one window is tokenized and held in memory (about 7 to 14 KB per cell at ~1.7k nonzero genes, i.e.
  ~110-220 MB) while the next one is read and tokenized ahead of it (so two windows at most in-process).
  Part of the epoch order: a resume must use the same value.
- ``prefetch_reads`` (1): tokenized blocks a DataLoader worker keeps ahead (without workers a
  whole window is kept ahead).
- ``read_threads`` (None = 2 without DataLoader workers, 1 per worker with them): threads per
  process that each read a group of chunks and tokenize it; each holds one read in flight (~35 MB
  of TileDB/Arrow buffers at the defaults) and its own TileDB context. Workers already run in
  parallel; a second thread per worker measured no faster on 2 cores and cost ~0.25 GB PSS.
- ``bucket_batches`` (0 = off): length-sort cells across this many batches of the shuffled window
  and cut batches from that (padding drops from ~28% to ~5% at 8), at a cost in mixing, since cell
  length correlates with the dataset: keep it off where batch composition matters; the trainer's
  presets choose their own (or pack rows instead).

Encoding (``tokenizer``): one of ``encodings.NAMES`` (rank, bin, ebin, value, rank_value, uce; each
module documents its definition). Sequence length: ``max_len`` counts the special tokens. ``rank`` /
``rank_value`` keep a cell's max_len - 2 highest-ranked genes (largest count / raw_sum / gene median,
ties by smaller gene joinid) between ``<cls>`` and ``<eos>`` and drop the rest (the same genes every
epoch unless thinning changes the counts); ``bin`` / ``ebin`` / ``value`` keep a seeded random
max_len - 1 of them (new per epoch), in gene order; ``uce`` draws max_len - 1 - 2 x (its chromosomes)
genes with replacement. ``meta_columns`` add one token per column after ``<cls>``, on top of max_len
(see ``meta_tokens.py``); ``bin_width`` is ``ebin``'s grid.

Depth augmentation (off by default):

- ``thin_range`` (None = off): ``(lo, hi)`` with ``0 < lo <= hi <= 1``. A thinned cell keeps each UMI
  independently with a keep-rate ``r`` drawn log-uniformly in ``[lo, hi]`` (binomial thinning of its raw
  counts, as scFoundation's read-depth-aware pretraining down-samples a cell's total count); everything
  the tokenizer computes (raw sum, ranks, bins, values) comes from the thinned cell, and genes thinned
  to zero disappear.
- ``thin_prob`` (0.5): the share of cells thinned at all; the others stay at their natural depth.

Both draws are seeded by ``(seed, epoch, soma_joinid)`` (and the gene for each count), so a cell's
thinned counts do not depend on the batch, worker, rank or resume position it lands in, and change per
epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .encodings import NAMES as TOKENIZERS, get_encoding  # noqa: E402  (one registry)
REMAINDERS = ("drop", "pad")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LoaderConfig:
    tokenizer: str = "rank"
    max_len: int = 2048
    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0
    num_workers: int = 0
    obs_filter: str | None = None
    obs_columns: tuple[str, ...] = ()
    meta_columns: tuple[str, ...] = ()  # obs columns prepended as tokens after <cls> (see meta_tokens.py)
    balance_by: str | None = None
    balance_alpha: float = 1.0
    split: str | None = None
    split_by: str = "dataset_id"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    rank: int | None = None
    world_size: int | None = None
    n_bins: int = 51
    bin_width: float = 1.0  # ebin: width of the shared log1p(CP10k) grid (scBERT: 1)
    gene_filter: str | None = None
    # engine knobs
    stratify_by: str | None = "dataset_id"
    chunk_cells: int = 256
    read_cells: int = 1024
    window_cells: int = 16384
    prefetch_reads: int = 1
    read_threads: int | None = None
    bucket_batches: int = 0
    remainder: str = "drop"
    timestamp_ms: int | None = None
    # depth augmentation (binomial thinning of raw counts before tokenization; see loader/thinning.py)
    thin_range: tuple[float, float] | None = None
    thin_prob: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "obs_columns", tuple(self.obs_columns))
        object.__setattr__(self, "meta_columns", tuple(self.meta_columns))
        if len(set(self.meta_columns)) != len(self.meta_columns) or not all(
                isinstance(c, str) and c for c in self.meta_columns):
            raise ValueError(f"LoaderConfig.meta_columns: distinct non-empty column names, got {self.meta_columns!r}")
        if self.thin_range is not None:
            _check_thin_range(self.thin_range)
            object.__setattr__(self, "thin_range", (float(self.thin_range[0]), float(self.thin_range[1])))
        _check_thin_prob(self.thin_prob)
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in self.split_fractions))
        _one_of(self, "tokenizer", TOKENIZERS)
        _one_of(self, "remainder", REMAINDERS)
        if self.split is not None:
            _one_of(self, "split", SPLITS)
        for name, lo in (("max_len", 3), ("batch_size", 1), ("num_workers", 0), ("n_bins", 3),
                         ("chunk_cells", 1), ("read_cells", 1), ("window_cells", 1), ("prefetch_reads", 1),
                         ("bucket_batches", 0), ("seed", 0), ("epoch", 0)):
            _int_at_least(self, name, lo)
        if self.read_threads is not None:
            _int_at_least(self, "read_threads", 1)
        if self.max_len < get_encoding(self.tokenizer).min_len:
            raise ValueError(f"LoaderConfig.max_len: {self.max_len} is below the {self.tokenizer} encoding's "
                             f"minimum {get_encoding(self.tokenizer).min_len}")
        if isinstance(self.bin_width, bool) or not isinstance(self.bin_width, (int, float)) or not self.bin_width > 0:
            raise ValueError(f"LoaderConfig.bin_width: a positive number, got {self.bin_width!r}")
        if self.n_bins > 32767:
            raise ValueError(f"LoaderConfig.n_bins: at most 32767, got {self.n_bins}")
        if not 0.0 <= float(self.balance_alpha) <= 1.0:
            raise ValueError(f"LoaderConfig.balance_alpha: must lie in [0, 1], got {self.balance_alpha}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"LoaderConfig.split_fractions: three non-negative fractions summing to 1, got {fr}")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("LoaderConfig.rank / world_size: give both or neither "
                             f"(rank={self.rank}, world_size={self.world_size})")
        if self.world_size is not None:
            _int_at_least(self, "world_size", 1)
            _int_at_least(self, "rank", 0)
            if self.rank >= self.world_size:
                raise ValueError(f"LoaderConfig.rank: {self.rank} must be < world_size {self.world_size}")
        for c in self.obs_columns:
            if not isinstance(c, str) or not c:
                raise ValueError(f"LoaderConfig.obs_columns: column names must be non-empty strings, got {c!r}")
        if self.window_cells < self.batch_size:
            raise ValueError(f"LoaderConfig.window_cells: {self.window_cells} is smaller than batch_size "
                             f"{self.batch_size}")

    @property
    def threads_per_process(self) -> int:
        """Read threads in this process: ``read_threads``, or 2 in-process and 1 per DataLoader worker."""
        if self.read_threads is not None:
            return self.read_threads
        return 2 if self.num_workers == 0 else 1

    @property
    def window_batches(self) -> int:
        """Whole batches per shuffle window (a window is whole batches; a shard's batch may span two)."""
        return max(1, self.window_cells // self.batch_size)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_thin_range(tr):
    try:
        lo, hi = (float(v) for v in tr)
    except (TypeError, ValueError):
        raise ValueError(f"LoaderConfig.thin_range: expected None or two numbers (lo, hi), got {tr!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"LoaderConfig.thin_range: need 0 < lo <= hi <= 1 (keep-rates), got {tr!r}")


def _check_thin_prob(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"LoaderConfig.thin_prob: a probability in [0, 1], got {p!r}")


def _one_of(cfg, name, allowed):
    v = getattr(cfg, name)
    if v not in allowed:
        raise ValueError(f"LoaderConfig.{name}: {v!r} is not one of {allowed}")


def _int_at_least(cfg, name, lo):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"LoaderConfig.{name}: expected an int, got {v!r}")
    if v < lo:
        raise ValueError(f"LoaderConfig.{name}: must be >= {lo}, got {v}")
