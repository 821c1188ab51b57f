"""Where fine-tuning batches come from: streamed from a store (or a local Census mirror) by each Ray
Train worker, or (for .h5ad files, remote Census and subsampled queries) tokenized once on the
driver and shared in memory.

Streaming: the driver only scans obs for the label counts (class list and class weights) and checks
the vocabulary; every worker then opens the store at the same pinned snapshot and streams its own
partition with ``atlasflow.loader`` (rank/world of the Ray Train run), tokenized with the
checkpoint's vocabulary and, for ``rank``, the pretraining store's gene medians. Nothing is
materialized: memory per worker is the loader's window, whatever the store's size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from atlasflow.store.schema import check_format
from atlasflow.store.view import open_view

log = logging.getLogger(__name__)

STREAM_SPEC_VERSION = 1

# in-memory sets live in finetune_memory (re-exported: one import place for fine-tuning data)
from .finetune_memory import (MemoryBatches, make_tokenizer, memory_batches, memory_set,  # noqa: E402,F401
                              tokenize_rows, tokenizer_spec, validation_batches, validation_split)


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to stream labelled batches (pickled into train_loop_config)."""

    store: str  # store path, or the Census mirror root when census_organism is set
    timestamp_ms: int
    obs_filter: str | None
    label: str
    classes: tuple[str, ...]
    counts: tuple[int, ...]  # cells per class, for the class weights
    label_map: dict | None  # raw label -> class (None = identity); unmapped labels are skipped
    vocab: dict  # the checkpoint's Vocab.to_dict()
    gene_medians: np.ndarray | None  # rank / rank_value: aligned with the vocabulary's genes
    tokenizer: str
    max_len: int
    n_bins: int
    bin_width: float = 1.0  # ebin's grid
    meta_columns: tuple[str, ...] = ()  # metadata tokens from these obs columns (the checkpoint's), via meta_vocab
    meta_vocab: dict | None = None
    census_organism: str | None = None  # a Census mirror, read in place (store.census_view)
    # early stopping: the loader's hash split by this column (train / val fractions), or None
    val_by: str | None = None
    val_fractions: tuple[float, float, float] | None = None
    version: int = STREAM_SPEC_VERSION


def streamable(source) -> bool:
    """A store path, or a query of a store or a local Census mirror that selects by obs filter only
    (no subsample, no gene subset)."""
    from atlasflow.store.query import QueryConfig

    if isinstance(source, QueryConfig):
        where = source.source == "store" or bool(source.uri)  # remote Census: tokenized on the driver
        return where and not (source.per_label_cap or source.fraction < 1.0 or source.genes)
    return isinstance(source, (str, os.PathLike)) and not str(source).endswith(".h5ad")


def plan_stream(model, source, label: str, label_map: dict | None = None, val_by: str | None = None,
                val_fraction: float = 0.0) -> StreamSpec:
    """Driver side: label counts from one obs scan, the vocabulary check, the worker's recipe.

    With ``val_by`` and ``val_fraction`` > 0, groups of that column are split by the loader's hash
    split (train / val); when that leaves either side empty (too few groups), there is no
    validation split and fine-tuning runs its full step count (said on stdout).
    """
    from atlasflow.store.query import QueryConfig, select

    q = source if isinstance(source, QueryConfig) else QueryConfig(source="store", uri=os.fspath(source))
    store = open_view(q.uri, q.census_organism)
    try:
        sel = select(QueryConfig(**{**q.__dict__, "label": label, "obs_columns": ()}))
    except ValueError as exc:
        if "QueryConfig.label" in str(exc):
            raise ValueError(f"FinetuneConfig.label: {exc}") from exc
        raise
    counts: dict[str, int] = {}
    for raw, n in sel.counts.items():
        cls = raw if label_map is None else label_map.get(raw)
        if cls is not None:
            counts[cls] = counts.get(cls, 0) + n
    if not counts:
        raise ValueError(f"finetune: the input has no labelled cells in column {label!r}")
    classes = sorted(counts)
    lut = model.vocab.lookup_table_for_var(store.var())
    known = store.var()["feature_id"].astype(str)
    dropped = [f for f, j in zip(known, known.index) if lut[j] < 0]
    if dropped:
        log.warning("%d of %d input genes are not in the checkpoint vocabulary and are dropped (e.g. %s)",
                    len(dropped), len(known), ", ".join(dropped[:5]))
    med = None
    if model.encoding.needs_medians:
        med = np.array([model.medians[f] for f in model.vocab.gene_feature_ids], dtype=np.float64)
    census = q.organism if q.source == "census" else None
    vfr = _stream_val_split(store, val_by, val_fraction) if val_by and val_fraction > 0 else None
    return StreamSpec(store=q.uri if census else store.uri, timestamp_ms=int(store.timestamp_ms),
                      obs_filter=q.obs_filter or None,
                      label=label, classes=tuple(classes), counts=tuple(counts[c] for c in classes),
                      label_map=label_map, vocab=model.vocab.to_dict(), gene_medians=med,
                      tokenizer=model.meta["tokenizer"], max_len=int(model.meta["max_len"]),
                      n_bins=int(model.meta["n_bins"]), bin_width=float(model.meta.get("bin_width", 1.0)),
                      meta_columns=model.meta_vocab.columns if model.prefix_tokens is not None else (),
                      meta_vocab=model.meta_vocab.to_dict() if model.prefix_tokens is not None else None,
                      census_organism=census,
                      val_by=val_by if vfr else None, val_fractions=vfr)


def _stream_val_split(store, val_by: str, fraction: float):
    from atlasflow.loader import split_of

    fr = (1.0 - fraction, fraction, 0.0)
    try:
        values = set(store.obs([val_by])[val_by].astype(str))
    except Exception as exc:  # a column the store lacks: no validation split, said so
        log.warning("no validation split: obs column %r unreadable (%s)", val_by, exc)
        return None
    sides = {split_of(v, fr) for v in values}
    if not {"train", "val"} <= sides:
        log.warning("no validation split: the %d %s group(s) all hash to %s; training runs every step without "
                    "early stopping", len(values), val_by, sorted(sides))
        return None
    return fr


def stream_loader(spec: StreamSpec, batch_size: int, seed: int, rank: int, world_size: int,
                  split: str | None = None, thin: tuple | None = None):
    """This rank's loader over the store (all cells matching the filter, labelled or not).

    ``split``: "train" / "val" side of the spec's validation split (None: every cell).
    ``thin``: ((lo, hi), prob) depth augmentation, when the loader has it.
    """
    from dataclasses import fields

    from atlasflow.loader import LoaderConfig, Vocab, make_loader

    check_format("stream spec", spec.version, STREAM_SPEC_VERSION, "StreamSpec.version")
    extra = {}
    if split is not None and spec.val_fractions:
        extra = {"split": split, "split_by": spec.val_by, "split_fractions": spec.val_fractions}
    if thin is not None and "thin_range" in {f.name for f in fields(LoaderConfig)}:
        extra.update(thin_range=tuple(thin[0]), thin_prob=float(thin[1]))
    cfg = LoaderConfig(tokenizer=spec.tokenizer, max_len=spec.max_len, n_bins=spec.n_bins, bin_width=spec.bin_width,
                       meta_columns=spec.meta_columns, batch_size=batch_size,
                       shuffle=split != "val", seed=seed, obs_filter=spec.obs_filter, obs_columns=(spec.label,),
                       rank=rank, world_size=world_size, remainder="pad", timestamp_ms=spec.timestamp_ms,
                       num_workers=0, **extra)
    store = open_view(spec.store, spec.census_organism, spec.timestamp_ms)
    return make_loader(store, cfg, vocab=Vocab.from_dict(spec.vocab), gene_medians=spec.gene_medians,
                       meta_vocab=spec.meta_vocab)


def _class_of(loader, spec: StreamSpec) -> torch.Tensor:
    cats = loader.dataset.obs_categories[spec.label]
    code = {c: i for i, c in enumerate(spec.classes)}
    lm = spec.label_map
    return torch.tensor([code.get(v if lm is None else lm.get(v), -1) for v in cats] or [-1], dtype=torch.long)


def stream_validation(spec: StreamSpec, batch_size: int = 128, max_cells: int = 4096) -> list:
    """The validation side of the split, read once (every rank reads all of it, so all agree)."""
    if not spec.val_fractions:
        return []
    loader = stream_loader(spec, batch_size, 0, 0, 1, split="val")
    class_of, out, n = _class_of(loader, spec), [], 0
    for batch in loader:
        y = class_of[batch[f"obs.{spec.label}"]]
        keep = y >= 0
        if keep.any():
            out.append(({k: v[keep] for k, v in batch.items()}, y[keep]))
            n += int(keep.sum())
        if n >= max_cells:
            break
    return out


class StreamBatches:
    """Endless (batch, class index) pairs, epoch after epoch; unlabelled cells have class -1.

    ``state_dict()`` is the epoch plus the loader's state, so a restarted fine-tune continues the
    epoch exactly, on the same or another number of workers (the loader re-cuts what is left)."""

    def __init__(self, spec: StreamSpec, batch_size: int, seed: int, rank: int, world_size: int,
                 thin: tuple | None = None):
        self.loader = stream_loader(spec, batch_size, seed, rank, world_size, split="train", thin=thin)
        self.class_of, self.label = _class_of(self.loader, spec), spec.label
        self.epoch, self._it, self._resumed = 0, None, False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if not self._resumed:
                    self.loader.dataset.set_epoch(self.epoch)
                self._resumed, self._it = False, iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
                continue
            return batch, self.class_of[batch[f"obs.{self.label}"]]

    def state_dict(self) -> dict:
        loader = self.loader.state_dict()
        return {"kind": "stream", "position": [self.epoch, loader["position"]], "epoch": self.epoch, "loader": loader}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.loader.dataset.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it, self._resumed = None, True


def stream_batches(spec: StreamSpec, batch_size: int, seed: int, rank: int, world_size: int,
                   thin: tuple | None = None) -> StreamBatches:
    return StreamBatches(spec, batch_size, seed, rank, world_size, thin)


# -- labelled cells read on the driver ---------------------------------------------------
def labelled_counts(source, label: str, block_cells: int = 4096, label_map: dict | None = None,
                    group_by: str = "dataset_id"):
    """(CSR counts, feature ids, labels, groups) of every labelled cell of a store / .h5ad / QueryConfig.

    Groups: the ``group_by`` column where the input has it, else the input's name (one group).
    """
    import os

    import scipy.sparse as sp

    from .pretrained import iter_input

    mats, labels, groups = [], [], []
    fids0 = None
    name = os.path.basename(os.path.normpath(str(source)))
    cols = (label,) if group_by in ("", label) else (label, group_by)
    for ids, obs, X, fids in iter_input(source, block_cells, obs_columns=cols):
        if label not in obs.columns:
            raise ValueError(f"FinetuneConfig.label: input has no obs column {label!r} "
                             f"(columns: {', '.join(map(str, obs.columns))})")
        if fids0 is None:
            fids0 = list(fids)
        elif list(fids) != fids0:
            raise ValueError(f"finetune: input {name} changes its gene columns between blocks")
        lab = obs[label].astype(str).to_numpy(dtype=object)
        if label_map is not None:
            lab = np.array([label_map.get(v) for v in lab], dtype=object)
        keep = np.array([v is not None for v in lab], dtype=bool)
        if keep.any():
            mats.append(sp.csr_matrix(X)[keep])
            labels.append(lab[keep].astype(str))
            grp = obs[group_by].astype(str).to_numpy() if group_by in obs.columns else np.full(len(obs), name)
            groups.append(np.asarray(grp, dtype=str)[keep])
    if not mats:
        raise ValueError(f"finetune: the input has no labelled cells in column {label!r}")
    return sp.vstack(mats, format="csr"), fids0, np.concatenate(labels), np.concatenate(groups)


def shared_genes(feature_ids, X_train, X_other) -> set:
    """Feature ids detected (nonzero) in at least one cell of each matrix (columns = ``feature_ids``)."""
    a = np.asarray((X_train > 0).sum(0)).ravel() > 0
    b = np.asarray((X_other > 0).sum(0)).ravel() > 0
    return {f for f, k in zip(feature_ids, a & b) if k}


def genes_shared_with(fids, X, target) -> set:
    """Feature ids of ``fids`` detected in ``X`` and in at least one cell of the ``target`` source."""
    import scipy.sparse as sp

    from .pretrained import iter_input

    detected = set()
    for _, _, Xt, tf in iter_input(target, 4096):
        hit = np.asarray((sp.csr_matrix(Xt) > 0).sum(0)).ravel() > 0
        detected |= {f for f, k in zip(tf, hit) if k}
    mine = np.asarray((X > 0).sum(0)).ravel() > 0
    return {f for f, k in zip(fids, mine) if k and f in detected}
