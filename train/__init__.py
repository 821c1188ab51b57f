"""atlasflow.train: MLM pretraining of a single-cell transformer with Ray Train.

Public API: ``Config`` (+ ``load_preset``, ``load_config``), ``CellEncoder`` (``embed(batch, pooling)``),
``load_checkpoint(path) -> (encoder, config, vocab)``, ``run_training(config) -> dict``.
Ray is imported only when training starts.
"""

from .checkpoint import load_checkpoint, read_part, save_checkpoint
from .config import Config, load_config, load_preset, preset_names
from .model import CellEncoder
from .trainer import run_training

__all__ = ["CellEncoder", "Config", "load_checkpoint", "load_config", "load_preset", "preset_names", "read_part",
           "run_training", "save_checkpoint"]
