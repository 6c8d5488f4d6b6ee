"""Our DeepSpeed step (pipeline.engine.Engine, ZeRO 0/1/2, fp32, gloo) vs a plain torch DDP step, side by side.

    python -m bench.engine_overhead [--rounds 10] [--steps 4] [--world 2] [--write] [key=value ...]

Both sides do the same work: the same CLIP (same initial weights), the same synthetic micro-batches, AdamW with
the task's weight-decay groups, global-norm clipping, the warmup+cosine LambdaLR and the logit_scale clamp. The
variants run in alternating blocks of steps, in a rotated order each round, so that background load on the
machine hits them alike; ours/DDP is taken per round (neighbouring blocks) and its median reported.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from bench.common import TINY, machine, median_range, spawn, synthetic_batch, write_section

PHASES = ("forward", "backward", "step", "after_step")


class DDPStep:
    """The plain-torch reference: what a minimal DDP trainer would do for one optimizer step."""

    def __init__(self, cfg, task, accumulation):
        from torch.nn.parallel import DistributedDataParallel

        from pipeline.engine import lr_lambda
        from pipeline.tasks.clip import MAX_LOGIT_SCALE

        torch.manual_seed(cfg.train.seed)
        model = task.build_model()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(task.param_groups(model), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.model, self.task, self.accumulation = DistributedDataParallel(model), task, accumulation
        self.clip, self.max_logit_scale = o.grad_clip, MAX_LOGIT_SCALE

    def __call__(self, batches, times):
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.model.no_sync():  # reduce at the last micro-batch
                loss, _ = self.task.loss(self.model, batch)
                t1 = time.perf_counter()
                (loss / self.accumulation).backward()
            t2 = time.perf_counter()
            times["forward"] += t1 - t0
            times["backward"] += t2 - t1
        t0 = time.perf_counter()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        with torch.no_grad():
            self.model.module.logit_scale.clamp_(0, self.max_logit_scale)
        times["step"] += t1 - t0
        times["after_step"] += time.perf_counter() - t1


class OurStep:
    """pipeline.train's optimizer step on pipeline.engine.Engine, without the data loader."""

    def __init__(self, cfg, task, world):
        from pipeline.engine import Engine, model_init

        torch.manual_seed(cfg.train.seed)
        with model_init(cfg, world, task.zero_init):
            model = task.build_model()
        self.engine, self.task = Engine(cfg, model, task.param_groups(model), "cpu", world), task

    def __call__(self, batches, times):
        for batch in batches:
            t0 = time.perf_counter()
            loss, _ = self.task.loss(self.engine.model, self.engine.to_device(batch))
            t1 = time.perf_counter()
            self.engine.backward(loss)
            t2 = time.perf_counter()
            self.engine.step()  # DeepSpeed updates at the accumulation boundary
            t3 = time.perf_counter()
            times["forward"] += t1 - t0
            times["backward"] += t2 - t1
            times["step"] += t3 - t2
        t0 = time.perf_counter()
        self.task.after_step(self.engine)
        times["after_step"] += time.perf_counter() - t0


def worker(rank, world, args):
    import torch.distributed as dist

    from pipeline import config
    from pipeline.engine import grad_accumulation
    from pipeline.tasks.clip import ClipTask

    cfgs = {s: config.load(args.config, [*args.overrides, f"zero.stage={s}"]) for s in args.stages}
    cfg = cfgs[args.stages[0]]
    task, accumulation = ClipTask(cfg), grad_accumulation(cfg, world)
    variants = {"DDP": DDPStep(cfg, task, accumulation)}
    variants.update({f"ZeRO-{s}": OurStep(cfgs[s], ClipTask(cfgs[s]), world) for s in args.stages})
    # A few distinct batches per rank, the same sequence for every variant.
    batches = [synthetic_batch(task, cfg.train.micro_batch_size, seed=1000 * rank + i)
               for i in range(accumulation * 2)]

    def block(name, steps):
        times = dict.fromkeys(PHASES, 0.0)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            j = (i % 2) * accumulation
            variants[name](batches[j:j + accumulation], times)
        dist.barrier()
        return (time.perf_counter() - t0) / steps, {k: v / steps for k, v in times.items()}

    for name in variants:  # warm-up: first-step allocations, lazily built optimizer state, JIT
        block(name, args.warmup)
    names = list(variants)
    step_ms = {n: [] for n in names}
    phase_ms = {n: {p: [] for p in PHASES} for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            total, phases = block(name, args.steps)
            step_ms[name].append(1e3 * total)
            for p in PHASES:
                phase_ms[name][p].append(1e3 * phases[p])
    profiles = {}
    for name in names if args.profile else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            block(name, args.steps)
        profiles[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                   max_name_column_width=60)
    return {"step_ms": step_ms, "phase_ms": phase_ms, "profiles": profiles, "accumulation": accumulation,
            "micro_batch": cfg.train.micro_batch_size, "model": cfg.model.name,
            "params": sum(p.numel() for p in variants["DDP"].model.parameters())}


def table(res) -> str:
    ddp = res["step_ms"]["DDP"]
    rows = ["| variant | ms/step, median (min–max) | ours/DDP, median (min–max) | forward | backward | step | "
            "after_step |", "|---|---|---|---|---|---|---|"]
    for name, ms in res["step_ms"].items():
        ratio = "1 (reference)" if name == "DDP" else median_range([a / b for a, b in zip(ms, ddp)], "{:.2f}")
        ph = " | ".join(f"{statistics.median(res['phase_ms'][name][p]):.1f}" for p in PHASES)
        label = "torch DDP + AdamW" if name == "DDP" else f"Engine, {name}"
        rows.append(f"| {label} | {median_range(ms)} | {ratio} | {ph} |")
    return "\n".join(rows)


def interpretation(res, goal: float = 1.10) -> str:
    """The verdict per stage against the issue's goal, and where the extra milliseconds are, phase by phase."""
    ddp = res["step_ms"]["DDP"]
    med = {n: {p: statistics.median(v) for p, v in ph.items()} for n, ph in res["phase_ms"].items()}
    lines = []
    for name, ms in res["step_ms"].items():
        if name == "DDP":
            continue
        ratio = statistics.median([a / b for a, b in zip(ms, ddp)])
        extra = ", ".join(f"{p} {med[name][p] - med['DDP'][p]:+.1f} ms" for p in PHASES)
        lines.append(f"- {name}: {ratio:.2f}x DDP, {'within' if ratio <= goal else 'outside'} the goal of "
                     f"<= {goal:.2f}x; against DDP, per phase: {extra}.")
    lines += [
        "- Where DeepSpeed's extra time goes (the phase timers above; `--profile` prints torch.profiler's top "
        "operators per variant): at ZeRO-0 its backward ends with one all-reduce of all gradients, flattened into "
        "one buffer and copied back (DDP all-reduces buckets while the backward runs); at ZeRO-1/2 each gradient "
        "is copied into a reduce_bucket_size bucket (5e8 elements, allocated afresh every step: on CPU its pages "
        "are faulted in again each time) and reduced after the backward. In `step`, AdamW on this rank's 1/N of "
        "the parameters pays for all-gathering the updated partitions. `after_step` is the logit_scale clamp, "
        "which below ZeRO-3 reads the module's own copy and touches the fp32 master (a collective) only "
        "when the value leaves [0, ln 100].",
        "- Forward times should match on every side (same model, same batch); their spread is the machine's "
        "noise floor for the other columns.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch_size=64")
    p.add_argument("--config", default=TINY)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warmup", type=int, default=3, help="steps per variant before timing")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=10, help="timed blocks per variant")
    p.add_argument("--profile", action="store_true", help="then print torch.profiler's top operators (rank 0)")
    p.add_argument("--write", action="store_true", help="replace this section of docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    where = machine()
    res = spawn(worker, args.world, args)
    for name, prof in res["profiles"].items():
        print(f"### {name}: {args.steps} steps\n{prof}")
    out, why = table(res), interpretation(res)
    print(f"{out}\n\n{why}")
    if args.write:
        cmd = "python -m bench.engine_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section("Engine overhead: DeepSpeed step vs torch DDP", f"""
`{cmd.strip()}`

{where}. {res['model']} ({res['params'] / 1e6:.1f}M parameters), fp32, {args.world} processes over gloo,
micro-batch {res['micro_batch']} per rank, gradient accumulation {res['accumulation']}; {args.rounds} rounds of
{args.steps}-step blocks per variant after {args.warmup} warm-up steps. Phase columns: rank 0's median ms per
step in each call: forward = `task.loss`; backward includes the gradient reduction on every side (overlapped with
it by DDP, at its end by DeepSpeed); step = clipping, AdamW, LR schedule, zero_grad and, at ZeRO-1/2, the
all-gather of the updated parameters.

{out}

{why}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
