"""`python -m launch local CONFIG --nproc N [key=value ...]`: N real processes on this machine via torchrun."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline import config


def command(config_path: str, nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pipeline.train", config_path, *overrides]


def run(config_path: str, nproc: int, overrides: list[str]) -> int:
    # Refuse a bad config here, once, before N processes start and each fails on its own.
    cfg = config.load(config_path, overrides)
    config.validate(cfg, world_size=nproc, device=config.resolve_device(cfg))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command(config_path, nproc, overrides), env=env)
