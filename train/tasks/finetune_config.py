"""``FinetuneConfig``: every setting of a fine-tune, validated at construction (see ``finetune.py``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..model import check_pooling

MODES = ("frozen", "full")


@dataclass(frozen=True)
class FinetuneConfig:
    label: str = "cell_type"
    mode: str = "full"
    pooling: str = "mean"
    steps: int = 600  # at most; early stopping usually ends sooner
    batch_size: int = 32
    lr: float = 1e-3  # head
    encoder_lr: float = 1e-3  # full mode: the top block's rate
    layer_decay: float = 1.0  # full mode: block i gets encoder_lr * layer_decay ** (n_layers - 1 - i)
    weight_decay: float = 0.01
    warmup_steps: int = 20
    head_dropout: float = 0.1
    # depth augmentation: per-cell keep rate, log-uniform in thin_range, for a thin_prob share of cells
    thin_range: tuple[float, float] | None = (0.05, 1.0)
    thin_prob: float = 0.5
    # early stopping on a validation split held out from the training cells
    val_fraction: float = 0.15
    val_by: str = "dataset_id"  # streamed stores: the group column of the validation split
    eval_every: int = 25
    patience: int = 6  # evaluations without a better validation loss before stopping
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    min_workers: int = 0  # < num_workers: elastic (Ray Train restarts on as many as fit, at least this)
    ckpt_every: int = 0  # steps between resume checkpoints (a multiple of eval_every; 0 = only the final)
    max_failures: int = 0  # Ray Train restarts from the last resume checkpoint
    use_gpu: bool = False
    in_process: bool = False  # one worker in this process (no Ray): quick evaluations
    storage_path: str = "./atlasflow_runs"
    name: str = "finetune"

    def __post_init__(self):
        if self.thin_range is not None:
            object.__setattr__(self, "thin_range", tuple(float(v) for v in self.thin_range))
        if self.mode not in MODES:
            raise ValueError(f"FinetuneConfig.mode: must be one of {MODES}, got {self.mode!r}")
        check_pooling(self.pooling, "FinetuneConfig.pooling")
        if not self.label:
            raise ValueError("FinetuneConfig.label: name the obs column holding the labels")
        for name, lo in (("steps", 1), ("batch_size", 1), ("num_workers", 1), ("warmup_steps", 0),
                         ("eval_every", 1), ("patience", 1), ("seed", 0), ("min_workers", 0), ("ckpt_every", 0),
                         ("max_failures", -1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"FinetuneConfig.{name}: must be an int >= {lo}, got {v!r}")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinetuneConfig.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"FinetuneConfig.layer_decay: must lie in (0, 1], got {self.layer_decay}")
        if self.weight_decay < 0:
            raise ValueError(f"FinetuneConfig.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"FinetuneConfig.head_dropout: must lie in [0, 1), got {self.head_dropout}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"FinetuneConfig.val_fraction: must lie in [0, 1), got {self.val_fraction}")
        if self.thin_range is not None:
            lo, hi = self.thin_range if len(self.thin_range) == 2 else (0, -1)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"FinetuneConfig.thin_range: (lo, hi) with 0 < lo <= hi <= 1, or None; "
                                 f"got {self.thin_range}")
        if not 0 <= self.thin_prob <= 1:
            raise ValueError(f"FinetuneConfig.thin_prob: must lie in [0, 1], got {self.thin_prob}")
        if self.min_workers > self.num_workers:
            raise ValueError(f"FinetuneConfig.min_workers: {self.min_workers} is more than num_workers "
                             f"{self.num_workers}")
        if self.ckpt_every % self.eval_every:
            raise ValueError(f"FinetuneConfig.ckpt_every: {self.ckpt_every} must be a multiple of eval_every "
                             f"{self.eval_every} (checkpoints are taken at evaluations)")
        if self.in_process and self.num_workers != 1:
            raise ValueError("FinetuneConfig.in_process: runs one worker; set num_workers=1")
        if not self.name or "/" in self.name:
            raise ValueError(f"FinetuneConfig.name: a non-empty name without '/', got {self.name!r}")

    @property
    def thin(self) -> tuple | None:
        return None if self.thin_range is None or self.thin_prob == 0 else (self.thin_range, self.thin_prob)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"FinetuneConfig.{bad[0]}: unknown setting")
        return cls(**d)
