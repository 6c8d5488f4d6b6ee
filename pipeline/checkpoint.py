"""Checkpoints: DeepSpeed's sharded save/load plus our state.json, written so that a crash never leaves a broken
`latest`.

Layout: CKPT/step_000100/ (DeepSpeed files + state.json + rank_NNNNN.pt: each rank's RNG states and data-stream
position), CKPT/latest (text: the tag). Every rank writes its
shards into CKPT/.tmp-step_000100/; after a barrier rank 0 adds state.json, renames the directory into place and
only then replaces `latest` (write + fsync + rename). `latest` has DeepSpeed's format, so
`engine.load_checkpoint(CKPT)` and DeepSpeed's zero_to_fp32 tooling read our directories as they are.

Resuming on another cluster: ZeRO-1/2/3 shards belong to the number of ranks that wrote them. A run resumed on
another number of ranks (at the same ZeRO stage) first converts the checkpoint into DeepSpeed's universal format
(`deepspeed.checkpoint.ds_to_universal`, into CKPT/step_N/universal/, once, by rank 0) and loads that
(`checkpoint.load_universal`); ZeRO-0 checkpoints hold whole states and load on any number of ranks. The ranks'
own files (RNG states, data positions) then no longer map one to one: the RNGs are seeded afresh, and the data
positions of all old ranks are re-laid onto the new streams (pipeline/data.py `relayout`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import faults

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden sibling, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
    faults.inject("save", step, dist.get_rank())  # tests: a kill here proves the save atomic
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


@dataclass
class Resume:
    """The checkpoint a run resumes from, and how it loads on this run's ranks."""

    path: Path  # the checkpoint directory `latest` names
    state: dict[str, Any]  # its state.json
    same_ranks: bool  # saved by as many ranks as now: each rank's file is its own
    universal: bool  # ZeRO shards of another layout: loaded through DeepSpeed's universal format

    @property
    def world_size(self) -> int:
        return self.state.get("world_size", 1)


def find(root: Path, world_size: int, zero_stage: int) -> Resume | None:
    """What `latest` holds, checked against this run's ranks and ZeRO stage; None when there is no checkpoint."""
    from pipeline.config import ConfigError

    path = latest(Path(root))
    if path is None:
        return None
    state = read_state(path)
    saved_stage, saved_world = state.get("zero_stage", 0), state.get("world_size", 1)
    if saved_stage != zero_stage:  # DeepSpeed's universal loader finds no model files of another stage's layout
        raise ConfigError(f"zero.stage={zero_stage}, but {path} was saved at ZeRO-{saved_stage}: resume it at "
                          f"zero.stage={saved_stage} (any number of ranks)")
    return Resume(path, state, same_ranks=saved_world == world_size,
                  universal=zero_stage > 0 and saved_world != world_size)


def to_universal(resume: Resume, rank: int, workers: int = 1) -> Path:
    """DeepSpeed's universal checkpoint of `resume`, made once by rank 0 (into a temporary name, then renamed),
    while the other ranks wait for it by polling: no collective, whose timeout a conversion of billions of
    parameters could outlast (a failure of rank 0 ends them through pipeline/faults.py)."""
    out = resume.path / "universal"
    if rank == 0 and not out.is_dir():
        tmp = resume.path / ".tmp-universal"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(resume.path),
               "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers",
               str(max(1, workers // 2)), "--inject_missing_state"]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if r.returncode:
            lines = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()
            raise RuntimeError(f"ds_to_universal failed on {resume.path} (exit {r.returncode}): {lines[-1]}")
        (resume.path / "latest_universal").unlink(missing_ok=True)  # its pointer names the temporary folder
        os.rename(tmp, out)
        _fsync_dir(resume.path)
    while not out.is_dir():
        time.sleep(1)
    return out


def load(engine, resume: Resume, rank: int) -> dict[str, Any] | None:
    """Restore model, optimizer, scheduler and loss scaler; with the same ranks, this rank's RNG states too.
    Returns this rank's file without its RNG states, or None when the checkpoint was saved by other ranks."""
    if resume.universal:  # the engine was built with checkpoint.load_universal
        engine.model.load_checkpoint(str(resume.path), tag="universal", load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    else:
        engine.model.load_checkpoint(str(resume.path.parent), tag=resume.path.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if not resume.same_ranks:
        return None
    rank_state = torch.load(rank_file(resume.path, rank), weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    return rank_state


def every_rank_state(resume: Resume, key: str) -> list[Any]:
    """`key` of every saved rank's file, in rank order: read by rank 0 and broadcast (one reader, not N x N)."""
    states = None
    if dist.get_rank() == 0:
        states = [torch.load(rank_file(resume.path, r), weights_only=True)[key] for r in range(resume.world_size)]
    box = [states]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from one of our runs or checkpoints (ZeRO shards merged), a Hugging Face save directory
    (model.safetensors or pytorch_model.bin beside config.json), or a file: torch (.pth, .pt, .bin, a
    {"state_dict"|"model": ...} wrapper too) or safetensors. Keys as that source names them."""
    path = Path(path)
    if path.is_dir():
        saved = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        return load_weights(saved[0]) if saved else consolidated_state_dict(resolve(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
