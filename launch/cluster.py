"""Cluster profiles: everything site- or hardware-specific lives in `configs/clusters/NAME.yaml`, read here.

A profile says what a node holds (GPUs, memory and peak FLOP/s per rank), which precision the hardware trains in,
the environment every rank gets (NCCL settings) and the SLURM defaults (partition, time, CPUs and memory, how long
before the time limit the job is told to save). `launch slurm` and `launch plan` take `--cluster NAME` (a file in
configs/clusters/) or `--cluster PATH` (a site's own copy); no site constant lives in the code.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import PRECISIONS, ConfigError

PROFILES = Path(__file__).resolve().parent.parent / "configs" / "clusters"


@dataclass
class SlurmDefaults:
    partition: Optional[str] = None  # None: the cluster's default partition
    time: str = "24:00:00"  # any SLURM time format: MM, HH:MM:SS, D-HH:MM...
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None  # per node; 0 = all of it; None = no --mem
    signal_delay_s: int = 120  # USR2 this many seconds before the time limit: save, then requeue
    max_requeues: int = 100  # submitit's max_num_timeout: time-outs before a run is given up
    constraint: Optional[str] = None
    sbatch: Dict[str, Any] = field(default_factory=dict)  # any other #SBATCH option: {exclusive: true, ...}


@dataclass
class Cluster:
    name: str = ""
    description: str = ""
    gpu: Optional[str] = None  # None: CPU-only nodes (gloo, fp32)
    gpus_per_node: int = 0
    ranks_per_node: Optional[int] = None  # one rank per GPU; on CPU-only nodes, set here
    memory_gb: float = 0.0  # per rank: one GPU's memory, or a CPU rank's share of the node
    host_memory_gb: float = 0.0  # per node (0: not given)
    peak_tflops: Dict[str, float] = field(default_factory=dict)  # dense peak per rank, by precision
    precision: str = "fp32"
    assumed_mfu: float = 0.4  # `launch plan` converts FLOPs into time with it
    env: Dict[str, str] = field(default_factory=dict)
    slurm: SlurmDefaults = field(default_factory=SlurmDefaults)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_node else "cpu"

    def ranks(self, nodes: int) -> int:
        return nodes * (self.ranks_per_node or self.gpus_per_node)

    def sbatch_parameters(self, *, time: Optional[str] = None, partition: Optional[str] = None,
                          account: Optional[str] = None, qos: Optional[str] = None) -> dict[str, Any]:
        """submitit parameters every job on this cluster gets (time in minutes, partition, account, CPUs, memory,
        environment); the arguments, given on the command line, win over the profile's defaults."""
        s = self.slurm
        params: dict[str, Any] = dict(time=parse_time(time or s.time), cpus_per_task=s.cpus_per_task)
        limit = partition_max_minutes(partition or s.partition)
        if limit and params["time"] > limit:  # sbatch would refuse it, or leave it pending for ever
            print(f"note: --time {params['time']} min is over the partition's MaxTime of {limit} min: jobs of "
                  f"{limit} min, a training run chains them by requeue", file=sys.stderr)
            params["time"] = limit
        if self.env:
            params["setup"] = [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]
        if s.mem_gb is not None:  # per node; --mem=0 is all of it
            params["mem"] = f"{int(s.mem_gb)}G" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}M"
        for key, given in (("partition", partition), ("account", account), ("qos", qos)):
            if value := given or getattr(s, key):
                params[key] = value
        if s.constraint:
            params["constraint"] = s.constraint
        if s.sbatch:
            params["additional_parameters"] = dict(s.sbatch)
        return params

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s of one rank in `precision`; refuses a precision the hardware does not have."""
        if precision not in self.peak_tflops:
            raise ConfigError(
                f"train.precision={precision}: {self.gpu or 'CPU'} ({self.name}) has no {precision} "
                f"(supported: {', '.join(self.peak_tflops)}; this cluster trains in {self.precision})")
        return self.peak_tflops[precision] * 1e12


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load(name_or_path: str, gpus_per_node: Optional[int] = None) -> Cluster:
    """A profile by name (configs/clusters/NAME.yaml) or path; `gpus_per_node` overrides the profile's."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"--cluster {name_or_path}: unknown cluster (known: {', '.join(available())}, "
                              f"or the path of a profile YAML)")
    elif not path.is_file():
        raise ConfigError(f"--cluster {name_or_path}: file not found")
    try:
        raw = OmegaConf.load(path)
        cluster: Cluster = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Cluster), raw))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # YAML syntax
        raise ConfigError(f"{path}: invalid profile ({str(e).splitlines()[0]})") from None
    cluster.name = cluster.name or path.stem
    if gpus_per_node is not None:
        if not cluster.gpus_per_node:
            raise ConfigError(f"--gpus-per-node {gpus_per_node}: cluster {cluster.name} has no GPUs")
        cluster.gpus_per_node = gpus_per_node
        cluster.ranks_per_node = None
    _check(cluster, path)
    return cluster


def _check(c: Cluster, path: Path) -> None:
    if c.gpus_per_node < 0 or (c.gpus_per_node == 0 and not c.ranks_per_node):
        raise ConfigError(f"{path}: a CPU-only profile (gpus_per_node: 0) needs ranks_per_node")
    if c.gpus_per_node and c.ranks_per_node not in (None, c.gpus_per_node):
        raise ConfigError(f"{path}: ranks_per_node must equal gpus_per_node (one rank per GPU)")
    if c.precision not in PRECISIONS or c.precision not in c.peak_tflops:
        raise ConfigError(f"{path}: precision {c.precision!r} needs a peak_tflops entry and one of {PRECISIONS}")
    if not c.gpus_per_node and c.precision != "fp32":
        raise ConfigError(f"{path}: CPU-only nodes train in fp32")
    if not 0 < c.assumed_mfu <= 1:
        raise ConfigError(f"{path}: assumed_mfu must be within (0, 1]")
    parse_time(c.slurm.time)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def partition_max_minutes(partition: Optional[str]) -> Optional[int]:
    """MaxTime of `partition` (None: the cluster's default one) in minutes, as sinfo reports it; None when it is
    unlimited, or where there is no sinfo to ask (a laptop's --dry-run)."""
    if not shutil.which("sinfo"):
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%l", *(["-p", partition] if partition else [])],
                             capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return None
    for line in out.split():
        name, _, limit = line.partition("|")
        if name.rstrip("*") == partition or (partition is None and name.endswith("*")):
            return None if limit.lower() in ("infinite", "unlimited", "n/a") else parse_time(limit)
    return None


def parse_time(text: str) -> int:
    """A SLURM time limit -> whole minutes (rounded up). Formats as sbatch --time: M, M:S, H:M:S, D-H, D-H:M,
    D-H:M:S. submitit needs minutes: it compares the run time with the limit to tell time-outs from preemptions."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"--time {text}: not a SLURM time (e.g. 90, 72:00:00, 3-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text}: must be positive")
    return -(-seconds // 60)
