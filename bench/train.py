"""A whole training run, side by side: ours (`launch local`) against `open_clip_train.main` under torchrun.

    python -m bench.train [--config configs/clip/tiny_cpu.yaml] [--model CLIP-tiny] [--precision fp32]
                          [--steps 40] [--global-batch 256] [--ranks 2] [--workers 2] [--peak-tflops T]
                          [--rounds 2] [--set KEY=VALUE ...] [--write]

On a GPU node, e.g. `--config configs/clip/vit_b32.yaml --model ViT-B-32 --precision bf16 --peak-tflops 989
--ranks 8 --global-batch 2048 --workers 8` (H100: 989 dense bf16 TFLOP/s); the corpus is then written at the
model's image size.

Both sides train the same open_clip model config on the same WebDataset shards (the demo corpus: captioned
coloured shapes, 2,000 JPEGs at 32 px in 4 shards), with the same global batch, precision (fp32 on CPU), number of
ranks (gloo) and loader workers per rank, each in fresh processes, alternating, --rounds times. Ours runs its
default engine (DeepSpeed ZeRO-2); open_clip_train runs DDP. Throughput is samples/s after warm-up: ours from
TensorBoard's `train/samples_per_s` (per log window), theirs from the global batch over their logged
`Batch (t)` (the mean step time of each log window); the first window of each run is warm-up and left out. The
data wait is the fraction of step time spent waiting for the loader (ours `train/data_wait_fraction`, theirs
`Data (t)` / `Batch (t)`). Checked: the same parameter count, the same samples seen, the loss falling on both.
The same optimizer settings on both sides (our config's lr schedule, weight decay, betas, eps, gradient clipping).

Phases, in ms per step (median over windows after the first): ours from TensorBoard's `time/<phase>_ms`
(pipeline/metrics.py PhaseTimer); open_clip_train's timed by the same PhaseTimer around their unedited loop
(bench/open_clip_train_entry.py), their data time from their log, and `other` the rest of their step time. Forward
includes the loss; backward the gradient reduction (DeepSpeed's at its end, DDP's overlapped); step clipping, AdamW
and, for ZeRO, the all-gather of the updated parameters.

MFU (with --peak-tflops, one rank's dense peak in --precision): ours from `train/mfu`, theirs from their samples/s
and the same FLOPs per sample (our task's count of the same model). --write also records ours in
bench/measured_mfu.json, which `launch plan` shows beside its assumed MFU for that model on that hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, median_range, spawn, write_section
from pipeline.metrics import PHASES

WINDOW = 5  # steps per log window


def make_shards(root: Path, images: int, size: int) -> str:
    import pandas as pd
    import webdataset as wds

    from data_tools.demo_corpus import make_corpus

    make_corpus(root, n_train=images, n_val=24, seed=0, size=size)
    rows = pd.read_parquet(root / "train.parquet")
    per = -(-len(rows) // 4)
    for s in range(4):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i, r in rows.iloc[s * per:(s + 1) * per].iterrows():
                w.write({"__key__": f"{i:06d}", "jpg": (root / r["image"]).read_bytes(), "txt": r["caption"]})
    return f"{root}/{{00000..00003}}.tar"


def ours(shards: str, run: Path, args, overrides: tuple[str, ...] = ()) -> dict:
    """Our side: `launch local` with `args`' settings (and `overrides`), read back from TensorBoard."""
    cmd = [sys.executable, "-m", "launch", "local", args.config, "--nproc", str(args.ranks),
           f"model.name={args.model}", f"train.precision={args.precision}", f"train.peak_tflops={args.peak_tflops}",
           f"data.train={shards}", f"run.dir={run}", f"train.steps={args.steps}",
           f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.global_batch // args.ranks}",
           f"data.num_workers={args.workers}", f"train.log_every={WINDOW}", "train.save_every=1000000",
           "eval.zeroshot=null", "optim.warmup_steps=10", "optim.lr=1e-3", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"ours failed:\n{r.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    s = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {"samples_per_s": statistics.median(s["train/samples_per_s"][1:]),
            "mfu": statistics.median(s["train/mfu"][1:]) if args.peak_tflops else None,
            "data_wait": statistics.median(s["train/data_wait_fraction"][1:]),
            "phases_ms": {p: statistics.median(s[f"time/{p}_ms"][1:]) for p in PHASES},
            "memory_gb": max(max(v) for k, v in s.items() if k.startswith("memory/allocated_gb/")),
            "loss": (s["train/loss"][0], s["train/loss"][-1]), "samples": args.steps * args.global_batch,
            "log": r.stdout + r.stderr}


AMP = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}  # open_clip_train's --precision for ours
LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/.*Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),.*Contrastive_loss: "
                  r"([\d.]+)")


def theirs(shards: str, logs: Path, args) -> dict:
    samples = args.steps * args.global_batch
    o = _task(args).cfg.optim
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
           "--", str(ROOT / "bench" / "open_clip_train_entry.py"), "--train-data", shards, "--dataset-type", "webdataset",
           "--dataset-resampled", "--train-num-samples", str(samples), "--epochs", "1",
           "--batch-size", str(args.global_batch // args.ranks), "--workers", str(args.workers),
           "--model", args.model, "--precision", AMP[args.precision], "--lr", "1e-3", "--warmup", "10",
           "--wd", str(o.weight_decay), "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]), "--eps", str(o.eps),
           *(["--grad-clip-norm", str(o.grad_clip)] if o.grad_clip else []),
           "--log-every-n-steps", str(WINDOW), "--save-frequency", "0", "--logs", str(logs), "--name", "bench",
           "--dist-backend", "gloo" if hardware() == "cpu" else "nccl", "--report-to", ""]
    phases_file = logs.with_suffix(".phases.json")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**_env(), "BENCH_PHASES": str(phases_file), "BENCH_WINDOW": str(WINDOW)})
    if r.returncode:
        sys.exit(f"open_clip_train failed:\n{(r.stdout + r.stderr)[-6000:]}")
    windows = [m.groups() for m in LINE.finditer(r.stdout + r.stderr)]
    if len(windows) < 3:
        sys.exit(f"open_clip_train logged {len(windows)} windows:\n{(r.stdout + r.stderr)[-3000:]}")
    seen = int(windows[-1][0])
    rates = [args.global_batch / float(b) for _, _, b, _ in windows[1:]]
    waits = [float(d) / float(b) for _, d, b, _ in windows[1:]]
    rate = statistics.median(rates)
    mfu = rate * flops_per_sample(args) / (args.ranks * args.peak_tflops * 1e12) if args.peak_tflops else None
    timed = json.loads(phases_file.read_text())
    phases = {p: statistics.median(w[p] for w in timed["windows"][1:]) for p in ("forward", "backward", "step")}
    phases["data"] = 1e3 * statistics.median(float(d) for _, d, _, _ in windows[1:])
    phases["other"] = max(0.0, 1e3 * statistics.median(float(b) for _, _, b, _ in windows[1:]) - sum(phases.values()))
    return {"samples_per_s": rate, "mfu": mfu, "data_wait": statistics.median(waits), "phases_ms": phases,
            "loss": (float(windows[0][3]), float(windows[-1][3])), "samples": seen, "parameters": timed["parameters"]}


def collectives(rank: int, world: int, n: int) -> dict[str, float]:
    """ms per call of the collectives that move Ψ fp32 gradients or weights between the ranks (gloo): DDP all-reduces
    them during the backward; ZeRO-2 reduce-scatters them after it and all-gathers the updated weights after the
    step. Run in bench.common.spawn's processes, one core each as in training."""
    import time

    import torch
    import torch.distributed as dist

    share = -(-n // world)
    full, part = torch.randn(share * world), torch.randn(share)
    calls = {"all_reduce": lambda: dist.all_reduce(full),
             "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
             "all_gather": lambda: dist.all_gather_into_tensor(full, part)}
    out = {}
    for name, call in calls.items():
        call()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(5):
            call()
        dist.barrier()
        out[name] = 1e3 * (time.perf_counter() - t) / 5
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}


def _task(args):
    from pipeline import config
    from pipeline.tasks import get_task

    cfg = config.load(args.config, [f"model.name={args.model}", "eval.zeroshot=null"])
    return get_task(cfg.task)(cfg)


def parameters(args) -> int:
    return sum(p.numel() for p in _task(args).build_model(device="meta").parameters())


def flops_per_sample(args) -> float:
    return _task(args).flops_per_sample()


def hardware() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def record(args, result: dict) -> None:
    """Our measurement into bench/measured_mfu.json (replacing the last of that model, hardware, precision and
    ranks), where `launch plan` finds it; the command, --set included, goes with it."""
    import datetime

    path = ROOT / "bench" / "measured_mfu.json"
    records = json.loads(path.read_text())["records"] if path.is_file() else []
    key = ("model", "hardware", "precision", "ranks")
    mine = {"model": args.model, "hardware": hardware(), "precision": args.precision, "ranks": args.ranks}
    records = [r for r in records if any(r.get(k) != mine[k] for k in key)]  # a new measurement replaces the last
    records.append({"model": args.model, "task": _task(args).cfg.task, "hardware": hardware(),
                    "precision": args.precision, "ranks": args.ranks, "global_batch": args.global_batch,
                    "mfu": round(result["mfu"], 4), "samples_per_s": round(result["samples_per_s"], 1),
                    "peak_tflops": args.peak_tflops, "date": datetime.date.today().isoformat(),
                    "command": "python -m bench.train " + " ".join(sys.argv[1:])})
    path.write_text(json.dumps({"records": records}, indent=1) + "\n")
    print(f"recorded MFU {result['mfu']:.1%} for {args.model} on {hardware()} in {path.relative_to(ROOT)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/clip/tiny_cpu.yaml", help="our side's training config")
    p.add_argument("--model", default="CLIP-tiny", help="open_clip model config, on both sides")
    p.add_argument("--precision", choices=tuple(AMP), default="fp32")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="one rank's dense peak, for MFU (0: no MFU)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="our side's config overrides, e.g. zero.overlap_comm=true (shown in the section's title)")
    p.add_argument("--write", action="store_true", help="replace this section of docs/PERFORMANCE.md")
    args = p.parse_args()
    runs = {"ours": [], "open_clip_train": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "data", 2000, _task(args).input_size()[0])
        for r in range(args.rounds):
            runs["open_clip_train"].append(theirs(shards, tmp / f"logs{r}", args))
            print("open_clip_train", runs["open_clip_train"][-1], flush=True)
            runs["ours"].append(ours(shards, tmp / f"run{r}", args, tuple(args.set)))
            print("ours", {k: v for k, v in runs["ours"][-1].items() if k != "log"}, flush=True)
    n = parameters(args)
    for side, xs in runs.items():
        for x in xs:  # both train the same model on as many samples, and learn
            assert x["loss"][1] < x["loss"][0], (side, x)
            assert x["samples"] == args.steps * args.global_batch, (side, x["samples"])
            assert x.get("parameters", n) == n, f"open_clip_train trains {x['parameters']} parameters, ours {n}"
    rate = {side: [x["samples_per_s"] for x in xs] for side, xs in runs.items()}
    ratio = [o / t for o, t in zip(rate["ours"], rate["open_clip_train"])]
    body = (f"`python -m bench.train {' '.join(sys.argv[1:])}` on {machine()}.\n\n"
            f"{args.model} ({n / 1e6:.2f}M parameters, the same open_clip config on both sides), {args.ranks} "
            f"{'CPU ranks over gloo' if hardware() == 'cpu' else hardware() + ' ranks'}, {args.precision}, "
            + (f"MFU against {args.peak_tflops:g} TFLOP/s per rank, " if args.peak_tflops else "")
            + f"global batch {args.global_batch}, {args.workers} loader workers per rank, "
            f"{args.steps} steps ({args.steps * args.global_batch} samples) on the demo corpus' shards; each side "
            f"in fresh processes, alternating; samples/s after the first log window of {WINDOW} steps, median over "
            f"windows, then median (min-max) over {args.rounds} rounds.\n\n"
            "| | samples/s | MFU | data wait (fraction of step time) | loss first → last window |\n"
            "|---|---|---|---|---|\n"
            + "".join(f"| {side} | {median_range(rate[side])} | {_mfu(xs)} | "
                      f"{median_range([x['data_wait'] for x in xs], '{:.3f}')} | "
                      f"{xs[-1]['loss'][0]:.3f} → {xs[-1]['loss'][1]:.3f} |\n" for side, xs in runs.items())
            + f"| ours / open_clip_train | {median_range(ratio, '{:.2f}')}x | | | |\n\n"
            "Where each step's time goes, ms per step (median over rounds):\n\n"
            f"| | {' | '.join(PHASES)} | total |\n|---|{'---|' * (len(PHASES) + 1)}\n"
            + "".join(f"| {side} | " + " | ".join(f"{_phase(xs, p):.1f}" for p in PHASES)
                      + f" | {sum(_phase(xs, p) for p in PHASES):.1f} |\n" for side, xs in runs.items()) + "\n"
            f"Samples seen: ours {runs['ours'][-1]['samples']}, open_clip_train {runs['open_clip_train'][-1]['samples']}"
            f"; parameters trained: {n} on both. On GPUs (ViT-B/32, ViT-L/14@336 in bf16, 1 and 8 GPUs, MFU): not measured, needs a GPU.")
    if hardware() == "cpu":
        cost = spawn(collectives, args.ranks, n)
        body += ("\n\nThe gradients' trip between the ranks, Ψ in fp32 over gloo, ms per call: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in cost.items())
                 + ". open_clip_train's DDP all-reduces during its backward, on gloo's own thread; DeepSpeed reduces "
                 "after the backward (ZeRO-0 all-reduces; ZeRO-1/2 reduce-scatter, then all-gather the updated "
                 "weights after the step), on the training thread: its CPU accelerator has no side stream, so "
                 "zero.overlap_comm cannot overlap them here (on GPUs it reduces on a side stream while the backward "
                 "goes on).")
    print(body)
    if args.write:
        write_section(f"Training end to end against open_clip_train: {args.model}, {hardware()}"
                      + "".join(f", {o}" for o in args.set), body)
        if args.peak_tflops:
            record(args, {"mfu": statistics.median(x["mfu"] for x in runs["ours"]),
                          "samples_per_s": statistics.median(rate["ours"])})


def _phase(xs: list[dict], phase: str) -> float:
    return statistics.median(x["phases_ms"][phase] for x in xs)


def _mfu(xs: list[dict]) -> str:
    return median_range([100 * x["mfu"] for x in xs], "{:.1f}") + " %" if xs[0]["mfu"] is not None else "—"


if __name__ == "__main__":
    main()
