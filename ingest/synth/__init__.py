"""Synthetic single-cell atlas generator (``atlasflow synth``): the model and the chunked cell stream.

Counts model, per cell c of type t in dataset d:
    mean[c, g] = L_c * w[d, t, g] * m[c, g] / sum_g(w[d, t, g] * m[c, g]),  count ~ NB(mean, theta_g)
where w[d, t] = softmax(base_g + program[t, g] + batch[d, g]) (a gene program per cell type, a mild
per-dataset multiplicative batch shift), m[c] = exp(activity[c] @ modules) a cell's activity of
shared gene modules (co-expressed genes whose level varies from cell to cell, within and across
types), and L_c is a log-normal library size (assay, donor, cell type and cell noise).

A cell type's program has two parts: its markers (quiet elsewhere, 16-64x up) and a broad part: a
share TYPE_PROGRAM_SHARE of the other genes moved by log-normal fold changes (sd TYPE_PROGRAM_LOG_SD),
as real cell types differ in thousands of genes, not in five. Without the broad part and the modules
(format 1), genes were independent given a cell's type and the types touched ~2% of genes: a masked
gene was predictable from the cell's other genes by 0.3 nat at best (an oracle that knows the type
and excludes the visible genes), so no model could learn much from it. Library sizes scale with G so that ~7% of genes are nonzero per cell
(~1.4k nonzeros at 20k genes), like 10x 3' data restricted to protein-coding genes.

Determinism: every random stream is keyed by (seed, purpose, dataset, block) through
``numpy.random.SeedSequence``; cells are generated in fixed-size blocks whose size depends only on
G, so the output is identical for any ``chunk_cells`` and any layout. Writes go chunk by chunk:
memory is bounded by ``chunk_cells`` x G, never by the number of cells.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasflow.store.genes import ORGANISM_FILES, gene_reference, organism_key

from . import vocab

SYNTH_FORMAT_VERSION = 2  # bump when the same (seed, sizes) would produce different data
TYPE_PROGRAM_SHARE = 0.5  # non-marker genes each cell type's broad program moves
TYPE_PROGRAM_LOG_SD = 3.0
N_MODULES = 16  # shared co-expression modules
MODULE_GENES = 0.03  # share of genes loading on each module
MODULE_LOG_SD = 1.5  # spread of a cell's module activity (log scale)
LAYOUTS = ("h5ad", "census", "store")
ZIPF_EXPONENT = 1.1
REF_GENES = 20_000  # library sizes are calibrated at this many genes and scale linearly with G
BASE_LIBRARY = 30_000.0  # median UMIs per cell at REF_GENES before assay factors (~1.4k nonzeros)
GENE_LOG_SD = 1.8  # spread of baseline log expression across genes (heavy-tailed, Zipf-like)
BATCH_LOG_SD = 0.15  # per-dataset, per-gene multiplicative shift: mild
_WALK_STEPS = 4_000  # inverse-CDF steps before falling back to rejection (never reached in practice)


@dataclass(frozen=True)
class SynthConfig:
    n_cells: int
    n_genes: int
    n_datasets: int
    seed: int
    layout: str = "h5ad"
    chunk_cells: int = 20_000
    organism: str = "homo_sapiens"

    def __post_init__(self):
        for name in ("n_cells", "n_genes", "n_datasets", "seed", "chunk_cells"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"SynthConfig.{name}: expected an int, got {v!r}")
        for name in ("n_cells", "n_genes", "n_datasets", "chunk_cells"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed: must be >= 0, got {self.seed}")
        if self.n_datasets > self.n_cells:
            raise ValueError(f"SynthConfig.n_datasets: {self.n_datasets} datasets need at least as many cells "
                             f"(n_cells={self.n_cells}); every dataset gets >= 1 cell")
        if self.layout not in LAYOUTS:
            raise ValueError(f"SynthConfig.layout: {self.layout!r} is not one of {LAYOUTS}")
        key = organism_key(self.organism)
        if key not in ORGANISM_FILES:
            raise ValueError(f"SynthConfig.organism: {self.organism!r} has no gene reference "
                             f"(known: {sorted(ORGANISM_FILES)})")
        object.__setattr__(self, "organism", key)
        n_ref = len(gene_reference(key))
        if self.n_genes > n_ref:
            raise ValueError(f"SynthConfig.n_genes: {self.n_genes} exceeds the {n_ref} genes of the "
                             f"{key} reference")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def gen_block_cells(n_genes: int) -> int:
    """Cells per generation block: ~4M dense entries, a function of G only (keeps output chunk-independent)."""
    return int(min(4096, max(64, (1 << 22) // n_genes)))


def dataset_sizes(n_cells: int, n_datasets: int, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """Zipf-like sizes, largest first, each >= 1, summing to n_cells (largest-remainder rounding)."""
    w = 1.0 / np.arange(1, n_datasets + 1, dtype=np.float64) ** exponent
    extra = n_cells - n_datasets
    raw = extra * w / w.sum()
    base = np.floor(raw).astype(np.int64)
    rem = extra - int(base.sum())
    base[np.argsort(-(raw - base), kind="stable")[:rem]] += 1
    return base + 1


def select_genes(n_genes: int, organism: str = "homo_sapiens") -> pd.DataFrame:
    """G reference genes: cell-type markers, then protein_coding, then the rest; sorted by feature_id.

    Independent of the seed, so every synthetic atlas of the same G shares one gene space.
    """
    ref = gene_reference(organism)
    coding = ref["feature_type"].to_numpy() == "protein_coding"
    upper = ref["feature_name"].str.upper().to_numpy()
    markers = []
    for sym in vocab.all_marker_symbols():
        hit = np.flatnonzero((upper == sym.upper()) & coding)
        if len(hit):
            markers.append(ref.index[hit[0]])
    order = dict.fromkeys([*markers, *sorted(ref.index[coding]), *sorted(ref.index[~coding])])
    chosen = sorted(list(order)[:n_genes])
    return ref.loc[chosen, ["feature_name", "feature_length", "feature_type"]]


@dataclass(frozen=True)
class Model:
    genes: pd.DataFrame  # index feature_id
    log_base: np.ndarray  # (G,)
    theta: np.ndarray  # (G,) NB inverse dispersion
    programs: np.ndarray  # (T, G) log fold changes of each cell type's gene program
    type_log_lib: np.ndarray  # (T,)
    log_library: float  # log median library size at this G
    modules: np.ndarray  # (M, G) gene loadings of the co-expression modules


def build_model(cfg: SynthConfig) -> Model:
    genes = select_genes(cfg.n_genes, cfg.organism)
    G, T = len(genes), len(vocab.CELL_TYPES)
    rng = _rng(cfg.seed, 0)
    log_base = rng.normal(0.0, GENE_LOG_SD, G)
    theta = np.exp(rng.normal(np.log(2.0), 0.5, G))
    programs = np.zeros((T, G))
    upper = genes["feature_name"].str.upper().to_numpy()
    k = max(1, G // 100)
    for t, (_, _, markers) in enumerate(vocab.CELL_TYPES):
        idx = np.flatnonzero(np.isin(upper, [m.upper() for m in markers]))
        # Markers: quiet elsewhere, strongly up in their type.
        log_base[idx] = rng.normal(-1.5, 0.3, len(idx))
        programs[t, idx] += rng.uniform(np.log(16), np.log(64), len(idx))
        extra = rng.choice(G, size=min(k, G), replace=False)
        programs[t, extra] += rng.uniform(np.log(2), np.log(6), len(extra))
    type_log_lib = rng.normal(0.0, 0.2, T)
    log_library = float(np.log(max(BASE_LIBRARY * G / REF_GENES, 20.0)))
    # Broad programs and modules from their own stream: the draws above are unchanged.
    rng = _rng(cfg.seed, 4)
    is_marker = np.isin(upper, [m.upper() for _, _, ms in vocab.CELL_TYPES for m in ms])
    for t in range(T):
        hit = ~is_marker & (rng.random(G) < TYPE_PROGRAM_SHARE)
        programs[t, hit] += rng.normal(0.0, TYPE_PROGRAM_LOG_SD, int(hit.sum()))
    modules = np.zeros((N_MODULES, G))
    for m in range(N_MODULES):
        hit = ~is_marker & (rng.random(G) < MODULE_GENES)
        modules[m, hit] = rng.uniform(0.5, 1.5, int(hit.sum()))
    return Model(genes, log_base, theta, programs, type_log_lib, log_library, modules)


@dataclass(frozen=True)
class DatasetPlan:
    index: int
    dataset_id: str
    title: str
    n_cells: int
    cell_offset: int  # first cell of this dataset in the atlas (global order)
    assay: int
    tissue: int
    disease: int
    is_primary_data: bool
    composition: np.ndarray  # (T,) cell-type probabilities
    donor_ids: list[str]
    donor_sex: np.ndarray
    donor_stage: np.ndarray
    donor_ethnicity: np.ndarray
    donor_log_lib: np.ndarray
    log_lib: float


def plan_datasets(cfg: SynthConfig) -> list[DatasetPlan]:
    sizes = dataset_sizes(cfg.n_cells, cfg.n_datasets)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    human = cfg.organism == "homo_sapiens"
    plans = []
    for d, (n, off) in enumerate(zip(sizes.tolist(), offsets.tolist())):
        rng = _rng(cfg.seed, 1, d)
        dataset_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        tissue = int(rng.integers(len(vocab.TISSUES)))
        allowed = vocab.TISSUES[tissue][2]
        comp = np.zeros(len(vocab.CELL_TYPES))
        comp[allowed] = rng.dirichlet(np.full(len(allowed), 2.0))
        assay = int(rng.integers(len(vocab.ASSAYS)))
        disease = int(rng.choice(len(vocab.DISEASES), p=vocab.DISEASE_WEIGHTS))
        n_donors = int(min(n, rng.integers(1, 7)))
        stages = rng.integers(len(vocab.DEVELOPMENT_STAGES), size=n_donors)
        plans.append(DatasetPlan(
            index=d, dataset_id=dataset_id,
            title=f"Synthetic {vocab.TISSUES[tissue][0]} atlas {d} (seed {cfg.seed})",
            n_cells=int(n), cell_offset=int(off), assay=assay, tissue=tissue, disease=disease,
            is_primary_data=bool(rng.random() >= 0.1), composition=comp,
            donor_ids=[f"synth-{cfg.seed}-{d}-donor{k}" for k in range(n_donors)],
            donor_sex=rng.integers(len(vocab.SEXES), size=n_donors),
            donor_stage=stages if human else np.full(n_donors, -1),
            donor_ethnicity=rng.integers(len(vocab.ETHNICITIES), size=n_donors) if human
            else np.full(n_donors, -1),
            donor_log_lib=rng.normal(0.0, 0.2, n_donors),
            log_lib=float(np.log(vocab.ASSAYS[assay][2]) + rng.normal(0.0, 0.15)),
        ))
    return plans


def dataset_weights(cfg: SynthConfig, model: Model, plan: DatasetPlan) -> np.ndarray:
    """(T, G) float32 expression proportions of each cell type in this dataset (rows sum to 1)."""
    batch = _rng(cfg.seed, 3, plan.index).normal(0.0, BATCH_LOG_SD, len(model.log_base))
    logits = model.log_base[None, :] + model.programs + batch[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


@dataclass
class Chunk:
    """Consecutive cells of one dataset: labels as vocabulary indices, counts as CSR."""

    plan: DatasetPlan
    row_start: int  # first cell's row within its dataset
    cell_type: np.ndarray  # (n,) index into vocab.CELL_TYPES
    donor: np.ndarray  # (n,) index into plan.donor_ids
    X: sp.csr_matrix  # (n, G) float32 integer-valued counts

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def nnz_per_cell(self) -> np.ndarray:
        return np.diff(self.X.indptr).astype(np.int64)

    @property
    def raw_sum(self) -> np.ndarray:
        rows = np.repeat(np.arange(self.n), self.nnz_per_cell)
        return np.bincount(rows, weights=self.X.data.astype(np.float64), minlength=self.n)


def _truncated_nb(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw NB(mean, theta) conditioned on > 0, given the uniform u that decided 'nonzero' (u > P(0))."""
    mean = mean.astype(np.float64)
    theta = theta.astype(np.float64)
    p0 = np.exp(-theta * np.log1p(mean / theta))
    out = np.zeros(len(mean), dtype=np.float64)
    # Small means (P0 >= 0.5, most nonzeros): continue the inverse CDF from u; converges in a few steps.
    walk = np.flatnonzero(p0 >= 0.5)
    r = mean[walk] / (mean[walk] + theta[walk])
    th, uu = theta[walk], u[walk].astype(np.float64)
    pmf = p0[walk].copy()
    cdf = pmf.copy()
    for k in range(1, _WALK_STEPS + 1):
        if not len(walk):
            break
        pmf *= (k - 1 + th) / k * r
        cdf += pmf
        done = uu <= cdf
        out[walk[done]] = k
        keep = ~done
        walk, r, th, uu, pmf, cdf = walk[keep], r[keep], th[keep], uu[keep], pmf[keep], cdf[keep]
    # Large means: rejection (P0 < 0.5, so < 2 draws expected).
    rej = np.concatenate([np.flatnonzero(p0 < 0.5), walk])
    while len(rej):
        draw = rng.negative_binomial(theta[rej], theta[rej] / (theta[rej] + mean[rej]))
        out[rej] = draw
        rej = rej[draw == 0]
    return out


def generate_block(rng: np.random.Generator, model: Model, weights: np.ndarray, plan: DatasetPlan,
                   n: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """n cells of one dataset: (cell_type, donor, counts CSR). Dense work is float32 and vectorized."""
    G = weights.shape[1]
    cell_type = rng.choice(len(vocab.CELL_TYPES), size=n, p=plan.composition).astype(np.int16)
    donor = rng.integers(len(plan.donor_ids), size=n).astype(np.int16)
    log_lib = (model.log_library + plan.log_lib + model.type_log_lib[cell_type]
               + plan.donor_log_lib[donor] + rng.normal(0.0, 0.4, n))
    mean = weights[cell_type]
    act = rng.normal(0.0, MODULE_LOG_SD, (n, model.modules.shape[0])).astype(np.float32)
    mod = np.exp(act @ model.modules.astype(np.float32))
    mean *= mod
    mean /= mean.sum(axis=1, keepdims=True)  # modules reshape a cell's profile, not its depth
    del mod
    mean *= np.exp(log_lib).astype(np.float32)[:, None]
    theta = model.theta.astype(np.float32)
    p0 = mean / theta
    np.log1p(p0, out=p0)
    p0 *= -theta
    np.exp(p0, out=p0)
    u = rng.random((n, G), dtype=np.float32)
    rows, cols = np.nonzero(u > p0)
    del p0
    vals = _truncated_nb(rng, mean[rows, cols], model.theta[cols], u[rows, cols])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    X = sp.csr_matrix((vals.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, G))
    return cell_type, donor, X


def iter_chunks(cfg: SynthConfig, model: Model, plans: list[DatasetPlan]) -> Iterator[Chunk]:
    """Chunks of <= cfg.chunk_cells cells, in global cell order, never spanning two datasets."""
    block = gen_block_cells(cfg.n_genes)
    for plan in plans:
        weights = dataset_weights(cfg, model, plan)
        pending: list[tuple[np.ndarray, np.ndarray, sp.csr_matrix]] = []
        have, emitted = 0, 0
        for b, start in enumerate(range(0, plan.n_cells, block)):
            n = min(block, plan.n_cells - start)
            pending.append(generate_block(_rng(cfg.seed, 2, plan.index, b), model, weights, plan, n))
            have += n
            last = start + n == plan.n_cells
            while have >= cfg.chunk_cells or (last and have):
                take = min(cfg.chunk_cells, have)
                ct = np.concatenate([p[0] for p in pending])
                dn = np.concatenate([p[1] for p in pending])
                X = sp.vstack([p[2] for p in pending], format="csr") if len(pending) > 1 else pending[0][2]
                pending = []
                if take == have:  # the common case: no row slicing, no extra copy of the chunk
                    yield Chunk(plan, emitted, ct, dn, X)
                else:
                    pending = [(ct[take:], dn[take:], X[take:])]
                    yield Chunk(plan, emitted, ct[:take], dn[:take], X[:take])
                del X
                emitted += take
                have -= take


def synthesize(out: str, n_cells: int, n_genes: int, n_datasets: int, seed: int, layout: str = "h5ad",
               chunk_cells: int = 20_000, organism: str = "homo_sapiens") -> dict:
    """Generate a synthetic atlas at ``out``; returns a JSON-able summary (sizes, nnz, throughput)."""
    from .write import make_writer

    cfg = SynthConfig(n_cells=n_cells, n_genes=n_genes, n_datasets=n_datasets, seed=seed, layout=layout,
                      chunk_cells=chunk_cells, organism=organism)
    t0 = time.perf_counter()
    model = build_model(cfg)
    plans = plan_datasets(cfg)
    with contextlib.ExitStack() as stack:
        lease = None
        if cfg.layout == "store":  # it may append to an existing store: one writer per store (store/lease.py)
            from atlasflow.store.lease import writer_lease

            lease = stack.enter_context(writer_lease(str(out), command="atlasflow synth --layout store"))
        writer = make_writer(cfg, str(out), model, plans, lease=lease)
        return _run(cfg, writer, model, plans, out, t0)


def _run(cfg: SynthConfig, writer, model: Model, plans: list, out, t0: float) -> dict:
    nnz = np.zeros(len(plans), dtype=np.int64)
    raw = np.zeros(len(plans), dtype=np.float64)
    # Generate chunk k+1 while a writer thread writes chunk k (TileDB's C++ write runs without
    # the GIL); waiting before each submit keeps at most two chunks in memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-write") as pool:
        pending = None
        for chunk in iter_chunks(cfg, model, plans):
            nnz[chunk.plan.index] += chunk.X.nnz
            raw[chunk.plan.index] += float(chunk.X.data.sum(dtype=np.float64))
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, chunk)
        if pending is not None:
            pending.result()
    extra = writer.close(nnz, raw)
    secs = time.perf_counter() - t0
    total_nnz = int(nnz.sum())
    return {
        "synth_format_version": SYNTH_FORMAT_VERSION,
        "out": str(out), "layout": cfg.layout, "organism": cfg.organism, "seed": cfg.seed,
        "n_cells": cfg.n_cells, "n_genes": cfg.n_genes, "n_datasets": cfg.n_datasets,
        "chunk_cells": cfg.chunk_cells, "nnz": total_nnz, "mean_nnz_per_cell": total_nnz / cfg.n_cells,
        "seconds": round(secs, 3), "cells_per_s": round(cfg.n_cells / secs, 1),
        "nnz_per_s": round(total_nnz / secs, 1),
        "datasets": [{"dataset_id": p.dataset_id, "n_cells": p.n_cells, "nnz": int(nnz[p.index]),
                      "tissue": vocab.TISSUES[p.tissue][0], "assay": vocab.ASSAYS[p.assay][0]} for p in plans],
        **extra,
    }
