"""CellStream: a torch IterableDataset of tokenized, shuffled batches from a pinned store snapshot."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
import threading

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from atlasflow.store import Store, open_store
from atlasflow.store.runs import Labels, Runs
from atlasflow.store.selection import check_columns, column_labels, obs_labels, query_runs

from . import kernels as K
from . import plan as P
from .batching import TokenWindow, collate
from .config import LoaderConfig
from .encodings import get_encoding
from .encodings.uce import column_coordinates
from .io import BlockReader, Prefetcher
from .memory import KEEP_RSS_BYTES, HeapTrimmer
from .meta_tokens import MetaVocab
from .split import restrict_to_split
from .state import STATE_FORMAT_VERSION, STREAM_FORMAT, check_state
from .tokenize import TokenBlock, Tokenizer, prepend_tokens
from .vocab import N_SPECIAL, Vocab

COMPACT_LABEL_RUNS = 4096  # a label column with at most max(this, cells / 256) runs is kept as runs

_log = logging.getLogger(__name__)


def resolve_rank_world(cfg: LoaderConfig) -> tuple[int, int]:
    """Explicit override, else Ray Train's context, else torch.distributed, else (0, 1)."""
    if cfg.world_size is not None:
        return int(cfg.rank), int(cfg.world_size)
    if "ray" in sys.modules:
        try:
            import ray.train

            ctx = ray.train.get_context()
            return int(ctx.get_world_rank()), int(ctx.get_world_size())
        except Exception:
            pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _load_medians(store: Store) -> np.ndarray:
    try:
        stats = store.gene_stats()
    except Exception as exc:
        raise ValueError(f"tokenizers rank / rank_value need gene medians, which store {store.uri} does not have "
                         f"({type(exc).__name__}: {exc}); run `atlasflow store stats {store.uri}` first") from exc
    med = np.full(store.n_genes, np.nan)
    idx = stats.index.to_numpy(np.int64)
    med[idx[idx < store.n_genes]] = stats["nonzero_median"].to_numpy(np.float64)[idx < store.n_genes]
    return med


def _medians_for_vocab(vocab: Vocab, lut: np.ndarray, gene_medians) -> np.ndarray:
    """Store-gene-indexed medians from medians aligned with ``vocab.gene_feature_ids``."""
    if gene_medians is None:
        raise ValueError("make_loader: gene_medians: the rank / rank_value tokenizers over a foreign vocabulary needs the "
                         "medians the vocabulary was trained with")
    gene_medians = np.asarray(gene_medians, dtype=np.float64)
    if len(gene_medians) != len(vocab.gene_feature_ids):
        raise ValueError(f"make_loader: gene_medians: {len(gene_medians)} values for "
                         f"{len(vocab.gene_feature_ids)} vocabulary genes")
    med = np.full(len(lut), np.nan)
    known = lut >= 0
    med[known] = gene_medians[lut[known] - N_SPECIAL]
    return med


class CellStream(IterableDataset):
    """``vocab``: tokenize with this vocabulary instead of the store's own (a checkpoint's), genes
    matched by Ensembl id; ``gene_medians`` (rank): the medians that vocabulary was trained with,
    aligned with ``vocab.gene_feature_ids`` (the store's own gene stats are then not needed)."""

    def __init__(self, store, cfg: LoaderConfig | None = None, *, vocab: Vocab | None = None,
                 gene_medians: np.ndarray | None = None, meta_vocab: MetaVocab | dict | None = None):
        cfg = cfg or LoaderConfig()
        if not isinstance(cfg, LoaderConfig):
            raise TypeError(f"CellStream: cfg must be a LoaderConfig, got {type(cfg).__name__}")
        if vocab is None and gene_medians is not None:
            raise ValueError("make_loader: gene_medians belong to a vocabulary; pass vocab as well")
        # Load this tokenizer's compiled kernels while obs is read (TileDB releases the GIL), so the
        # first reads do not wait for them; the thread ends before the constructor returns.
        # (DataLoader workers fork from a forkserver that loaded every kernel once.)
        kernels = threading.Thread(target=K.warm, args=(cfg.tokenizer, cfg.thin_range is not None),
                                   name="atlasflow-warm", daemon=True)
        if cfg.num_workers == 0:
            kernels.start()
        try:
            self._build(store, cfg, vocab, gene_medians, meta_vocab)
        finally:
            if kernels.is_alive():
                kernels.join()

    def _build(self, store, cfg: LoaderConfig, vocab, gene_medians, meta_vocab):
        store = store if isinstance(store, Store) else open_store(os.fspath(store), cfg.timestamp_ms)
        self.cfg = cfg
        self.locator = store.locator
        enc = get_encoding(cfg.tokenizer)
        rank = enc.needs_medians
        if vocab is None:
            self.vocab = Vocab.from_var(store.var(), cfg.gene_filter)
            self._lut = self.vocab.lookup_table(store.n_genes)
            self._medians = _load_medians(store) if rank else None
        else:
            self.vocab = vocab
            self._lut = vocab.lookup_table_for_var(store.var())
            self._medians = _medians_for_vocab(vocab, self._lut, gene_medians) if rank else None
        self._coordinates = column_coordinates(store.var()) \
            if enc.needs_coordinates else None
        with store.experiment() as exp:
            check_columns(exp, [cfg.balance_by, cfg.split_by if cfg.split else None, *cfg.obs_columns,
                                *cfg.meta_columns], "LoaderConfig.balance_by / split_by / obs_columns / meta_columns")
            runs = query_runs(exp, Runs.from_ranges(store.complete_ranges()), cfg.obs_filter)
            if cfg.split is not None:
                runs = restrict_to_split(runs, column_labels(exp, runs, cfg.split_by, cfg.obs_filter),
                                         cfg.split, cfg.split_fractions)
            if runs.n_cells == 0:
                raise ValueError(f"CellStream: the query selects no committed cells (obs_filter={cfg.obs_filter!r}, "
                                 f"split={cfg.split!r}) in store {store.uri}")
            strat = cfg.stratify_by if (cfg.shuffle and not cfg.balance_by and cfg.stratify_by) else None
            if strat is not None and strat not in exp.obs.schema.names:
                strat = None  # stratification is an optimization; a store without the column just shuffles
            # One pass over obs for every column asked for (run-length where the plan needs segments).
            # Label columns that are run-length compact (dataset_id, assay, donor: constant along a
            # source) are kept as runs and looked up from them; only the others are read with each block.
            wanted = {c: max(COMPACT_LABEL_RUNS, runs.n_cells // 256) for c in (*cfg.obs_columns, *cfg.meta_columns)}
            wanted.update({c: True for c in (cfg.balance_by, strat) if c})
            labels = obs_labels(exp, runs, wanted, cfg.obs_filter) if wanted else {}
            self.groups = labels[cfg.balance_by] if cfg.balance_by else None
            self.strata = labels[strat] if strat else None
            cats = {c: labels[c] if isinstance(labels[c], list) else labels[c].categories
                    for c in (*cfg.obs_columns, *cfg.meta_columns)}
            self.obs_categories = {c: cats[c] for c in cfg.obs_columns}
        self._run_labels = {c: labels[c] for c in dict.fromkeys((*cfg.obs_columns, *cfg.meta_columns))
                            if isinstance(labels[c], Labels)}
        self._read_columns = tuple(c for c in dict.fromkeys((*cfg.obs_columns, *cfg.meta_columns))
                                   if c not in self._run_labels)
        self._read_categories = cats
        self.meta_vocab = self._meta_lookups = None
        if cfg.meta_columns:
            base = len(self.vocab) + len(enc.extra_tokens)
            mv = MetaVocab.from_dict(meta_vocab) if isinstance(meta_vocab, dict) else meta_vocab
            if mv is None:
                mv = MetaVocab.from_categories(cfg.meta_columns, cats, base)
            if mv.columns != cfg.meta_columns or mv.base != base:
                raise ValueError(f"make_loader: meta_vocab: columns {mv.columns} from token {mv.base} do not match "
                                 f"LoaderConfig.meta_columns {cfg.meta_columns} from token {base}")
            self.meta_vocab = mv
            self._meta_lookups = [mv.lookup(i, cats[c]) for i, c in enumerate(cfg.meta_columns)]
        self.runs = runs
        self._runs_cum = runs.cum()
        self._fingerprint = hashlib.blake2b(runs.starts.tobytes() + runs.stops.tobytes(), digest_size=8).hexdigest()
        self.rank, self.world_size = resolve_rank_world(cfg)
        self.epoch = cfg.epoch
        self._shards = self.world_size * max(1, cfg.num_workers)
        self._resume: tuple[P.Phase, int] | None = None  # set by load_state_dict, used by the next iteration
        self._current: tuple[P.Phase, int] | None = None  # the iteration being started (travels to workers)
        self._active: tuple[P.Phase, int] | None = None  # the in-process iteration under way
        self._position = 0
        if self._full_phase().n_batches == 0:
            raise ValueError(f"CellStream: {runs.n_cells} cells cannot give every one of {self._shards} shards "
                             f"(world_size x workers) a batch of {cfg.batch_size}; lower batch_size or use "
                             f"remainder='pad'")

    # -- public ------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return self.runs.n_cells

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields in a whole epoch (the same on every rank)."""
        return self._full_phase().n_batches * max(1, self.cfg.num_workers)

    @property
    def batches_left(self) -> int:
        """Batches each rank yields when iterated next: a whole epoch, or what a resume left."""
        if self._resume is None:
            return self.batches_per_epoch
        phase, start = self._resume
        return phase.n_batches * max(1, self.cfg.num_workers) - start

    def __len__(self) -> int:
        return self.batches_left

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)
        self._resume = self._active = None
        self._position = 0

    def epoch_order(self, epoch: int) -> P.EpochOrder:
        cfg = self.cfg
        return P.epoch_order(self.runs.n_cells, batch_size=cfg.batch_size, chunk_cells=cfg.chunk_cells,
                             window_cells=cfg.window_cells, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle,
                             strata=self.strata, groups=self.groups, alpha=cfg.balance_alpha,
                             bucket_batches=cfg.bucket_batches)

    def _full_phase(self) -> P.Phase:
        # balancing keeps an epoch at the query's size, so the slot count needs no plan
        return P.Phase(np.array([[0, self.runs.n_cells]], dtype=np.int64), self._shards, self.cfg.batch_size,
                       self.cfg.remainder)

    def begin(self) -> tuple[P.Phase, int]:
        """Fix what the next iteration streams: (phase, batches this rank already delivered in it)."""
        self._current = self._active = self._resume or (self._full_phase(), 0)
        self._resume = None
        self._position = self._current[1]
        return self._current

    # -- state -------------------------------------------------------------------------------
    def _identity(self) -> dict:
        c = self.cfg
        return {"seed": c.seed, "world_size": self.world_size, "num_workers": c.num_workers,
                "snapshot_ms": self.locator.tiledb_timestamp_ms, "n_cells": self.runs.n_cells,
                "query_fingerprint": self._fingerprint, "tokenizer": c.tokenizer, "batch_size": c.batch_size,
                "order": order_fields(c, self.strata is not None)}

    def state_for(self, phase: P.Phase, position: int, fmt: str = STREAM_FORMAT) -> dict:
        return {"format": fmt, "version": STATE_FORMAT_VERSION, **self._identity(), "epoch": self.epoch,
                "phase": phase.intervals.tolist(), "phase_shards": phase.n_shards, "position": int(position)}

    def state_dict(self, fmt: str = STREAM_FORMAT) -> dict:
        """The phase under way (or about to start) and the batches this rank delivered in it."""
        phase = self._active[0] if self._active else (self._resume or (self._full_phase(), 0))[0]
        return self.state_for(phase, self._position, fmt)

    def load_state_dict(self, state: dict, fmt: str = STREAM_FORMAT) -> None:
        """Resume: the same world and worker count continue the saved phase batch for batch; any other
        count streams exactly what the saved phase had not delivered, cut afresh for this world."""
        check_state(state, self._identity(), fmt)
        saved = P.Phase(P.as_intervals(state["phase"]), int(state["phase_shards"]), self.cfg.batch_size,
                        self.cfg.remainder)
        k, k_workers = int(state["position"]), max(1, int(state["num_workers"]))
        total = saved.n_batches * k_workers
        if saved.n_shards != int(state["world_size"]) * k_workers or not 0 <= k <= total:
            raise ValueError(f"load_state_dict: inconsistent loader state (phase_shards={saved.n_shards}, "
                             f"world_size={state['world_size']}, num_workers={state['num_workers']}, "
                             f"position={k} of {total})")
        self.epoch = int(state["epoch"])
        if k == total:  # the phase ran to its end: the epoch is over (its remainder is skipped)
            phase, start = P.Phase(np.zeros((0, 2), np.int64), self._shards, self.cfg.batch_size,
                                   self.cfg.remainder), 0
        elif saved.n_shards == self._shards and int(state["num_workers"]) == self.cfg.num_workers:
            phase, start = saved, k
        else:  # every rank delivered k batches (data-parallel ranks step together)
            done = [P.worker_batches_done(k, k_workers, w) for _ in range(saved.n_shards // k_workers)
                    for w in range(k_workers)]
            phase, start = P.Phase(saved.remaining(done), self._shards, self.cfg.batch_size, self.cfg.remainder), 0
            _log.info("loader resize: %d shards -> %d, %d cells of epoch %d left, %d batches per rank",
                      saved.n_shards, self._shards, phase.n_slots, self.epoch,
                      phase.n_batches * max(1, self.cfg.num_workers))
        self._resume, self._active = (phase, start), None
        self._position = start

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        n_workers = info.num_workers if info else 0
        if n_workers != self.cfg.num_workers:
            raise ValueError(f"LoaderConfig.num_workers={self.cfg.num_workers} but the DataLoader runs "
                             f"{n_workers} workers; build the loader with make_loader()")
        phase, start = self._current if self._current is not None else self.begin()
        self._current, self._active = None, (phase, start)
        k = max(1, n_workers)
        # A resumed iteration starts at the rank's start-th batch, but the DataLoader always asks its
        # worker 0 first: worker i plays the shard of the phase's worker (i + start) % k.
        worker = ((info.id if info else 0) + start) % k
        done = P.worker_batches_done(start, k, worker)
        self._position = start
        slots = phase.shard_slots(self.rank * k + worker)
        slots = P.clip_intervals(slots, done * self.cfg.batch_size, phase.n_batches * self.cfg.batch_size)
        return self._stream(self.epoch_order(self.epoch), slots)

    # The loader's stages, one method each (the bound benchmark times them one after the other).
    def _tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        return Tokenizer(cfg.tokenizer, cfg.max_len, cfg.n_bins, self._lut, self._medians, cfg.seed,
                         thin_range=cfg.thin_range, thin_prob=cfg.thin_prob, coordinates=self._coordinates,
                         n_vocab=len(self.vocab), bin_width=cfg.bin_width)

    def _read_tasks(self, order: P.EpochOrder, spans):
        """(window index, last read of the window, joinid ranges) in plan order."""
        cum = self.runs.cum()
        seq_cum = np.concatenate([[0], np.cumsum(order.stops - order.starts)])
        for i, (w, _, _) in enumerate(spans):
            reads = P.read_groups(*order.window_pieces(w, seq_cum), self.cfg.read_cells)
            for k, (s, e) in enumerate(reads):
                ranges = [r for a, b in zip(s.tolist(), e.tolist()) for r in self.runs.to_joinids(a, b, cum)]
                yield i, k == len(reads) - 1, ranges

    def _reader(self, slot: int | None = None) -> BlockReader:
        return BlockReader(self.locator, self._read_columns, self._read_categories, slot=slot)

    def _tokenize(self, tok: Tokenizer, epoch: int, ranges, read) -> TokenBlock:
        ids, indptr, cols, vals, labels = read
        if self._run_labels:
            pos = self.runs.positions_of(ids, self._runs_cum)
            labels = {**labels, **{c: lab.at(pos).astype(np.int64) for c, lab in self._run_labels.items()}}
        # One kernel call per read: the kernels' scratch is O(longest cell), not O(block).
        block = tok(indptr, cols, vals, ids, epoch)
        del cols, vals
        block.labels = labels
        if self._meta_lookups:  # <cls>, then one token per metadata column
            block = prepend_tokens(block, np.stack([lut[labels[c]] for lut, c in
                                                    zip(self._meta_lookups, self.cfg.meta_columns)], axis=1))
        want = np.concatenate([np.arange(a, b) for a, b in ranges])
        if len(want) != len(ids):  # duplicates (remainder="pad"): restore the multiplicity
            block = block.take(np.searchsorted(ids, want))
        return block

    def _stream(self, order: P.EpochOrder, slots: np.ndarray):
        cfg = self.cfg
        spans = P.window_spans(slots, order.window_cells)
        local, readers, slots_ = threading.local(), [], itertools.count()
        tok = self._tokenizer()

        def read_and_tokenize(task):  # one open handle per read thread
            reader = getattr(local, "reader", None)
            if reader is None:
                reader = local.reader = self._reader(slot=next(slots_))
                readers.append(reader)
            return task, self._tokenize(tok, order.epoch, task[2], reader.read(task[2]))

        pending: list[TokenBlock] = []
        # Each I/O thread reads a group and tokenizes it (the kernels release the GIL), so both stages
        # run on every thread; blocks come back in plan order. In-process (no workers), tokenized
        # blocks queue up to a whole window ahead: the next window is read and tokenized while the
        # consumer trains on this one (two windows in memory at most). DataLoader workers overlap
        # with each other and with training already, so each keeps about one window of memory.
        ahead = -(-order.window_cells // cfg.read_cells) if cfg.num_workers == 0 else cfg.prefetch_reads
        blocks = Prefetcher(self._read_tasks(order, spans), read_and_tokenize, max(1, ahead),
                            cfg.threads_per_process)
        # DataLoader workers trim every window: each would keep the budget, and their PSS bound
        # (1.5 GB for two) was measured that way.
        trim = HeapTrimmer(KEEP_RSS_BYTES if cfg.num_workers == 0 else 0)
        bs, carry = cfg.batch_size, []  # carry: (window, cells) parts of a batch that spans two windows
        try:
            for (i, last, _), block in blocks:
                pending.append(block)
                if not last:
                    continue
                window, pending = TokenWindow(pending), []
                trim()
                w, lo, hi = spans[i]
                cells = order.window_order(w, window.lengths)[lo:hi]
                at = 0
                if carry:
                    need = bs - sum(len(c) for _, c in carry)
                    carry.append((window, cells[:need]))
                    at = min(need, len(cells))
                    if at < need:
                        continue
                    self._position += 1
                    yield collate(*join_parts(carry), cfg.obs_columns)
                    carry = []
                for j in range(at, len(cells) - bs + 1, bs):
                    self._position += 1
                    yield collate(window, cells[j:j + bs], cfg.obs_columns)
                rest = at + (len(cells) - at) // bs * bs
                if rest < len(cells):
                    carry = [(window, cells[rest:])]
                window = cells = None  # free before the next window is assembled
            if carry:
                raise RuntimeError(f"CellStream: a shard's slots are not whole batches ({slots.tolist()})")
        finally:
            blocks.close()
            for reader in readers:
                reader.close()


def join_parts(parts: list[tuple[TokenWindow, np.ndarray]]) -> tuple[TokenWindow, np.ndarray]:
    """One window over the blocks of several, and the parts' cells re-addressed in it."""
    blocks, idx, off = [], [], 0
    for window, cells in parts:
        blocks.extend(window.blocks)
        idx.append(np.asarray(cells, dtype=np.int64) + off)
        off += len(window)
    return TokenWindow(blocks), np.concatenate(idx)


def order_fields(cfg: LoaderConfig, stratified: bool) -> dict:
    """The LoaderConfig fields the epoch order depends on (besides seed, query and batch size)."""
    return {"chunk_cells": cfg.chunk_cells, "window_cells": cfg.window_cells, "shuffle": cfg.shuffle,
            "balance_by": cfg.balance_by, "balance_alpha": float(cfg.balance_alpha),
            "stratify_by": cfg.stratify_by if stratified else None, "bucket_batches": cfg.bucket_batches,
            "remainder": cfg.remainder, "max_len": cfg.max_len, "n_bins": cfg.n_bins}
