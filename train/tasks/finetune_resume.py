"""Resume checkpoints of a fine-tuning run (``FinetuneConfig.ckpt_every``): what a Ray Train restart
needs to continue exactly: weights, optimizer, early-stopping state, the batches' position (a
stream's loader state re-cuts the epoch for a new worker count) and the torch RNG.

    finetune_resume.json   {"format": "atlasflow.finetune_resume", "format_version": 1, "step": ...}
    resume.pt              the state (tensors, numbers, strings; read with weights_only=True)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from atlasflow.store.schema import check_format

RESUME_FORMAT, RESUME_FORMAT_VERSION = "atlasflow.finetune_resume", 1


def checkpoint_resume(ctx, metrics: dict, state: dict) -> None:
    """Rank 0 writes the resume checkpoint (every rank's stream is at the same position); all report."""
    from ..loop import _gather_objects

    positions = {json.dumps(b["position"]) for b in _gather_objects(state["batches"], ctx.world_size)}
    if len(positions) != 1:
        raise RuntimeError(f"finetune: ranks' streams are at different positions {sorted(positions)}")
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="atlasflow-ft-resume-") as tmp:
        torch.save(state, Path(tmp) / "resume.pt")
        (Path(tmp) / "finetune_resume.json").write_text(json.dumps(
            {"format": RESUME_FORMAT, "format_version": RESUME_FORMAT_VERSION, "step": state["step"]}))
        ctx.report(metrics, tmp)


def read_resume(d) -> dict | None:
    meta_path = Path(d) / "finetune_resume.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    check_format("fine-tuning resume checkpoint", meta.get("format_version"), RESUME_FORMAT_VERSION, str(meta_path))
    return torch.load(Path(d) / "resume.pt", map_location="cpu", weights_only=True)
