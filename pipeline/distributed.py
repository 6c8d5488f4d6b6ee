"""Rank discovery and process-group set-up, from the environment alone (torchrun, SLURM's srun, or one process).

The same `pipeline.train` entry point runs under `launch local` (torchrun), `launch slurm` (one srun task per
GPU) and plain torchrun; what differs is only which variables describe the job.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, as `scontrol show hostnames` expands it: 'gpu[001-003,007],login1' ->
    gpu001 gpu002 gpu003 gpu007 login1; several bracket groups and text after them too: 'r[1-2]n[01-02]-ib' ->
    r1n01-ib r1n02-ib r2n01-ib r2n02-ib."""
    hosts = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):  # commas outside brackets separate hosts
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            numbers = [""]
            if ranges:
                numbers = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    numbers += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
            expanded = [f"{head}{text}{n}" for head in expanded for n in numbers]
        hosts += expanded
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_env(env: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
        return DistInfo(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun: one task per GPU
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        # The port derives from the job id so concurrent jobs sharing a first node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return DistInfo(
            rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_tasks_per_node(env) or max(1, world // nodes),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
            master_port=port)
    return DistInfo(master_port=free_port())


def _tasks_per_node(env) -> int | None:
    """SLURM_TASKS_PER_NODE is '8(x4)' or '8(x3),7' (uneven): the count on this node's kind, the first."""
    count = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    return int(count.group()) if count else None


def init(device: str) -> DistInfo:
    """Join the process group (NCCL on GPUs, gloo on CPU). The variables DeepSpeed reads are exported first."""
    import deepspeed

    info = from_env()
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=info.master_addr,
                      MASTER_PORT=str(info.master_port))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    else:
        # Share the cores among the ranks of this node instead of each rank spawning one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    return info
