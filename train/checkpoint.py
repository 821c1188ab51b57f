"""Training checkpoints: a directory of named parts with a format version.

    format.json        {"format": "atlasflow.train.checkpoint", "format_version": 1, "parts": [...]}
    model.pt           encoder state dict (tensors only)
    optimizer.pt       optimizer state (tensors + plain numbers)
    scheduler.pt       LR scheduler state
    loader.pt          loader state (the epoch's phase and the batches every rank delivered; one for all
                       ranks, so a run resumes on any world size)
    train_state.json   step, epoch, cells/tokens seen, logged metric history
    config.json        the full training Config
    vocab.json         the vocabulary (loader's Vocab.to_dict())
    model.json         what is needed to rebuild the encoder (tokenizer, n_tokens, max_len, n_bins)
    baselines.pt       the fitted unigram / per-position baselines of the learning signals (signals.py)

Everything binary is read with ``torch.load(weights_only=True)``: a checkpoint can never run
arbitrary pickled code. JSON parts stay human-readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from atlasflow.store.schema import check_format

from .config import Config
from .model import CellEncoder

CHECKPOINT_FORMAT = "atlasflow.train.checkpoint"
CHECKPOINT_FORMAT_VERSION = 2  # 2: one loader.pt instead of loader_rank{r}.pt
READABLE_VERSIONS = (1, 2)  # weights, vocabulary and config of a version-1 checkpoint are read as ever


def save_checkpoint(path: str | Path, *, model_state: dict, config: Config, vocab: dict, model_meta: dict,
                    train_state: dict, optimizer_state: dict | None = None, scheduler_state: dict | None = None,
                    loader_state: dict | None = None, baselines: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    parts = []

    def put_pt(name: str, obj) -> None:
        tmp = path / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path / name)
        parts.append(name)

    def put_json(name: str, obj) -> None:
        (path / name).write_text(json.dumps(obj, indent=1, sort_keys=True))
        parts.append(name)

    put_pt("model.pt", model_state)
    if optimizer_state is not None:
        put_pt("optimizer.pt", optimizer_state)
    if scheduler_state is not None:
        put_pt("scheduler.pt", scheduler_state)
    if loader_state is not None:
        put_pt("loader.pt", loader_state)
    if baselines is not None:
        put_pt("baselines.pt", baselines)
    put_json("train_state.json", train_state)
    put_json("config.json", config.to_dict())
    put_json("vocab.json", vocab)
    put_json("model.json", model_meta)
    # Written last: a directory without format.json is an incomplete checkpoint.
    put_json("format.json", {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                             "parts": parts + ["format.json"]})
    return path


def checkpoint_format(path: str | Path) -> dict:
    path = Path(path)
    f = path / "format.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not an atlasflow checkpoint (no format.json; incomplete or wrong path)")
    meta = json.loads(f.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: format.json format is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    check_format("checkpoint", meta.get("format_version"), READABLE_VERSIONS, str(path))
    return meta


def read_part(path: str | Path, name: str, map_location="cpu"):
    """One named part: JSON parts as Python objects, ``.pt`` parts with weights_only=True."""
    path = Path(path)
    meta = checkpoint_format(path)
    if name not in meta["parts"]:
        raise KeyError(f"{path}: checkpoint has no part {name!r} (parts: {', '.join(meta['parts'])})")
    if name.endswith(".json"):
        return json.loads((path / name).read_text())
    return torch.load(path / name, map_location=map_location, weights_only=True)


def build_encoder(config: Config, model_meta: dict) -> CellEncoder:
    """The encoder a checkpoint's ``model.json`` describes (positions cover max_len + metadata tokens)."""
    n_meta = len((model_meta.get("meta_vocab") or {}).get("columns", ()))
    return CellEncoder(config.model, model_meta["tokenizer"], model_meta["n_tokens"], model_meta["max_len"] + n_meta,
                       model_meta["n_bins"], causal=model_meta.get("objective", "mlm") == "ntp",
                       gene_end=model_meta.get("gene_end"), cell_head=bool(model_meta.get("cell_head", False)),
                       contrast_head=bool(model_meta.get("contrast_head", False)))


def load_checkpoint(path: str | Path, map_location="cpu"):
    """(encoder in eval mode, Config, Vocab) from a checkpoint directory, for embedding/fine-tuning."""
    path = Path(path)
    config = Config.from_dict(read_part(path, "config.json"))
    encoder = build_encoder(config, read_part(path, "model.json"))
    encoder.load_state_dict(read_part(path, "model.pt", map_location))
    encoder.to(map_location).eval()
    vocab_d = read_part(path, "vocab.json")
    try:
        from atlasflow.loader import Vocab
    except ImportError:  # loader not installed: hand back the versioned dict
        return encoder, config, vocab_d
    return encoder, config, Vocab.from_dict(vocab_d)
