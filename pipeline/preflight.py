"""Everything a run will read, checked before its first step: a run never trains for hours and then fails on a
path it could have checked at start.

What is checked: the checkpoint the run would resume from (`latest` readable, saved at this ZeRO stage), the shard
specs (`data.train`, `data.val`), and every config key whose dataclass field declares
`metadata={"path": KIND}`: KIND "file", "dir" or "exists" (either) must exist, "imagefolder" must be a labelled
ImageFolder tree
(pipeline/eval/datasets.py). A family declares its own such keys in its ModelConfig (a palette, `init_from`), and
they are checked like these. Keys marked `"read_by": "main"` are read by rank 0 alone (evaluation) and checked
there; the rest on every rank, since a path can exist on one node and not on another (node-local disks). Keys
marked `"read": "at start"` (initial weights) are read only by a run that starts, not by one that resumes.

`check` is a collective in the trainer: every rank checks what it reads, rank 0 learns every rank's problems, and
all ranks raise the same ConfigError, one line per problem with the ranks it concerns.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator

from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")


def path_keys(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict]]:
    """(dotted key, value, field metadata) for every set field that declares `path` metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from path_keys(value, key + ".")
        elif "path" in f.metadata and value not in (None, ""):
            yield key, value, dict(f.metadata)


def shard_problems(key: str, spec) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a shard spec: none of its local shards exists is an error; some missing is a warning
    (the stream skips and counts them, as img2dataset leaves gaps where a shard failed). Remote shards (pipe:,
    URLs) are not probed here."""
    from pipeline.data import sources

    try:
        srcs = sources(spec)
    except ValueError as e:
        return [str(e)], []
    urls = [u for s in srcs for u in s.urls]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if not urls:
        return [f"{key}={spec!r}: no shards"], []
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        return [f"{key}={_short(spec)}: none of its {len(local)} shards exists (e.g. {missing[0]})"], []
    if missing:
        return [], [f"{key}: {len(missing)} of {len(local)} shards missing (e.g. {missing[0]}); they are skipped"]
    return [], []


def problems(cfg: Config, main: bool = True) -> tuple[list[str], list[str]]:
    """(errors, warnings) for what this process reads; `main`: it is the rank that evaluates."""
    from pipeline import checkpoint

    errors, warnings = [], []
    resuming = False
    try:
        resuming = checkpoint.find(cfg.run_dir / "checkpoints", 1, cfg.zero.stage) is not None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        errors.append(str(e))
    for key in ("train", "val"):
        spec = getattr(cfg.data, key)
        if spec:
            e, w = shard_problems(f"data.{key}", spec)
            errors += e
            warnings += w
    for key, value, meta in path_keys(cfg):
        if (meta.get("read_by") == "main" and not main) or (meta.get("read") == "at start" and resuming):
            continue
        kind = meta["path"]
        if kind == "imagefolder":
            from pipeline.eval.datasets import check

            try:
                check(value)
            except (FileNotFoundError, ValueError) as e:
                errors.append(f"{key}={value}: {e}")
        elif kind == "dir" and not os.path.isdir(value):
            errors.append(f"{key}={value}: directory not found")
        elif kind == "file" and not os.path.isfile(value):
            errors.append(f"{key}={value}: file not found")
        elif kind == "exists" and not os.path.exists(value):
            errors.append(f"{key}={value}: no such file or directory")
    return errors, warnings


def check(cfg: Config, rank: int = 0, world_size: int = 1) -> None:
    """Collective when world_size > 1: raises ConfigError on every rank if any rank found a problem."""
    mine = problems(cfg, main=rank == 0)
    everyone = [mine]
    if world_size > 1:
        import torch.distributed as dist

        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
    errors, warnings = _by_message(everyone, 0), _by_message(everyone, 1)
    if rank == 0:
        for line in warnings:
            log.warning("%s", line)
    if errors:
        raise ConfigError("\n".join(errors))


def _by_message(everyone: list, which: int) -> list[str]:
    """One line per distinct message, naming its ranks when not all of them."""
    ranks: dict[str, list[int]] = {}
    for rank, found in enumerate(everyone):
        for message in found[which]:
            ranks.setdefault(message, []).append(rank)
    n = len(everyone)
    return [m if len(r) == n else f"{m} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
            for m, r in ranks.items()]


def _short(spec) -> str:
    text = str(spec)
    return text if len(text) <= 120 else text[:117] + "..."
