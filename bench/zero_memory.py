"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO 0-3, measured, against the ZeRO paper.

    python -m bench.zero_memory [--models CLIP-tiny ViT-S-32-alt] [--worlds 2 4] [--write] [key=value ...]

Each rank builds our Engine (fp32, CPU, gloo), takes one optimizer step (so AdamW's state exists), runs the forward
and backward of a second step, and then counts what it holds, by tensor storage, each storage once
(`untyped_storage().data_ptr()`: ZeRO's parameters and gradients are views into flat buffers):

- parameters: the module's parameters (under ZeRO-3 also `ds_tensor`, this rank's partition);
- optimizer: AdamW's `state` (exp_avg, exp_avg_sq, step) and the fp32 master weights it updates when they are not
  the module's parameters (ZeRO >= 1 keeps a separate fp32 partition even in fp32 training);
- gradients: `param.grad`, and what the ZeRO optimizer holds under a name containing "grad" (averaged_gradients,
  grads_in_partition, grad_partitions_flat_buffer ...);
- the gradient bucket (`ipg_buckets`): sized by reduce_bucket_size (ours: the smaller of 5e8 and Ψ), so reported
  apart, as allocated and as filled when it is reduced (ZeRO-1/2 free it at the end of the backward);
- anything else reachable from the ZeRO optimizer is "other", reported in the interpretation.

Expected bytes (Rajbhandari et al. 2020, "ZeRO", section 3.1 and figure 1): parameters P·Ψ, gradients G·Ψ,
optimizer K·Ψ; the optimizer partitioned over N ranks from stage 1, gradients from stage 2, parameters at stage 3.
The paper's mixed precision has (P, G, K) = (2, 2, 12); what we run on CPU is fp32: (4, 4, 12), and (4, 4, 8) at
stage 0, where the module's fp32 weights are the master and no copy exists.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

from bench.common import TINY, machine, spawn, synthetic_batch, write_section

MiB = 2**20
COLUMNS = ("params", "grads", "optimizer", "buckets")


def _walk(obj, path, seen, out, depth=0):
    """(path, tensor) for every tensor reachable from a DeepSpeed / torch.optim object through attributes,
    lists and dicts (not through nn.Modules: their parameters are counted from the module)."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            _walk(obj.grad, path + ".grad", seen, out, depth + 1)
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        items = [(k if isinstance(k, str) else f"[{i}]", v) for i, (k, v) in enumerate(obj.items())]
    elif isinstance(obj, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(obj)]
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        items = list(vars(obj).items())
    else:
        return
    for k, v in items:
        _walk(v, f"{path}.{k}", seen, out, depth + 1)


def held_bytes(engine) -> dict[str, int]:
    """Bytes per category of what this rank's engine holds; each storage counted once, in the first category
    (in COLUMNS order) that claims it."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # the torch AdamW inside the ZeRO optimizer (itself at stage 0)
    claims: dict[str, list[torch.Tensor]] = {c: [] for c in (*COLUMNS, "other")}
    for p in engine.module.parameters():
        claims["params"] += [p] + ([p.ds_tensor] if hasattr(p, "ds_tensor") else [])
        if p.grad is not None:
            claims["grads"].append(p.grad)
    # The tensors AdamW updates are the fp32 masters (the module's own parameters at stage 0, claimed above);
    # ZeRO-3 puts them in param_groups only during its step, but they stay keys of `state`.
    masters = [p for g in inner.param_groups for p in g["params"]] + list(inner.state)
    claims["optimizer"] += masters + [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    found: list = []
    _walk(zero, "", set(), found)
    for path, t in found:
        name = path.lower()
        claims["buckets" if "ipg" in name or "bucket" in name else "grads" if "grad" in name else "other"].append(t)
    seen, out = set(), dict.fromkeys((*COLUMNS, "other"), 0)
    for category, tensors in claims.items():
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                out[category] += storage.nbytes()
    return out


def _nbytes(buffer) -> int:
    buffers = buffer if isinstance(buffer, list) else [buffer]
    return sum(b.untyped_storage().nbytes() for b in buffers)


def track_bucket(zero) -> list[tuple[int, int]]:
    """Each time DeepSpeed reduces its gradient bucket, record (bytes of gradient in it, bytes allocated for it):
    what a rank holds at once during the backward, before partitioning. ZeRO-1/2 free the bucket after the
    backward, so it is seen only here. [] at stage 0 (no ZeRO optimizer)."""
    peak: list[tuple[int, int]] = []
    for name in ("reduce_ipg_grads", "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"):
        if hasattr(zero, name):
            reduce = getattr(zero, name)

            def wrapped(*a, _reduce=reduce, **k):
                buckets = zero.ipg_buckets.items()
                peak.append((sum(b.elements * dtype.itemsize for dtype, b in buckets),
                             sum(_nbytes(b.buffer) for _, b in buckets)))
                return _reduce(*a, **k)

            setattr(zero, name, wrapped)
    return peak


def worker(rank, world, args):
    import torch.distributed as dist

    from pipeline import config
    from pipeline.engine import Engine, model_init
    from pipeline.tasks.clip import ClipTask

    rows = []
    for name in args.models:
        for stage in args.stages:
            cfg = config.load(args.config, [*args.overrides, f"model.name={name}", f"zero.stage={stage}",
                                            "train.micro_batch_size=2", f"train.global_batch_size={2 * world}"])
            task = ClipTask(cfg)
            torch.manual_seed(0)
            with model_init(cfg, world, task.zero_init):
                model = task.build_model()
            sizes = [p.numel() for p in model.parameters()]
            engine = Engine(cfg, model, task.param_groups(model), "cpu", world)
            batch = synthetic_batch(task, 2, seed=rank)
            bucket = track_bucket(engine.optimizer)
            for step in range(2):
                loss, _ = task.loss(engine.model, batch)
                engine.backward(loss)
                if step == 0:
                    engine.step()
            mine = held_bytes(engine)  # after the backward: gradients, parameters and optimizer state all live
            mine["bucket"] = max(bucket, default=(0, 0))
            engine.step()
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            persist = engine.model.zero_param_persistence_threshold()
            rows.append({"model": name, "world": world, "stage": stage, "psi": sum(sizes), "ranks": everyone,
                         "largest": max(sizes) / sum(sizes), "persist_threshold": persist,
                         "persistent": sum(n for n in sizes if n < persist) / sum(sizes)})
            engine.model.destroy()  # drop DeepSpeed's hooks, so this stage's model is freed before the next
            del engine, model, loss
            gc.collect()
    return rows


def expected(stage: int, psi: int, n: int, p: float, g: float, k: float) -> dict[str, float]:
    return {"params": p * psi / (n if stage >= 3 else 1), "grads": g * psi / (n if stage >= 2 else 1),
            "optimizer": k * psi / (n if stage >= 1 else 1)}


def summarise(r: dict) -> dict:
    """The fullest rank's bytes against the fp32 formula (and the paper's fp16 one)."""
    stage, psi, n = r["stage"], r["psi"], r["world"]
    worst = max(r["ranks"], key=lambda m: m["params"] + m["grads"] + m["optimizer"])
    fp32 = expected(stage, psi, n, 4, 4, 8 if stage == 0 else 12)
    total = sum(worst[c] for c in fp32)
    return {**r, "worst": worst, "fp32": fp32, "total": total, "ratio": total / sum(fp32.values()),
            "paper": sum(expected(stage, psi, n, 2, 2, 12).values())}


def table(rows: list[dict]) -> str:
    out = ["| model | ZeRO | ranks | params MiB | grads MiB | optimizer MiB | total MiB | expected fp32 MiB | "
           "measured / expected | bytes / param | paper fp16 MiB | gradient bucket: allocated / filled MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        filled, allocated = max(m["bucket"] for m in s["ranks"])
        bucket = "–" if s["stage"] == 0 else f"{allocated / MiB:.0f} / {filled / MiB:.1f}"
        cells = [f"{s['worst'][c] / MiB:.1f} ({s['fp32'][c] / MiB:.1f})" for c in ("params", "grads", "optimizer")]
        out.append(f"| {s['model']} | {s['stage']} | {s['world']} | {' | '.join(cells)} | {s['total'] / MiB:.1f} | "
                   f"{sum(s['fp32'].values()) / MiB:.1f} | {s['ratio']:.2f} | {s['total'] / s['psi']:.1f} | "
                   f"{s['paper'] / MiB:.1f} | {bucket} |")
    return "\n".join(out)


def interpretation(rows: list[dict]) -> str:
    """What the table says, derived from it: which runs meet the 10% goal and the causes of the misses."""
    lines = []
    for model in dict.fromkeys(s["model"] for s in rows):
        mine = [s for s in rows if s["model"] == model]
        miss = [f"ZeRO-{s['stage']} on {s['world']} ranks ({s['ratio']:.2f})"
                for s in mine if abs(s["ratio"] - 1) > 0.10]
        lines.append(f"- {model}: " + (f"outside 10% of the fp32 formula: {', '.join(miss)}." if miss else
                                       "every stage and rank count within 10% of the fp32 formula."))
    s = rows[0]
    big = {x["model"]: x for x in rows}
    other = max(m["other"] for s in rows for m in s["ranks"])
    lines.append(f"- Not in any column: at most {other / 2**10:.0f} KiB of other tensors held by a ZeRO optimizer.")
    filled = [s for s in rows if s["stage"] > 0 and max(m["bucket"] for m in s["ranks"])[0] >= 4 * s["psi"]]
    lines += [
        "- ZeRO-1 holds *fewer* gradient bytes after the backward than the paper's P_os (full gradients): DeepSpeed "
        "reduces them at the end of the backward and keeps only those touching its own partition.",
        "- ZeRO-1/2 gradient buffers (`averaged_gradients`) hold every parameter that touches the rank's partition "
        "*whole*, so a tensor straddling a partition boundary is held whole by each rank it touches. The largest "
        "tensor, CLIP's token embedding (" + ", ".join(f"{m} {x['largest']:.0%} of Ψ" for m, x in big.items()) +
        "), nearly fills the no-weight-decay group, so each rank whose partition it crosses holds all of it: the "
        "excess over 4Ψ/N is up to that tensor less one partition, and shrinks as models grow.",
        f"- ZeRO-3 keeps parameters under stage3_param_persistence_threshold ({s['persist_threshold']:.0f} elements) "
        "whole on every rank (" + ", ".join(f"{m} {x['persistent']:.0%} of Ψ" for m, x in big.items()) + ").",
        "- Outside the formula, the gradient bucket: DeepSpeed allocates reduce_bucket_size elements whatever the "
        "model size, for the whole run at ZeRO-3 and during each backward at ZeRO-1/2. At its own default (5e8, "
        "2 GB in fp32) these runs allocated 1907 MiB and filled 29 (CLIP-tiny) or 165 (ViT-S-32-alt); our default "
        "(zero.reduce_bucket_size=null) is the smaller of 5e8 and Ψ, which reduces the same gradients at the same "
        "moment and allocates only what is filled (the last column). "
        + (f"In {len(filled)} of {sum(s['stage'] > 0 for s in rows)} ZeRO runs the whole gradient (4Ψ) was in the "
           "bucket at once before its reduction, because Ψ <= reduce_bucket_size: during the backward ZeRO-2 and 3 "
           "then hold as many gradient bytes as ZeRO-1, and their gradient partitioning lowers only what is held "
           "after it." if filled else "The bucket never held the whole gradient at once."),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.zero_memory", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="config overrides")
    p.add_argument("--config", default=TINY)
    p.add_argument("--models", nargs="+", default=["CLIP-tiny", "ViT-S-32-alt"], help="open_clip model configs")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--write", action="store_true", help="replace this section of docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    where = machine()
    rows = [summarise(r) for n in args.worlds for r in spawn(worker, n, args)]
    rows.sort(key=lambda s: (args.models.index(s["model"]), s["world"], s["stage"]))
    out, why = table(rows), interpretation(rows)
    sizes = ", ".join(f"{m} Ψ = {next(s['psi'] for s in rows if s['model'] == m) / 1e6:.2f}M" for m in args.models)
    print(f"{sizes}\n\n{out}\n\n{why}")
    if args.write:
        cmd = "python -m bench.zero_memory " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section("ZeRO memory per rank", f"""
`{cmd.strip()}`

{where}. {sizes}; fp32, gloo, our `Engine` with pipeline/engine.py's ds_config. Bytes each rank holds after the
backward of its second step, counted by tensor storage, each storage once; the fullest rank is shown, the fp32
formula in parentheses: parameters 4Ψ, gradients 4Ψ, optimizer 8Ψ at stage 0 (AdamW's exp_avg and exp_avg_sq; the
module's weights are the master) and 12Ψ from stage 1 (DeepSpeed keeps a separate fp32 master partition even in
fp32: measured), split over the N ranks as the stage says. "paper fp16" is the paper's 2Ψ + 2Ψ + 12Ψ split the
same way, for reference: fp16/bf16 do not run on CPU. What is counted: docstring of `bench/zero_memory.py`.

{out}

{why}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
