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

import os
from dataclasses import dataclass

import numpy as np
import torch

STREAM_SPEC_VERSION = 1


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
    gene_medians: np.ndarray | None  # rank: aligned with the vocabulary's genes
    tokenizer: str
    max_len: int
    n_bins: int
    census_organism: str | None = None  # a Census mirror, read in place (store.census_view)
    version: int = STREAM_SPEC_VERSION


def streamable(source) -> bool:
    """A store path, or a query of a store or a local Census mirror that selects by obs filter only
    (no subsample, no gene subset)."""
    from .query import QueryConfig

    if isinstance(source, QueryConfig):
        where = source.source == "store" or bool(source.uri)  # remote Census: tokenized on the driver
        return where and not (source.per_label_cap or source.fraction < 1.0 or source.genes)
    return isinstance(source, (str, os.PathLike)) and not str(source).endswith(".h5ad")


def plan_stream(model, source, label: str, label_map: dict | None = None) -> StreamSpec:
    """Driver side: label counts from one obs scan, the vocabulary check, the worker's recipe."""
    from .query import QueryConfig, select

    q = source if isinstance(source, QueryConfig) else QueryConfig(source="store", uri=os.fspath(source))
    store = _open(q.uri, q.organism if q.source == "census" else None, None)
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
        print(f"[atlasflow finetune] {len(dropped)} of {len(known)} input genes are not in the checkpoint "
              f"vocabulary and are dropped (e.g. {', '.join(dropped[:5])})")
    med = None
    if model.meta["tokenizer"] == "rank":
        med = np.array([model.medians[f] for f in model.vocab.gene_feature_ids], dtype=np.float64)
    census = q.organism if q.source == "census" else None
    return StreamSpec(store=q.uri if census else store.uri, timestamp_ms=int(store.timestamp_ms),
                      obs_filter=q.obs_value_filter or None,
                      label=label, classes=tuple(classes), counts=tuple(counts[c] for c in classes),
                      label_map=label_map, vocab=model.vocab.to_dict(), gene_medians=med,
                      tokenizer=model.meta["tokenizer"], max_len=int(model.meta["max_len"]),
                      n_bins=int(model.meta["n_bins"]), census_organism=census)


def stream_loader(spec: StreamSpec, batch_size: int, seed: int, rank: int, world_size: int):
    """This rank's loader over the store (all cells matching the filter, labelled or not)."""
    from atlasflow.loader import LoaderConfig, Vocab, make_loader

    if spec.version != STREAM_SPEC_VERSION:
        raise ValueError(f"StreamSpec.version: {spec.version} unsupported (this atlasflow reads {STREAM_SPEC_VERSION})")
    cfg = LoaderConfig(tokenizer=spec.tokenizer, max_len=spec.max_len, n_bins=spec.n_bins, batch_size=batch_size,
                       shuffle=True, seed=seed, obs_filter=spec.obs_filter, obs_columns=(spec.label,),
                       rank=rank, world_size=world_size, remainder="pad", timestamp_ms=spec.timestamp_ms,
                       num_workers=0)
    store = _open(spec.store, spec.census_organism, spec.timestamp_ms)
    return make_loader(store, cfg, vocab=Vocab.from_dict(spec.vocab), gene_medians=spec.gene_medians)


def _open(uri: str, census_organism: str | None, timestamp_ms: int | None):
    if census_organism:
        from atlasflow.store.census_view import CensusView

        return CensusView(uri, census_organism, timestamp_ms)
    from atlasflow.store import open_store

    return open_store(uri, timestamp_ms)


def stream_batches(spec: StreamSpec, batch_size: int, seed: int, rank: int, world_size: int):
    """Endless (batch, class index) pairs, epoch after epoch; unlabelled cells have class -1."""
    loader = stream_loader(spec, batch_size, seed, rank, world_size)
    cats = loader.dataset.obs_categories[spec.label]
    code = {c: i for i, c in enumerate(spec.classes)}
    lm = spec.label_map
    class_of = torch.tensor([code.get(v if lm is None else lm.get(v), -1) for v in cats] or [-1], dtype=torch.long)
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            yield batch, class_of[batch[f"obs.{spec.label}"]]
        epoch += 1


def memory_batches(data: dict, batch_size: int, seed: int, rank: int, world_size: int):
    """Endless (batch, class index) pairs over this rank's cells r, r + world, ... of a tokenized set."""
    from atlasflow.loader.batching import collate

    from .finetune import arrays_to_block

    block = arrays_to_block(data)
    y_all = torch.tensor(np.asarray(data["y"]), dtype=torch.long)  # ray.get arrays are read-only
    mine = np.arange(rank, len(block), world_size)
    if len(mine) == 0:
        raise ValueError(f"finetune: {len(block)} cells cannot feed {world_size} workers")
    rng = np.random.default_rng([seed, rank])
    while True:
        order = rng.permutation(mine)
        for a in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[a:a + batch_size]
            yield collate(block, idx), y_all[idx]
