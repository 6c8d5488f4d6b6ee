"""A trained model for evaluation, from a run directory or one checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline import checkpoint, config
from pipeline.tasks import get_task


def load_model(path: str | Path, device: str = "cpu"):
    """The task and its model with fp32 weights from a run dir / checkpoint dir, without DeepSpeed engines."""
    ckpt = checkpoint.resolve(path)
    state = checkpoint.read_state(ckpt)
    cfg = config.from_dict(state["config"], source=str(ckpt / checkpoint.STATE))
    task = get_task(cfg.task)(cfg)
    model = task.build_model(initial=False)
    model.load_state_dict(checkpoint.consolidated_state_dict(ckpt))
    return cfg, task, model.to(device).eval(), ckpt


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
