"""`python -m pipeline.train CONFIG [key=value ...] [--describe]`: the training loop.

parse config -> join the process group -> task, engine, data -> loop (batch -> loss -> backward/step -> metrics ->
maybe checkpoint / eval) -> final checkpoint. Each piece lives in its own module; this file only wires them.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import psutil
import torch
import torch.distributed as dist

from pipeline import checkpoint, config, data, distributed, faults, preflight
from pipeline.engine import Engine, model_init
from pipeline.metrics import Metrics
from pipeline.tasks import get_task

log = logging.getLogger("pipeline")

# Set from a signal handler (SLURM's pre-emption / time-limit warning) or by a launcher's checkpoint hook: the
# loop saves at the next step boundary and returns, so a requeued job resumes from that step.
STOP = threading.Event()


def request_stop(*_) -> None:
    STOP.set()


def _all_agree(flag: bool, device: str) -> bool:
    """True on every rank if it is true on any: all ranks must leave the loop at the same step."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train(cfg: config.Config, device: str) -> dict:
    info = distributed.init(device)
    faults.start(info.rank, info.world_size, info.master_addr, info.master_port)
    preflight.check(cfg, info.rank, info.world_size)  # every path this rank will read, before any work
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    task = get_task(cfg.task)(cfg)
    engine, step, samples, data_state = _start(cfg, task, info, device, ckpt_dir)
    with contextlib.ExitStack() as cleanup:  # loader workers and event files closed on every way out
        stream = data.TrainStream(cfg.data.train, task.transform(train=True), cfg.train.micro_batch_size,
                                  rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                                  seed=cfg.data.seed, open_shards=cfg.data.open_shards, resampled=cfg.data.resampled,
                                  decode_size=task.decode_size(), state=data_state)
        cleanup.callback(stream.close)
        # MFU of the whole job: global samples/s against every rank's peak (train.peak_tflops is one rank's)
        metrics = Metrics(run_dir / "tb", info.is_main, task.flops_per_sample(),
                          cfg.train.peak_tflops * 1e12 * info.world_size, device)
        cleanup.callback(metrics.close)
        last: dict[str, float] = {}
        first = True  # this process's first step
        while step < cfg.train.steps:
            lr = engine.lr
            started = time.perf_counter()
            loss, logs = _optimizer_step(task, engine, stream, metrics)
            if cfg.train.compile and info.is_main and first:
                log.info("train.compile: the first step took %.1f s (torch.compile's compilation included)",
                         time.perf_counter() - started)
            first = False
            step += 1
            samples += cfg.train.global_batch_size
            faults.at_step(step, info.rank)
            metrics.add_samples(cfg.train.global_batch_size)
            engine.check_divergence(step, loss)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                last = metrics.log_window(step, {
                    "train/loss": _mean_over_ranks(loss), "train/lr": lr, "train/grad_norm": engine.grad_norm,
                    "train/skipped_steps": engine.skipped_steps, **_data_health(stream, info.is_main, device),
                    **{f"train/{k}": v for k, v in logs.items()}, **_memory(device, info.world_size)})
            stop = _all_agree(STOP.is_set(), device)
            saving = stop or step % cfg.train.save_every == 0 or step == cfg.train.steps
            evaluating = task.evaluates() and (step == cfg.train.steps or cfg.eval.every and step % cfg.eval.every == 0)
            if saving or evaluating:
                engine.average_buffers()  # what rank 0 saves and evaluates describes every rank's data
            if saving:
                checkpoint.save(engine, ckpt_dir, step, {
                    "step": step, "samples": samples, "world_size": info.world_size, "zero_stage": cfg.zero.stage,
                    "model": cfg.model.name, "config": config.to_dict(cfg)}, {"data": stream.state_dict()},
                    cfg.train.keep_last)
            if evaluating:
                last.update(_evaluate(cfg, task, engine, step, metrics, info, device))
            if stop:
                if info.is_main:
                    log.info("stop requested: saved step %d, leaving the loop", step)
                break
        metrics.hparams({"model": cfg.model.name, "lr": cfg.optim.lr, "global_batch_size": cfg.train.global_batch_size,
                         "zero_stage": cfg.zero.stage, "precision": cfg.train.precision,
                         "world_size": info.world_size},
                        {f"hparam/{k.split('/', 1)[1]}": v for k, v in last.items()
                         if k == "train/loss" or k.startswith("eval/")})
    faults.disarm()  # from here ranks end one by one, the store's host among them: that is no failure
    dist.barrier()
    return {**last, "step": step, "stopped": step < cfg.train.steps}


def _start(cfg: config.Config, task, info, device: str, ckpt_dir) -> tuple[Engine, int, int, dict | None]:
    """Model and engine, from `latest` when there is one: (engine, step, samples seen, this rank's data position).
    A checkpoint of another number of ranks goes through DeepSpeed's universal format (pipeline/checkpoint.py)."""
    resume = checkpoint.find(ckpt_dir, info.world_size, cfg.zero.stage)
    elsewhere = resume is not None and not resume.same_ranks
    _seed(cfg.train.seed, info.rank, salt=resume.state["step"] if elsewhere else 0)
    with model_init(cfg, info.world_size, task.zero_init):
        model = task.build_model(initial=resume is None)
    if resume and resume.universal:
        checkpoint.to_universal(resume, info.rank, workers=max(1, (os.cpu_count() or 1) // info.local_world_size))
    engine = Engine(cfg, model, task.param_groups(model), device, info.world_size,
                    universal=bool(resume and resume.universal))
    step, samples, data_state = 0, 0, None
    if resume:
        step, samples = resume.state["step"], resume.state["samples"]
        data_state = _data_position(resume, checkpoint.load(engine, resume, info.rank), cfg, info)
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(config.to_yaml(cfg))
        log.info("%s from step %d: %s, %d ranks on %s, ZeRO-%d, %s, grad accumulation %d%s",
                 "resuming" if step else "starting", step, cfg.model.name, info.world_size, device,
                 cfg.zero.stage, cfg.train.precision, engine.accumulation,
                 f" (saved by {resume.world_size} ranks)" if elsewhere else "")
    return engine, step, samples, data_state


def _seed(seed: int, rank: int, salt: int = 0) -> None:
    """torch: the same on every rank (identical initial weights); python and numpy (timm's mixup, anything else
    drawing from them): one stream per rank. `salt` (the step of a resume on other ranks) keeps a resumed run from
    replaying the draws of its start. A resume on the same ranks restores all three from the checkpoint."""
    torch.manual_seed(seed + salt)
    random.seed(seed * 1_000_003 + rank + salt * 7_919)
    np.random.seed(np.random.SeedSequence([seed, rank, salt]).generate_state(1)[0])


def _data_position(resume: checkpoint.Resume, rank_state: dict | None, cfg: config.Config, info) -> dict | None:
    """This rank's data-stream state: its own saved one, or, when the ranks or loader workers changed, its share
    of all the old streams' positions (collective: every rank decides alike, from the config and the checkpoint)."""
    if rank_state is not None and rank_state["data"]["num_workers"] == cfg.data.num_workers:
        return rank_state["data"]
    return data.relayout(checkpoint.every_rank_state(resume, "data"), cfg.data.train, rank=info.rank,
                         world_size=info.world_size, num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                         resampled=cfg.data.resampled, salt=resume.state["step"])


def _mean_over_ranks(x: torch.Tensor) -> float:
    total = x.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _data_health(stream: data.TrainStream, is_main: bool, device: str) -> dict[str, float]:
    """Collective: samples skipped on all ranks, and damaged or empty shards logged by rank 0, once per run."""
    skipped = torch.tensor(float(stream.skipped), device=device)
    dist.all_reduce(skipped)
    reports = [None] * dist.get_world_size() if is_main else None
    dist.gather_object(stream.take_reports(), reports, dst=0)
    for found in reports or []:
        for url, message in found.items():
            if url not in _REPORTED:
                _REPORTED.add(url)
                log.warning("%s", message)
    return {"data/skipped": int(skipped.item())}


_REPORTED: set[str] = set()


def _optimizer_step(task, engine, stream, metrics) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step over engine.accumulation micro-batches; returns this rank's mean loss and the logs."""
    loss_sum = torch.zeros((), device=engine.device)
    for _ in range(engine.accumulation):
        t0 = time.perf_counter()
        batch = task.on_device(engine.to_device(next(stream)), engine.dtype)
        metrics.add_data_wait(time.perf_counter() - t0)
        with metrics.phase("forward"):
            loss, logs = task.loss(engine.model, batch)
        with metrics.phase("backward"):
            engine.backward(loss)
        with metrics.phase("step"):
            engine.step()  # DeepSpeed updates at the accumulation boundary
        loss_sum += loss.detach().float()
    with metrics.phase("step"):
        task.after_step(engine)
    return loss_sum / engine.accumulation, logs


def _memory(device: str, world_size: int) -> dict[str, float]:
    """Each rank's memory, gathered for rank 0: CUDA allocated/reserved, or the process RSS on CPU."""
    if device == "cuda":
        mine = [torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30]
    else:
        rss = psutil.Process().memory_info().rss / 2**30
        mine = [rss, rss]
    everyone = [torch.zeros(2, device=device) for _ in range(world_size)]
    dist.all_gather(everyone, torch.tensor(mine, device=device))
    out = {}
    for rank, (allocated, reserved) in enumerate(t.tolist() for t in everyone):
        out[f"memory/allocated_gb/rank{rank}"] = allocated
        if device == "cuda":
            out[f"memory/reserved_gb/rank{rank}"] = reserved
    return out


def _evaluate(cfg, task, engine, step, metrics, info, device) -> dict[str, float]:
    """The task's evaluation, on rank 0 with the whole model (ZeRO-3 gathers it) while the other ranks wait."""
    import deepspeed

    result = {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=cfg.zero.stage == 3):
        if info.is_main:
            faults.inject("eval", step, info.rank)
            engine.model.eval()
            with torch.no_grad():
                r = task.evaluate(engine.module, device, engine.dtype)
            engine.model.train()
            result = r.scalars
            metrics.scalars(step, r.scalars)
            metrics.images(step, r.images)
            log.info("step %d | %s", step, r.summary or " ".join(f"{k} {v:.4g}" for k, v in r.scalars.items()))
    dist.barrier()
    return result


def describe(cfg: config.Config) -> None:
    """Build the model on the meta device (nothing allocated) and print its size and the resolved config."""
    task = get_task(cfg.task)(cfg)
    model = task.build_model(device="meta")
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n}")
    print(f"parameters (human): {n / 1e6:.1f}M")
    print(f"train flops per sample: {task.flops_per_sample():.4g}")
    print(config.to_yaml(cfg), end="")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=5e-4")
    parser.add_argument("--describe", action="store_true", help="size the model on the meta device and exit")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pipeline").setLevel(logging.INFO)  # ours at INFO; libraries (open_clip) stay quiet
    try:
        cfg = config.load(args.config, args.overrides)
        if args.describe:
            describe(cfg)
            return 0
        device = config.resolve_device(cfg)
        config.validate(cfg, distributed.from_env().world_size, device)
        if not cfg.data.train:
            raise config.ConfigError("data.train is empty: give shards, e.g. data.train=shards/{00000..00009}.tar")
    except config.ConfigError as e:
        print(e.lines(), file=sys.stderr)
        return 2
    # A hand-written sbatch + torchrun job: the time-limit warning (--signal=USR1@120 or USR2), scancel and
    # pre-emption (SIGTERM, then SIGKILL after KillWait) save at the next step boundary, then exit for the requeue.
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        train(cfg, device)
    except Exception as e:  # logged once for the job (pipeline/faults.py); every rank exits non-zero
        faults.report(e, distributed.from_env().rank)
        return faults.exit_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
