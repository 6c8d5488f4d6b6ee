"""`python -m launch plan CONFIG --cluster NAME --nodes N [key=value ...]`: will it fit, how long will it take.

Everything is sized on the meta device (nothing allocated, seconds on a laptop):
- parameters and training FLOPs per sample come from the task (its meta-device model and FLOP counter);
- activations are the tensors autograd keeps for backward during one forward of a micro-batch, traced with a
  saved-tensors hook, in the training dtype, with attention counted as a fused kernel (flash / memory-efficient
  SDPA, what runs on A100/H100/V100) keeps it: q, k, v, output and one log-sum-exp per row, never the s x s
  probabilities that the meta device's reference implementation would save;
- model state follows the ZeRO paper (Rajbhandari et al. 2020): with fp16/bf16, 2 bytes per parameter of weights,
  2 of gradients and 12 of optimizer state (fp32 master, Adam m and v); in fp32, 4 + 4 + 8. Stage 1 splits the
  optimizer state over the ranks, stage 2 the gradients too, stage 3 the weights too; offload moves them to CPU;
- DeepSpeed's communication buffers follow our ds_config (pipeline/engine.py: zero.reduce_bucket_size, overlap_comm,
  contiguous_gradients; DeepSpeed's own defaults where they are not set);
- host memory per node for the loader: per rank, data.num_workers workers, each holding its own LOADER_WORKER_MIB
  (measured by bench.loader_memory; shard indexes, not shards, so it does not grow with the shards) and the
  batches it keeps ready (pipeline/data.py PREFETCH, micro-batches as the loader delivers them: Task.loader_batch).
Time = samples / (ranks x peak FLOP/s x MFU / FLOPs per sample), MFU assumed (the profile's, or --mfu). Beside it,
the MFU `python -m bench.train --write` last measured for this model (else this family) on this hardware and
precision, when there is one (bench/measured_mfu.json).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from launch import cluster as clusters
from pipeline import config
from pipeline.data import PREFETCH
from pipeline.tasks import get_task

GiB = 2**30
HEADROOM = 0.9  # the rest of a GPU's memory goes to the CUDA context, NCCL and allocator fragmentation
# A loader worker's own memory (USS, beyond the pages it shares with its trainer) with 4 open shards of 1,000 to
# 50,000 samples each: 71-76 MiB (python -m bench.loader_memory, docs/PERFORMANCE.md).
LOADER_WORKER_MIB = 75


@dataclass
class Plan:
    config: str
    model: str
    cluster: clusters.Cluster
    nodes: int
    ranks: int
    precision: str
    zero_stage: int
    parameters: int
    flops_per_sample: float
    micro_batch: int
    global_batch: int
    accumulation: int
    steps: int
    weights: float  # bytes per rank
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    activations_note: str  # how they were counted (checkpointing)
    offload: str
    mfu: float
    time_limit_min: int
    loader_workers: int  # per rank
    loader_batch: float  # bytes of one micro-batch as the loader delivers it
    measured: Optional[dict] = None  # bench.train's last measurement for this model or family on this hardware

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def capacity(self) -> float:
        return self.cluster.memory_gb * GiB

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.capacity

    @property
    def loader_per_node(self) -> float:
        """Host memory of the loader workers of one node: their own, and the batches they keep ready."""
        per_worker = LOADER_WORKER_MIB * 2**20 + PREFETCH * self.loader_batch
        return self.ranks // self.nodes * self.loader_workers * per_worker

    @property
    def samples_per_s(self) -> float:
        return self.ranks * self.cluster.peak_flops(self.precision) * self.mfu / self.flops_per_sample

    @property
    def seconds(self) -> float:
        return self.steps * self.global_batch / self.samples_per_s

    @property
    def jobs(self) -> int:
        """Jobs in the requeue chain: each gives up signal_delay_s before its limit to save."""
        usable = self.time_limit_min * 60 - self.cluster.slurm.signal_delay_s
        return math.ceil(self.seconds / usable) if usable > 0 else 0


def make(config_path: str, cluster_name: str, nodes: int, gpus_per_node: Optional[int] = None,
         overrides: Sequence[str] = (), mfu: Optional[float] = None, time: Optional[str] = None) -> Plan:
    c = clusters.load(cluster_name, gpus_per_node)
    ranks = c.ranks(nodes)
    cfg = config.load(config_path, [f"train.precision={c.precision}", f"train.device={c.device}", *overrides])
    c.peak_flops(cfg.train.precision)  # the profile's hardware, not this machine's (see launch/slurm.py)
    config.validate(cfg, world_size=ranks, device=None if c.gpus_per_node else "cpu")
    mfu = mfu if mfu is not None else c.assumed_mfu
    if not 0 < mfu <= 1:
        raise config.ConfigError(f"--mfu {mfu}: must be within (0, 1]")
    task = get_task(cfg.task)(cfg)
    model = task.build_model(device="meta")
    n = sum(p.numel() for p in model.parameters())
    t, z = cfg.train, cfg.zero
    mixed = t.precision != "fp32"
    width = 2 if mixed else 4
    weights = 0.0 if z.offload_params else n * width / (ranks if z.stage == 3 else 1)
    gradients = n * width / (ranks if z.stage >= 2 else 1)
    optimizer = 0.0 if z.offload_optimizer else n * (12 if mixed else 8) / (ranks if z.stage >= 1 else 1)
    activations, activations_note = activation_bytes(task, model, t.micro_batch_size, DTYPES[t.precision],
                                                     bool(getattr(cfg.model, "grad_checkpointing", False)))
    return Plan(
        config=config_path, model=cfg.model.name, cluster=c, nodes=nodes, ranks=ranks, precision=t.precision,
        zero_stage=z.stage, parameters=n, flops_per_sample=task.flops_per_sample(),
        micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
        accumulation=t.global_batch_size // (t.micro_batch_size * ranks), steps=t.steps,
        weights=weights, gradients=gradients, optimizer=optimizer,
        activations=activations, activations_note=activations_note, buffers=_buffer_bytes(cfg, n, ranks, width),
        offload=", ".join(k for k in ("optimizer", "params") if getattr(z, f"offload_{k}")),
        mfu=mfu, time_limit_min=clusters.parse_time(time or c.slurm.time), loader_workers=cfg.data.num_workers,
        loader_batch=float(sum(x.numel() * x.element_size() for x in task.loader_batch(t.micro_batch_size).values())),
        measured=measured_mfu(cfg.model.name, cfg.task, c.gpu, t.precision))


MEASURED = Path(__file__).resolve().parent.parent / "bench" / "measured_mfu.json"


def hardware_matches(profile_gpu: Optional[str], hardware: str) -> bool:
    """A profile's GPU (A100-SXM4-80GB; None: CPU nodes) against the device name a benchmark recorded
    (NVIDIA A100-SXM4-80GB, or cpu)."""
    return hardware == "cpu" if not profile_gpu else profile_gpu.lower() in hardware.lower()


def measured_mfu(model: str, task: str, profile_gpu: Optional[str], precision: str,
                 path: Optional[Path] = None) -> Optional[dict]:
    """The newest record of bench.train for this model on this hardware and precision, else for this family."""
    path = path or MEASURED
    if not path.is_file():
        return None
    records = [r for r in json.loads(path.read_text())["records"]
               if hardware_matches(profile_gpu, r["hardware"]) and r["precision"] == precision]
    for same in (lambda r: r["model"] == model, lambda r: r["task"] == task):
        found = sorted((r for r in records if same(r)), key=lambda r: r["date"])
        if found:
            return found[-1]
    return None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing: saves what flash / memory-efficient attention saves for backward."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse):  # type: ignore[override]
        ctx.save_for_backward(q, k, v, out, lse)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise NotImplementedError("sizing only")


def _fused_sdpa(q, k, v, *args, **kwargs):
    with torch.no_grad():
        out = _REFERENCE_SDPA(q, k, v, *args, **kwargs)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return _FusedAttention.apply(q, k, v, out, lse)


_REFERENCE_SDPA = F.scaled_dot_product_attention


def activation_bytes(task, model: nn.Module, micro_batch: int, dtype: torch.dtype,
                     checkpointing: bool = False) -> tuple[float, str]:
    """Bytes autograd keeps for backward during one training forward of `micro_batch` samples (meta device), and
    how they were counted.

    With activation checkpointing, the trace keeps what checkpointing keeps (each block's input and what runs
    outside the blocks), and the backward pass recomputes one block at a time on top of it: one block's share of
    the trace without checkpointing, the block being one of the model's longest nn.ModuleList (its layers)."""
    model = model.to(dtype).train()
    full = _traced(task, model, micro_batch, dtype, checkpointing=False)
    blocks = max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=0)
    if not checkpointing or not blocks:
        return full, ("without checkpointing: upper bound" if checkpointing else "")
    try:
        kept = _traced(task, model, micro_batch, dtype, checkpointing=True)
    except Exception:  # a checkpoint implementation the meta device cannot run: keep the upper bound
        return full, "without checkpointing: upper bound"
    return kept + full / blocks, f"with checkpointing: kept + 1 of {blocks} blocks recomputed"


def _traced(task, model: nn.Module, micro_batch: int, dtype: torch.dtype, checkpointing: bool) -> float:
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(checkpointing)
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t  # views share their base's memory: count it once
        if id(base) not in params:
            kept[id(base)] = base
        return t

    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in task.example_batch(micro_batch, "meta").items()}
    F.scaled_dot_product_attention = _fused_sdpa  # nn.MultiheadAttention looks it up in F at call time
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            task.loss_forward(model, batch)
    finally:
        F.scaled_dot_product_attention = _REFERENCE_SDPA
    return float(sum(t.numel() * t.element_size() for t in kept.values()))


def _buffer_bytes(cfg: config.Config, n: int, ranks: int, width: int) -> float:
    """DeepSpeed's own buffers for our ds_config (its defaults where zero.* leaves them): with contiguous_gradients,
    ZeRO-1/2 allocate reduce_bucket_size elements for the gradients being reduced, twice with overlap_comm, at full
    size whatever the model's (stage_1_and_2.py setup_buckets; ZeRO-1 stages them in fp32), and without it flatten
    up to a bucket at a time; ZeRO-3 keeps one such bucket for the run (stage3.py) and gathers up to
    max_live_parameters weights at a time. Our default bucket is the smaller of DeepSpeed's 5e8 and the model."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pipeline.engine import ds_config

    zero = DeepSpeedZeroConfig(**ds_config(cfg, ranks, parameters=n)["zero_optimization"])
    if cfg.zero.stage in (1, 2):
        if not zero.contiguous_gradients:
            return min(n, zero.reduce_bucket_size) * width
        reduction_width = 4 if cfg.zero.stage == 1 else width
        return zero.reduce_bucket_size * (2 if zero.overlap_comm else 1) * reduction_width
    if cfg.zero.stage == 3:
        bucket = zero.reduce_bucket_size if zero.contiguous_gradients else 0
        return (bucket + min(n, zero.max_live_parameters) + min(n, zero.prefetch_bucket_size)) * width
    return 0.0


def _gb(x: float) -> str:
    return f"{x / GiB:6.2f} GiB"


def render(p: Plan) -> str:
    c = p.cluster
    hw = f"{c.gpus_per_node} x {c.gpu}" if c.gpus_per_node else f"{c.ranks_per_node} CPU ranks"
    split = {0: "replicated", 1: "optimizer split", 2: "optimizer + gradients split", 3: "all split"}[p.zero_stage]
    days = p.seconds / 86400
    unit = "GPU" if c.gpus_per_node else "rank"
    lines = [
        f"plan: {p.config} on {p.nodes} node(s) of {hw} ({c.name}) = {p.ranks} ranks, {p.precision}",
        f"model        {p.model}: {p.parameters / 1e6:,.1f}M parameters, "
        f"{p.flops_per_sample / 1e9:,.1f} GFLOP per training sample (forward + backward)",
        f"batch        global {p.global_batch} = micro {p.micro_batch} x accumulation {p.accumulation} x {p.ranks} ranks",
        f"memory/rank  ZeRO-{p.zero_stage} ({split} over {p.ranks} ranks)"
        + (f", offload: {p.offload}" if p.offload else ""),
        f"  weights      {_gb(p.weights)}",
        f"  gradients    {_gb(p.gradients)}",
        f"  optimizer    {_gb(p.optimizer)}  ({'fp32 master + Adam m, v' if p.precision != 'fp32' else 'Adam m, v'})",
        f"  activations  {_gb(p.activations)}  (micro-batch {p.micro_batch}, traced on the meta device"
        + (f", {p.activations_note})" if p.activations_note else ")"),
        f"  buffers      {_gb(p.buffers)}  (DeepSpeed communication buckets: zero.reduce_bucket_size, "
        "overlap_comm, contiguous_gradients)",
        f"  total        {_gb(p.total)} of {c.memory_gb:g} GiB: "
        + ("fits" if p.fits else f"DOES NOT FIT (limit {HEADROOM:.0%} of memory)"),
        f"host/node    loader {_gb(p.loader_per_node)}  ({p.ranks // p.nodes} ranks x {p.loader_workers} workers, each "
        f"{LOADER_WORKER_MIB} MiB + {PREFETCH} micro-batches of {p.loader_batch / 2**20:.1f} MiB)"
        + (f" of {c.host_memory_gb:g} GiB" if c.host_memory_gb else ""),
        f"throughput   {p.samples_per_s:,.0f} samples/s at {p.mfu:.0%} MFU "
        f"(peak {c.peak_flops(p.precision) / 1e12:g} TFLOP/s per {unit}, {p.precision})",
        "             " + (f"measured: {p.measured['mfu']:.1%} MFU for {p.measured['model']} on "
                           f"{p.measured['hardware']} x {p.measured['ranks']} ({p.measured['date']}, bench.train)"
                           if p.measured else "measured: none for this model family on this hardware "
                                              "(python -m bench.train --write records one)"),
        f"time         {p.steps:,} steps x {p.global_batch:,} = {p.steps * p.global_batch / 1e9:,.2f}B samples: "
        f"{days:,.1f} days, {p.seconds / 3600 * p.ranks:,.0f} {unit}-hours",
        f"SLURM        {p.jobs} job(s) of {p.time_limit_min / 60:g} h chained by requeue "
        f"(max_requeues {c.slurm.max_requeues})"
        + ("" if p.jobs <= c.slurm.max_requeues + 1 else
           ": MORE THAN max_requeues + 1, the chain stops early; raise slurm.max_requeues or --time"),
    ]
    return "\n".join(lines)
