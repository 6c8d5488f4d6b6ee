"""ImageGPT's loader: palette tokens per second per loader worker, against what a GPU consumes.

    python -m bench.imagegpt_tokens [--resolutions 32 64] [--batches 30] [--rounds 3] [--write]

Per resolution, shards of JPEGs stored as `data_tools download --target configs/imagegpt/...` stores them (img2dataset
center_crop at the model's side: 32 or 64 px) feed our TrainStream with ONE loader worker and the ImageGPT task's
training transform (decode, centre square, random flip, nearest of 512 palette colours, int16 tokens), batches of
64: the worker's images/s x tokens per image is one worker's rate. Each block runs in a fresh process, after 3
warm-up batches; median (min-max) over --rounds blocks. The quantiser alone (numpy, one image at a time, no decode)
is timed too.

GPU demand: training FLOPs per image of iGPT-S and iGPT-M at that resolution (counted on the meta device, forward +
backward) at 40 % MFU of an A100's 312 TFLOP/s in bf16, in images/s; the loader workers one GPU needs is that
demand over one worker's rate.
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, median_range, write_section

BATCH, SHARDS, PER_SHARD = 64, 4, 400
A100_BF16, MFU = 312e12, 0.40


def make_corpus(root: Path, side: int) -> str:
    """Photo-like JPEGs (smooth colour fields plus grain, quality 95) of side x side pixels."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(side)
    for s in range(SHARDS):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(PER_SHARD):
                base = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((side, side),
                                                                                            Image.BICUBIC)
                grain = rng.normal(0, 6, (side, side, 3))
                img = Image.fromarray(np.clip(np.asarray(base, dtype=float) + grain, 0, 255).astype(np.uint8))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=95)
                w.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue()})
    return str(root / f"{{00000..{SHARDS - 1:05d}}}.tar")


def _task(name: str, resolution: int, palette: str | None = None):
    from pipeline import config
    from pipeline.tasks import get_task

    cfg = config.load(str(ROOT / f"configs/imagegpt/{name}.yaml"),
                      [f"model.resolution={resolution}", f"model.palette={palette}" if palette else "data.train="])
    return get_task(cfg.task)(cfg)


def _palette(root: Path) -> str:
    path = root / "palette.npy"
    if not path.exists():
        np.save(path, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    return str(path)


def images_per_s(spec: str, resolution: int, palette: str, batches: int) -> float:
    """One worker's rate: a TrainStream with num_workers=1 and the task's training transform."""
    from pipeline.data import TrainStream

    task = _task("s", resolution, palette)
    stream = iter(TrainStream(spec, task.transform(train=True), BATCH, num_workers=1, seed=0,
                              decode_size=task.decode_size()))
    for _ in range(3):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    elapsed = time.perf_counter() - start
    assert batch["tokens"].shape == (BATCH, resolution ** 2)
    return batches * BATCH / elapsed


def quantise_only(resolution: int, palette: str, n: int = 400) -> float:
    """Images/s of the quantiser alone on already-decoded pixels, one image at a time."""
    from pipeline.models.palette import quantize

    centres = np.load(palette)
    images = np.random.default_rng(0).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    start = time.perf_counter()
    for image in images:
        quantize(image, centres)
    return n / (time.perf_counter() - start)


def block(spec: str, resolution: int, palette: str, batches: int) -> float:
    r = subprocess.run([sys.executable, "-m", "bench.imagegpt_tokens", "--block", spec, "--resolutions",
                        str(resolution), "--palette", palette, "--batches", str(batches)], capture_output=True,
                       text=True, check=True, cwd=ROOT)
    return float(r.stdout.split("images/s ")[-1])


def demand(name: str, resolution: int) -> float:
    """Images/s one A100 trains at MFU in bf16."""
    return A100_BF16 * MFU / _task(name, resolution).flops_per_sample()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.imagegpt_tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write the results into docs/PERFORMANCE.md")
    p.add_argument("--block", help=argparse.SUPPRESS)
    p.add_argument("--palette", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.block:
        print(f"images/s {images_per_s(args.block, args.resolutions[0], args.palette, args.batches):.2f}")
        return 0
    about = machine()
    rows, workers_needed = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        palette = _palette(Path(tmp))
        for r in args.resolutions:
            (Path(tmp) / str(r)).mkdir()
            spec = make_corpus(Path(tmp) / str(r), r)
            rates = [block(spec, r, palette, args.batches) for _ in range(args.rounds)]
            worker = statistics.median(rates)
            alone = quantise_only(r, palette)
            needs = {name: demand(name, r) for name in ("s", "m")}
            workers_needed = max(workers_needed, *(n / worker for n in needs.values()))
            rows.append(f"| {r} px ({r * r:,} tokens) | {median_range(rates, '{:.0f}')} | "
                        f"{worker * r * r / 1e6:.2f}M | {alone:,.0f} | "
                        + " | ".join(f"{needs[n]:,.0f} img/s: {needs[n] / worker:.2f} workers" for n in ("s", "m"))
                        + " |")
            print(rows[-1], flush=True)
    body = f"""`python -m bench.imagegpt_tokens` on {about}.

One loader worker's rate with the ImageGPT task's training transform (JPEG decode, centre square, random flip,
nearest of 512 palette colours in numpy, int16 tokens), images stored at the model's side as `data_tools download
--target` stores them, batches of {BATCH}, median (min–max) over {args.rounds} blocks of {args.batches} batches, each
block a fresh process; the quantiser alone on decoded pixels, one image at a time. GPU demand: images/s of one A100
training iGPT-S / iGPT-M at that resolution at {MFU:.0%} MFU in bf16 (training FLOPs counted on the meta device), and
the loader workers that takes at this worker's rate.

| resolution | images/s per worker | tokens/s per worker | quantiser only, img/s | iGPT-S on an A100 | iGPT-M on an A100 |
|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

So one A100 training these models needs at most {workers_needed:.1f} loader workers (`data.num_workers` is 4 in
configs/imagegpt/base.yaml; an H100, about 3x faster, {3 * workers_needed:.1f}).
"""
    print(body)
    if args.write:
        write_section("ImageGPT loader: palette tokens per worker vs a GPU's demand", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
