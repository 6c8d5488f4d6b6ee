"""DeepSpeed: our config -> ds_config, initialize with AdamW groups and warmup+cosine, step, precision casts."""
from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from pipeline.config import Config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# zero.* keys passed to DeepSpeed's zero_optimization as they are, when set
COMM_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients")
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's own default


def grad_accumulation(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)


def ds_config(cfg: Config, world_size: int, universal: bool = False, parameters: int | None = None) -> dict[str, Any]:
    """`universal`: the checkpoint this engine resumes from is in DeepSpeed's universal format (another layout).
    `parameters`: the trainable parameter count, which caps the default gradient bucket (reduce_bucket_size)."""
    t, z = cfg.train, cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    zero.update({k: getattr(z, k) for k in COMM_KEYS if getattr(z, k) is not None})
    if z.reduce_bucket_size is None and parameters:
        # DeepSpeed allocates its bucket (two with overlap_comm) at full size whatever the model: a model smaller
        # than 5e8 elements fills only Ψ of it (bench.zero_memory: 1907 MiB allocated, 29 MiB filled for CLIP-tiny).
        # A bucket of Ψ reduces exactly the same gradients at the same moments (one reduction at the end of the
        # backward either way), so it only returns the unused memory: 0.7 GB per rank for ViT-B/32 in bf16.
        zero["reduce_bucket_size"] = min(DEEPSPEED_REDUCE_BUCKET, parameters)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # fp16: dynamic loss scaling from 2^16, halved on overflow (the step is skipped), as on V100s.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": t.precision == "bf16"},
        # Our AdamW is a torch optimizer (fused on GPU); DeepSpeed's own only matter for offload.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine (CLIP) or linear (ViT) decay from lr to lr * min_lr_ratio at train.steps.
    Step-indexed, so a resumed run gets the same LR as an uninterrupted one."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio
    linear = cfg.optim.decay == "linear"

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * ((1 - progress) if linear else 0.5 * (1 + math.cos(math.pi * progress)))

    return fn


def model_init(cfg: Config, world_size: int, partition: bool):
    """Context to build the model in. With ZeRO-3 and a task whose modules initialise their own parameters
    (`Task.zero_init`), each parameter is partitioned as its module is built, so no rank ever holds the whole model
    (ImageGPT-XL). Otherwise the model is built whole in host memory and deepspeed.initialize partitions it."""
    return deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, world_size),
                               enabled=partition and cfg.zero.stage == 3)


class NonFiniteError(RuntimeError):
    """Training diverged: too many steps in a row with non-finite gradients, or non-finite weights."""


class Engine:
    """A DeepSpeed engine built from our config; the trainer calls forward through `model`, then backward/step."""

    def __init__(self, cfg: Config, model: torch.nn.Module, param_groups: list[dict], device: str, world_size: int,
                 universal: bool = False):
        self.cfg, self.device = cfg, torch.device(device)
        # DeepSpeed skips a step whose gradients are not finite under ZeRO >= 1 and with fp16 loss scaling;
        # plain ZeRO-0 in fp32/bf16 would apply it, so there the trainer stops at the first non-finite loss.
        self.skips_nonfinite = cfg.zero.stage > 0 or cfg.train.precision == "fp16"
        self._skipped_before, self.skipped_in_a_row = 0, 0
        self.dtype = DTYPES[cfg.train.precision]
        self.accumulation = grad_accumulation(cfg, world_size)
        o = cfg.optim
        kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        if cfg.zero.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(param_groups, fused=device == "cuda", **kwargs)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg, world_size, universal, trainable),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        if cfg.train.compile:
            self.model.compile()  # DeepSpeed compiles its module in place, with the accelerator's backend

    def average_buffers(self) -> None:
        """Every rank's BatchNorm running statistics become their mean over the ranks (ResNet towers).

        Each rank's statistics follow its own batches, and a checkpoint keeps rank 0's module state while evaluation
        runs on rank 0: averaged first, both describe every rank's data. (The mean of the ranks' running variances,
        without the variance between their running means: as the ranks' batches come from one distribution, that
        term is of the order of the noise the running averages already hold.) Training itself is unchanged: each
        rank normalises with its own batch's statistics, as DDP without SyncBatchNorm does."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        stats = [b for m in self.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for b in (m.running_mean, m.running_var) if b is not None]
        if not stats:
            return
        flat = torch.cat([b.detach().float().reshape(-1) for b in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(mean.view_as(b))

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    def to_device(self, batch: dict) -> dict:
        """Move a batch to the device; floating tensors take the engine's precision."""
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None, non_blocking=True)
                for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed applies the update at the accumulation boundary."""
        self.model.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def skipped_steps(self) -> int:
        return int(self.model.skipped_steps)

    def check_divergence(self, step: int, loss: torch.Tensor) -> None:
        """After each optimizer step: abort after train.max_skipped_in_a_row skipped steps in a row (fp16
        overflows at the start are normal; an endless run of them is divergence), or at once where non-finite
        gradients are not skipped."""
        if not self.skips_nonfinite:
            if not torch.isfinite(loss).all():
                raise NonFiniteError(f"step {step}: loss is {loss.item()} and ZeRO-0 in {self.cfg.train.precision} "
                                     "cannot skip the update; stopping before it reaches a checkpoint")
            return
        skipped = self.skipped_steps
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > self._skipped_before else 0
        self._skipped_before = skipped
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.skipped_in_a_row} optimizer steps in a row skipped for non-finite gradients "
                f"(train.max_skipped_in_a_row={self.cfg.train.max_skipped_in_a_row}); lower optim.lr, check the "
                "data, or train in bf16 rather than fp16")

    def params_finite(self) -> bool:
        """Collective: are all weights (this rank's ZeRO-3 partitions) finite on every rank?"""
        local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.module.parameters())
        flag = torch.tensor(float(local), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def clamp_(self, param: torch.nn.Parameter, lo: float, hi: float) -> None:
        """Clamp a parameter in place. Under ZeRO or mixed precision the optimizer owns an fp32 master copy that
        would overwrite the module's at the next step, so the master is clamped too. Collective: all ranks call."""
        if self.cfg.zero.stage < 3 and lo <= param.min().item() and param.max().item() <= hi:
            return  # below ZeRO-3 the module holds the whole parameter, equal to its master after the step
        master = safe_get_full_fp32_param(param)
        if master is None:  # the module's parameter is the master (ZeRO-0, fp32)
            with torch.no_grad():
                param.clamp_(lo, hi)
            return
        if lo <= master.min().item() and master.max().item() <= hi:
            return
        safe_set_full_fp32_param(param, master.clamp(lo, hi))
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.clamp_(lo, hi)
