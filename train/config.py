"""Training configuration: one small frozen dataclass per component, loaded from TOML presets or
files and overridden with dotted ``section.key=value`` strings (the CLI's ``--set``).

Every error names the offending field as ``section.key`` so a typo in a 40-line TOML file is found
at once, before Ray starts any worker.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from atlasflow.store.schema import check_format

CONFIG_FORMAT_VERSION = 1
from atlasflow.loader.encodings import NAMES as TOKENIZERS, get_encoding  # noqa: E402  (one registry)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    # "auto": flash varlen kernel for packed batches on CUDA, masked SDPA otherwise.
    attention: str = "auto"

    def __post_init__(self):
        for k in ("d_model", "n_layers", "n_heads", "d_ff"):
            _check(getattr(self, k) > 0, f"model.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(self.d_model % self.n_heads == 0, "model.d_model",
               f"{self.d_model} is not divisible by model.n_heads={self.n_heads}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.attention in ("auto", "sdpa", "varlen"), "model.attention",
               f"must be one of auto|sdpa|varlen, got {self.attention!r}")


@dataclass(frozen=True)
class DataConfig:
    store: str = ""
    tokenizer: str = "rank"
    max_len: int = 256
    batch_size: int = 16
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    obs_filter: str = ""  # "" = no filter (TOML has no null)
    gene_filter: str = ""
    n_bins: int = 51
    bin_width: float = 1.0  # ebin: width of the shared log1p(CP10k) grid (scBERT: 1)
    # obs columns whose values become tokens after <cls> (assay, dataset_id, ...); their vocabulary is
    # saved in the checkpoint (loader/meta_tokens.py). [] = none.
    meta_columns: tuple[str, ...] = ()
    split: str = ""  # "" | train | val | test
    split_by: str = "dataset_id"
    # Pack each loader batch into rows of max_len tokens, attention per cell (no FLOP on padding).
    pack: bool = True
    bucket_batches: int = 8  # loader: batches whose cells are length-sorted together (0 = off)
    timestamp_ms: int = 0  # store snapshot; 0 = pinned when the run first starts, kept on resume
    # Vocabulary = the genes with a nonzero count somewhere in the store (gene stats nnz > 0); false
    # keeps every store gene (a softmax row for each gene no cell ever expresses).
    expressed_only: bool = True
    # Depth augmentation (loader): keep-rate drawn log-uniformly in [lo, hi] for a share thin_prob of
    # the cells, binomial thinning of their counts before tokenization. [] = off.
    thin_range: tuple[float, ...] = ()
    thin_prob: float = 0.5

    def __post_init__(self):
        _check(self.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {'|'.join(TOKENIZERS)}, "
               f"got {self.tokenizer!r}")
        _check(self.max_len >= 8, "data.max_len", f"must be >= 8, got {self.max_len}")
        _check(self.max_len >= get_encoding(self.tokenizer).min_len, "data.max_len",
               f"the {self.tokenizer} encoding needs >= {get_encoding(self.tokenizer).min_len}, got {self.max_len}")
        _check(self.bin_width > 0, "data.bin_width", f"must be > 0, got {self.bin_width}")
        _check(self.batch_size > 0, "data.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.n_bins >= 3, "data.n_bins", f"must be >= 3, got {self.n_bins}")
        _check(self.bucket_batches >= 0, "data.bucket_batches", f"must be >= 0, got {self.bucket_batches}")
        _check(self.timestamp_ms >= 0, "data.timestamp_ms", f"must be >= 0, got {self.timestamp_ms}")
        _check(self.split in ("", "train", "val", "test"), "data.split",
               f"must be ''|train|val|test, got {self.split!r}")
        tr = self.thin_range
        _check(len(tr) in (0, 2) and (not tr or 0 < tr[0] <= tr[1] <= 1), "data.thin_range",
               f"must be [] (off) or [lo, hi] keep-rates with 0 < lo <= hi <= 1, got {list(tr)}")
        _check(0.0 <= self.thin_prob <= 1.0, "data.thin_prob", f"must be in [0, 1], got {self.thin_prob}")


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15
    # BERT recipe for gene tokens (rank): of the selected, 80% <mask>, 10% random gene, 10% kept.
    replace_prob: float = 0.8
    random_prob: float = 0.1
    mask_value: float = -1.0  # what a masked expression value is replaced with (value tokenizer)

    def __post_init__(self):
        _check(0.0 < self.mask_prob < 1.0, "masking.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        _check(0.0 <= self.replace_prob <= 1.0, "masking.replace_prob", f"must be in [0, 1], got {self.replace_prob}")
        _check(0.0 <= self.random_prob <= 1.0 - self.replace_prob, "masking.random_prob",
               f"must be in [0, 1 - replace_prob], got {self.random_prob}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """``kind``: "mlm" (masked tokens, ``masking``) or "ntp" (next-token prediction with a causal model,
    tGPT; needs an ordered encoding with gene-id targets: rank, rank_value, uce). ``value_weight``: beta
    of the joint gene + value loss L_id + beta * L_value (rank_value). ``cell_weight``: gamma of the
    cell term L + gamma * L_cell, where L_cell scores the cell's whole gene set from its mean-pooled vector
    alone (``objective``; 0 = off, the model then has no cell head). ``contrast_weight``: lambda of the
    contrastive term L + lambda * L_contrast: every cell of a batch is seen as two views (each keeps a random
    share of the cell's genes, drawn per cell from ``contrast_keep``, then masked on its own) and the
    projected mean-pooled vectors of the two views must pick each other out of the batch (InfoNCE at
    temperature ``contrast_temperature``; 0 = off, one view, no projection head)."""

    kind: str = "mlm"
    value_weight: float = 1.0
    cell_weight: float = 0.0
    contrast_weight: float = 0.0
    contrast_temperature: float = 0.1
    contrast_keep: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self):
        _check(self.kind in ("mlm", "ntp"), "objective.kind", f"must be mlm|ntp, got {self.kind!r}")
        _check(self.value_weight >= 0, "objective.value_weight", f"must be >= 0, got {self.value_weight}")
        _check(self.cell_weight >= 0, "objective.cell_weight", f"must be >= 0, got {self.cell_weight}")
        _check(self.contrast_weight >= 0, "objective.contrast_weight", f"must be >= 0, got {self.contrast_weight}")
        _check(self.contrast_temperature > 0, "objective.contrast_temperature",
               f"must be > 0, got {self.contrast_temperature}")
        lo, hi = self.contrast_keep
        _check(0 < lo <= hi <= 1, "objective.contrast_keep", f"must be 0 < low <= high <= 1, got {self.contrast_keep}")
        _check(self.contrast_weight == 0 or self.kind == "mlm", "objective.contrast_weight",
               "the contrastive views are masked views: it needs objective.kind = 'mlm'")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.max_steps
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {self.grad_accum}")


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int = 20  # optimizer steps
    epochs: int = 1  # upper bound: training stops at whichever comes first
    log_every: int = 1
    ckpt_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA, or CPU for experiments)
    strategy: str = "ddp"  # ddp | fsdp
    compile: bool = False
    # Held-out MLM loss: every eval_every steps (and at the end) on a fixed set of eval_cells cells of
    # the 'val' split (data.split = "train" only: otherwise nothing is held out). 0 = off.
    eval_every: int = 50
    eval_cells: int = 512
    # Cells sampled at start-up to fit the unigram / per-position baselines (signals.py).
    baseline_cells: int = 2048

    def __post_init__(self):
        for k in ("max_steps", "epochs", "log_every", "ckpt_every", "baseline_cells"):
            _check(getattr(self, k) > 0, f"train.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("eval_every", "eval_cells"):
            _check(getattr(self, k) >= 0, f"train.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(self.precision in ("fp32", "bf16"), "train.precision", f"must be fp32|bf16, got {self.precision!r}")
        _check(self.strategy in ("ddp", "fsdp"), "train.strategy", f"must be ddp|fsdp, got {self.strategy!r}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "atlasflow-pretrain"
    storage_path: str = "./atlasflow_runs"
    # Ray Train workers: an int, or an elastic range "min-max" (stored as min_workers + num_workers):
    # Ray Train restarts a failed run on as many workers as fit, at least min_workers (see trainer.py)
    num_workers: int | str = 2
    min_workers: int = 0  # 0 = num_workers (not elastic)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0 with use_gpu -> 1 GPU per worker
    max_failures: int = 2
    num_to_keep: int = 2
    # Fault injection for tests/drills: rank fail_rank raises once at this optimizer step
    # (0 = off; the env var ATLASFLOW_FAIL_AT_STEP sets it from the driver).
    fail_at_step: int = 0
    fail_rank: int = 0
    trace_dir: str = ""  # if set, every rank appends the soma_joinids of each step here (tests)

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "run.name", f"must be a non-empty name without '/', "
               f"got {self.name!r}")
        _check(bool(self.storage_path), "run.storage_path", "must not be empty")
        _parse_workers(self)
        _check(self.num_workers >= 1, "run.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(1 <= self.min_workers <= self.num_workers, "run.min_workers",
               f"must be in [1, run.num_workers={self.num_workers}], got {self.min_workers}")
        _check(self.cpus_per_worker > 0, "run.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, "run.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.max_failures >= -1, "run.max_failures", f"must be >= -1, got {self.max_failures}")
        _check(self.num_to_keep >= 1, "run.num_to_keep", f"must be >= 1, got {self.num_to_keep}")
        _check(self.fail_at_step >= 0, "run.fail_at_step", f"must be >= 0, got {self.fail_at_step}")
        _check(0 <= self.fail_rank < self.num_workers, "run.fail_rank",
               f"must be in [0, run.num_workers), got {self.fail_rank}")


def _parse_workers(r) -> None:
    n = r.num_workers
    if isinstance(n, str):
        lo, sep, hi = n.partition("-")
        try:
            lo_i, hi_i = (int(lo), int(hi)) if sep else (int(n), int(n))
        except ValueError:
            raise ValueError(f"run.num_workers: expected an integer or a range like \"2-8\", got {n!r}") from None
        object.__setattr__(r, "num_workers", hi_i)
        object.__setattr__(r, "min_workers", lo_i if sep else r.min_workers)
    elif isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"run.num_workers: expected an integer or a range like \"2-8\", got {n!r}")
    if not r.min_workers:
        object.__setattr__(r, "min_workers", r.num_workers)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "masking": MaskingConfig, "objective": ObjectiveConfig,
            "optim": OptimConfig,
            "train": ScheduleConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        enc = get_encoding(self.data.tokenizer)
        _check(self.objective.kind != "ntp" or enc.causal_ok, "objective.kind",
               f"ntp needs an ordered encoding with gene-id targets (rank, rank_value, uce), not data.tokenizer="
               f"{self.data.tokenizer!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        d["data"]["thin_range"] = list(d["data"]["thin_range"])
        d["objective"]["contrast_keep"] = list(d["objective"]["contrast_keep"])
        if d["run"]["min_workers"] == d["run"]["num_workers"]:
            d["run"]["min_workers"] = 0  # not elastic: an override of num_workers alone stays fixed
        d["format_version"] = CONFIG_FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        version = d.pop("format_version", CONFIG_FORMAT_VERSION)
        check_format("config", version, CONFIG_FORMAT_VERSION, "format_version")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown config section (known: {', '.join(SECTIONS)})")
        parts = {}
        for name, klass in SECTIONS.items():
            section = d.get(name, {})
            if not isinstance(section, dict):
                raise ValueError(f"{name}: must be a table of settings, got {type(section).__name__}")
            parts[name] = _build_section(name, klass, section)
        return cls(**parts)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        d = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ValueError(f"{key}: overrides are section.key with section one of {', '.join(SECTIONS)}")
            d[section][name] = value
        return Config.from_dict(d)


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"{text}: an override must look like section.key=value")
    try:  # TOML literal syntax: 3e-4, true, [0.9, 0.95], "a string"
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set data.store=/path/to/store
    return key.strip(), value


def _build_section(name: str, klass, values: dict):
    hints = typing.get_type_hints(klass)
    known = {f.name for f in fields(klass)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{name}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return klass(**kwargs)


def _coerce(where: str, hint, value):
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(where, typing.get_args(hint)[0], v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("atlasflow.train").joinpath("presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> Config:
    path = resources.files("atlasflow.train").joinpath("presets", f"{name}.toml")
    if not path.is_file():
        raise ValueError(f"preset: unknown preset {name!r} (known: {', '.join(preset_names())})")
    return Config.from_dict(tomllib.loads(path.read_text()))


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config: {path} is not valid TOML: {exc}") from exc
    try:
        return Config.from_dict(d)
    except ValueError as exc:
        exc.add_note(f"in config file {path}")
        raise
