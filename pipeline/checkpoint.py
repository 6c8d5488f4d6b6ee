"""Checkpoints: DeepSpeed's sharded save/load plus our state.json, written so that a crash never leaves a broken
`latest`.

Layout: CKPT/step_000100/ (DeepSpeed files + state.json + rank_NNNNN.pt: each rank's RNG states and data-stream
position), CKPT/latest (text: the tag). Every rank writes its
shards into CKPT/.tmp-step_000100/; after a barrier rank 0 adds state.json, renames the directory into place and
only then replaces `latest` (write + fsync + rename). `latest` has DeepSpeed's format, so
`engine.load_checkpoint(CKPT)` and DeepSpeed's zero_to_fp32 tooling read our directories as they are.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG = "step_{:06d}"
STATE = "state.json"
_TAG_RE = re.compile(r"^step_(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def latest(root: Path) -> Path | None:
    """The directory `latest` points at, or None when there is no complete checkpoint."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer}: points at {path}, which holds no {STATE}")
    return path


def resolve(path: str | Path) -> Path:
    """A run dir, a checkpoints dir or one checkpoint -> one checkpoint directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE).is_file():
            return candidate
        if (candidate / "latest").is_file():
            return latest(candidate)
    raise FileNotFoundError(f"{path}: no checkpoint (expected state.json or a `latest` file)")


def rank_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, state: dict[str, Any], rank_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its DeepSpeed shards and its rank file. Returns the checkpoint directory.
    Refuses (NonFiniteError) weights that hold NaN or Inf: the previous checkpoint stays `latest`."""
    from pipeline.engine import NonFiniteError

    if not engine.params_finite():
        raise NonFiniteError(f"step {step}: weights hold NaN/Inf; not saving (latest stays {latest(Path(root))})")
    root = Path(root)
    tag = TAG.format(step)
    tmp_tag = f".tmp-{tag}"
    if dist.get_rank() == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a run killed while saving
    _barrier()
    engine.model.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, rank_file(root / tmp_tag, dist.get_rank()))
    _barrier()
    if os.environ.get("PIPELINE_FAULT") == f"kill_during_save@{step}":  # fault injection: tests prove atomicity
        os.kill(os.getpid(), 9)
    final = root / tag
    if dist.get_rank() == 0:
        atomic_write_text(root / tmp_tag / STATE, json.dumps(state, indent=1))
        if final.exists():  # a step re-saved after resuming from an older checkpoint
            shutil.rmtree(final)
        os.rename(root / tmp_tag, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((int(m[1]), p) for p in root.iterdir() if (m := _TAG_RE.match(p.name)))
    current = (root / "latest").read_text().strip()
    for _, path in steps[:-keep_last]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, root: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG states from `latest`.
    Returns (state.json, this rank's file without its RNG states), or None when there is no checkpoint."""
    path = latest(Path(root))
    if path is None:
        return None
    engine.model.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                 load_lr_scheduler_states=True)
    state = read_state(path)
    rank_state: dict[str, Any] = {}
    if state.get("world_size") == dist.get_world_size():  # else ranks differ: weights resume, streams restart
        rank_state = torch.load(rank_file(path, dist.get_rank()), weights_only=True)
        set_rng_state(rank_state.pop("rng"))
    return state, rank_state


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE).read_text())


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one checkpoint directory, on CPU, without an engine or process group.

    With ZeRO the fp32 masters are spread over the optimizer shards and DeepSpeed's zero_to_fp32 merges them;
    without ZeRO the model file holds the whole module."""
    path = Path(path)
    if any(path.glob("*optim_states.pt")) and read_state(path).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in module.items()}
