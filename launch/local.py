"""`python -m launch local CONFIG --nproc N [key=value ...]`: N real processes on this machine via torchrun.

The config and every path it names are checked here once, before any process starts (each rank checks again). A
failing rank logs its error itself (once for the job: pipeline/faults.py); torchrun then stops the other ranks,
and this command ends with one line naming the rank that failed first, exit status 1.
"""
from __future__ import annotations

import logging
import os
import sys

from pipeline import config, preflight


def command(config_path: str, nproc: int, overrides: list[str]) -> list[str]:
    """torchrun's arguments (`python -m torch.distributed.run ...` runs the same)."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline.train", config_path, *overrides]


def run(config_path: str, nproc: int, overrides: list[str]) -> int:
    # Refuse a bad config or a missing path here, once, before N processes start and each fails on its own.
    cfg = config.load(config_path, overrides)
    config.validate(cfg, world_size=nproc, device=config.resolve_device(cfg))
    preflight.check(cfg)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its banner; failures come below
    try:
        torchrun.run(torchrun.parse_args(command(config_path, nproc, overrides)))
    except ChildFailedError as e:
        for line in summary(e.failures):
            print(line, file=sys.stderr, flush=True)
        return 1
    return 0


def summary(failures: dict) -> list[str]:
    """torchrun's failed ranks -> the lines that name the cause: the first failure a rank reported (its error
    file, pipeline/faults.py), and any rank killed by a signal torchrun did not send (kill -9, the OOM killer)."""
    reported = [f.message.get("message", "") if isinstance(f.message, dict) else f.message
                for _, f in sorted(failures.items()) if os.path.isfile(f.error_file)]
    killed = [f"error: rank {r} was killed by {f.signal_name()}" for r, f in sorted(failures.items())
              if f.exitcode < 0 and f.signal_name() not in ("SIGTERM",)]
    if reported or killed:
        return killed + [m if m.startswith("error: ") else f"error: {m}" for m in reported[:1]]
    rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    return [f"error: rank {rank} exited with status {first.exitcode}; the log above names the error"]
