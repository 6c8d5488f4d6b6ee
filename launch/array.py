"""SLURM job arrays: one array task per item, then one merge job that runs once every task has ended.

`data_tools download --slurm` (one task per slice of a URL list) and `pipeline.eval ... --slurm` (one task per
dataset) use it. The merge job depends on the array with `afterany`, so it runs whether tasks succeeded, failed or
were cancelled, and reports which are missing: a rerun of the same command redoes only those (both commands
skip work already done). submitit pickles the task and merge callables and writes every job's logs and result
under FOLDER (FOLDER/ARRAYID_TASK/, FOLDER/MERGEID/).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit

from launch import cluster as clusters
from launch.slurm import sbatch_errors
from pipeline.config import ConfigError


@dataclass
class ArrayRequest:
    cluster: str
    name: str
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    parallelism: Optional[int] = None  # tasks running at once (sbatch --array=0-N%P)
    gpus_per_task: int = 0  # on a GPU cluster; CPU-only profiles get none

    @classmethod
    def from_args(cls, args: argparse.Namespace, name: str, gpus_per_task: int = 0) -> "ArrayRequest":
        return cls(cluster=args.slurm, name=name, time=args.time, partition=args.partition, account=args.account,
                   qos=args.qos, parallelism=args.parallelism, gpus_per_task=gpus_per_task)


@dataclass
class Submitted:
    array_id: str
    tasks: list[submitit.Job]
    merge: submitit.Job
    folder: Path

    def describe(self, what: str) -> str:
        return (f"submitted array job {self.array_id} ({len(self.tasks)} tasks: {what}) and merge job "
                f"{self.merge.job_id} (runs when they end)\n"
                f"logs: {self.folder}/{self.array_id}_TASK/ and {self.folder}/{self.merge.job_id}/")


def add_arguments(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("SLURM job array", f"with --slurm: {what}, then a merge job")
    g.add_argument("--slurm", metavar="CLUSTER", help="submit to SLURM: a profile in configs/clusters/ or a YAML path")
    g.add_argument("--partition")
    g.add_argument("--time", help="time limit per task, SLURM format (default: the profile's)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--parallelism", type=int, help="array tasks running at once (default: all)")
    g.add_argument("--wait", action="store_true", help="wait for the merge job and print its result")
    return g


def executor(req: ArrayRequest, folder: Path) -> submitit.SlurmExecutor:
    c = clusters.load(req.cluster)
    params = c.sbatch_parameters(time=req.time, partition=req.partition, account=req.account, qos=req.qos)
    params.update(job_name=req.name, nodes=1, ntasks_per_node=1)
    if c.gpus_per_node and req.gpus_per_task:
        params["gpus_per_node"] = req.gpus_per_task
    if req.parallelism:
        params["array_parallelism"] = req.parallelism
    if not submitit.SlurmExecutor.affinity() > 0:
        raise ConfigError("srun/sbatch not found: submit from a SLURM login node")
    ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=0)
    ex.update_parameters(**params)
    return ex


def submit(req: ArrayRequest, folder: Path, task: Callable[[Any], Any], items: Sequence[Any],
           merge: Callable[[], Any]) -> Submitted:
    """`task(item)` for every item as one array, then `merge()` once all of them have ended."""
    if not items:
        raise ConfigError("nothing to submit: no array tasks")
    ex = executor(req, folder)
    with sbatch_errors():
        tasks = ex.map_array(task, items)
        array_id = tasks[0].job_id.split("_")[0]
        ex.update_parameters(dependency=f"afterany:{array_id}", job_name=f"{req.name}-merge")
        merged = ex.submit(merge)
    return Submitted(array_id, tasks, merged, folder)
