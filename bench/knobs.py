"""Each training knob against the same run without it: samples/s, where the step's time goes, memory.

    python -m bench.knobs [--steps 40] [--global-batch 256] [--ranks 2] [--workers 2] [--rounds 2] [--write]

Our training (`launch local`, fp32, ZeRO-2, gloo; bench.train's settings and demo-corpus shards) of CLIP-tiny with
each knob of pipeline/config.py set alone, and of CLIP-tiny-RN with and without channels-last. Every run in fresh
processes; each variant runs beside a baseline run of its own (first every other round), so that the machine's
drifting background load hits both alike; a knob's speed-up is the median over rounds of its samples/s over that
neighbour's. Phases: ms per step from TensorBoard's
`time/<phase>_ms` (pipeline/metrics.py). Memory: the largest rank's resident set (CPU RSS: pages a buffer never
touches, such as most of DeepSpeed's 5e8-element default bucket, do not count here; on a GPU they do, which
bench.zero_memory and `launch plan` show). train.compile's first step (its compilation) is read from the log.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import machine, median_range, write_section
from bench.train import make_shards, ours
from pipeline.metrics import PHASES

TINY, RN = "configs/clip/tiny_cpu.yaml", "configs/clip/tiny_rn_cpu.yaml"
# name -> (config, model, overrides, the variant it is compared with)
VARIANTS = {
    "CLIP-tiny": (TINY, "CLIP-tiny", (), None),
    "zero.reduce_bucket_size=5e8 (DeepSpeed's default)": (TINY, "CLIP-tiny", ("zero.reduce_bucket_size=500000000",),
                                                          "CLIP-tiny"),
    "zero.reduce_bucket_size, allgather_bucket_size=1e6": (
        TINY, "CLIP-tiny", ("zero.reduce_bucket_size=1000000", "zero.allgather_bucket_size=1000000"), "CLIP-tiny"),
    "zero.overlap_comm=true": (TINY, "CLIP-tiny", ("zero.overlap_comm=true",), "CLIP-tiny"),
    "zero.contiguous_gradients=false": (TINY, "CLIP-tiny", ("zero.contiguous_gradients=false",), "CLIP-tiny"),
    "train.compile=true": (TINY, "CLIP-tiny", ("train.compile=true",), "CLIP-tiny"),
    "CLIP-tiny-RN": (RN, "CLIP-tiny-RN", (), None),
    "CLIP-tiny-RN, model.channels_last=true": (RN, "CLIP-tiny-RN", ("model.channels_last=true",), "CLIP-tiny-RN"),
}
FIRST_STEP = re.compile(r"train.compile: the first step took ([\d.]+) s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write", action="store_true", help="replace this section of docs/PERFORMANCE.md")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    pairs: dict[str, list[float]] = {name: [] for name, v in VARIANTS.items() if v[3]}  # variant / its baseline
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "data", 2000, 32)  # both models take 32 px
        count = iter(range(10**6))

        def run(name: str) -> dict:
            config, model, overrides, _ = VARIANTS[name]
            run_args = argparse.Namespace(**vars(args), config=config, model=model, precision="fp32", peak_tflops=0.0)
            runs[name].append(ours(shards, tmp / f"run{next(count)}", run_args, overrides))
            print(name, f"{runs[name][-1]['samples_per_s']:.1f} samples/s", flush=True)
            return runs[name][-1]

        for r in range(args.rounds):
            for name in pairs:  # each variant beside a baseline run of its own, which goes first every other round
                base = VARIANTS[name][3]
                first, second = (base, name) if r % 2 == 0 else (name, base)
                x = {first: run(first), second: run(second)}
                pairs[name].append(x[name]["samples_per_s"] / x[base]["samples_per_s"])
    rows = []
    for name, (_, _, overrides, base) in VARIANTS.items():
        xs = runs[name]
        ratio = median_range(pairs[name], "{:.2f}") + "x" if base else "1 (baseline)"
        first = [float(m.group(1)) for x in xs for m in [FIRST_STEP.search(x["log"])] if m]
        rows.append(f"| {name} | {median_range([x['samples_per_s'] for x in xs])} | {ratio} | "
                    + " | ".join(f"{statistics.median(x['phases_ms'][p] for x in xs):.1f}" for p in PHASES)
                    + f" | {max(x['memory_gb'] for x in xs):.2f} | "
                    + (f"{statistics.median(first):.0f} s" if first else "–") + " |")
    body = (f"`python -m bench.knobs {' '.join(sys.argv[1:])}` on {machine()}.\n\n"
            f"{args.ranks} CPU ranks over gloo, fp32, ZeRO-2, global batch {args.global_batch}, {args.workers} loader "
            f"workers per rank, {args.steps} steps on the demo corpus' shards at 32 px; samples/s after the first log "
            f"window, median (min-max) over all runs ({args.rounds} rounds; baselines run beside every variant); "
            "speed-up against the baseline run beside it, median (min-max) over rounds. Phases: median ms per "
            "step.\n\n"
            f"| variant | samples/s | against its baseline | {' | '.join(PHASES)} | max RSS GiB | first step |\n"
            f"|---|---|---|{'---|' * len(PHASES)}---|---|\n" + "\n".join(rows) + "\n\n"
            "On GPUs (NCCL, bf16: where overlap_comm, bucket sizes, channels-last and compilation are meant to pay): "
            "not measured, needs a GPU.")
    print(body)
    if args.write:
        write_section("Training knobs, one at a time", body)


if __name__ == "__main__":
    main()
