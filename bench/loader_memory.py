"""Loader memory per worker against the samples per shard: a stream holds shard indexes, not shards.

    python -m bench.loader_memory [--samples 1000 10000 50000] [--batches 40] [--workers 2] [--write]

For each size, one shard of SAMPLES samples of 336 px photo-like JPEGs (16 distinct images, repeated: the bytes of
a sample do not matter here, their number does) under 4 names (links to one file, so 4 shards for the stream and
one file on disk). A fresh process runs our TrainStream on them as a ViT-L/14@336 CLIP run would (open_clip's train
transform, batches of 64, WORKERS loader workers, open_shards 4, resampled) and samples each worker's RSS after
every batch; the peak over workers and batches is reported, with images/s after 4 warm-up batches.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, write_section

MODEL, BATCH, OPEN = "ViT-L-14-336", 64, 4


def make_shards(root: Path, samples: int) -> str:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):
        base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((448, 336), Image.BICUBIC)
        grain = rng.normal(0, 6, (336, 448, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.asarray(base, float) + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    path = root / "shard.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(samples):
            w.write({"__key__": f"{i:07d}", "jpg": jpegs[i % 16], "txt": f"a photo number {i}",
                     "json": json.dumps({"key": i}).encode()})
    for s in range(4):
        os.link(path, root / f"{s:05d}.tar")
    return str(root / "{00000..00003}.tar")


def block(spec: str, workers: int, batches: int) -> dict:
    """In this process: stream `batches` batches, sampling the workers' RSS; {peak_mib, uss_mib, images_per_s}:
    the peak RSS, and the memory a worker holds alone (USS: RSS less the pages it shares with its trainer) at the
    end."""
    import open_clip
    import psutil
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from pipeline.data import TrainStream
    from pipeline.tasks.clip import ClipTransform, split_at_normalize

    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(
        open_clip.create_model(MODEL, pretrained=None, device="meta"))), is_train=True)
    crop, _ = split_at_normalize(preprocess)
    stream = TrainStream(spec, ClipTransform(crop, open_clip.get_tokenizer(MODEL)), BATCH, num_workers=workers,
                         open_shards=OPEN, decode_size=336)
    peak, start = 0, None
    for i in range(batches):
        next(stream)
        if i == 3:
            start = time.perf_counter()
        for w in stream._it._workers:
            peak = max(peak, psutil.Process(w.pid).memory_info().rss)
    rate = (batches - 4) * BATCH / (time.perf_counter() - start)
    uss = max(psutil.Process(w.pid).memory_full_info().uss for w in stream._it._workers)
    stream.close()
    return {"peak_mib": peak / 2**20, "uss_mib": uss / 2**20, "images_per_s": rate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write", action="store_true")
    p.add_argument("--block", help=argparse.SUPPRESS)  # one measurement, in this process, of this shard spec
    args = p.parse_args(argv)
    if args.block:
        print(json.dumps(block(args.block, args.workers, args.batches)))
        return 0
    about, rows = machine(), []
    for samples in args.samples:
        with tempfile.TemporaryDirectory() as tmp:
            spec = make_shards(Path(tmp), samples)
            size = (Path(tmp) / "shard.tar").stat().st_size
            r = subprocess.run([sys.executable, "-m", "bench.loader_memory", "--block", spec, "--workers",
                                str(args.workers), "--batches", str(args.batches)], cwd=ROOT, check=True,
                               capture_output=True, text=True)
            result = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((samples, size, result))
        print(f"{samples} samples per shard ({size / 2**20:.0f} MiB): worker peak {result['peak_mib']:.0f} MiB "
              f"(own {result['uss_mib']:.0f} MiB), {result['images_per_s']:.0f} images/s", flush=True)
    growth = rows[-1][2]["peak_mib"] - rows[0][2]["peak_mib"]
    table = "\n".join(["| samples per shard | shard size | worker peak RSS, MiB | worker's own (USS), MiB | images/s |",
                       "|---|---|---|---|---|",
                       *(f"| {n:,} | {size / 2**20:,.0f} MiB | {r['peak_mib']:.0f} | {r['uss_mib']:.0f} | "
                         f"{r['images_per_s']:.0f} |" for n, size, r in rows)])
    summary = (f"From {rows[0][0]:,} to {rows[-1][0]:,} samples per shard the worker peak grew by {growth:.0f} MiB "
               "(goal: under 100 MiB).")
    print(table, summary, sep="\n\n")
    if args.write:
        command = "python -m bench.loader_memory " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--write")
        write_section("Loader memory per worker against samples per shard", f"""
`{command.strip()}` on {about}.

One shard of N samples of 336 px JPEGs (448x336, 16 distinct images repeated) under 4 names; our TrainStream with
open_clip's {MODEL} train transform, batches of {BATCH}, {args.workers} loader workers, open_shards {OPEN},
resampled; each worker's RSS sampled after each of {args.batches} batches, the peak over workers reported, in a
fresh process per size (USS, the pages a worker holds alone, at the end: `launch plan` counts it per worker).
Samples are read by offset through an index of the shard's tar headers (16 bytes a sample,
pipeline/shards.py): a worker holds 4 indexes, not 4 shards. The whole-shard reader this replaced measured 619 MiB
per worker with 500-sample shards and 1,550 MiB with 5,000-sample shards (26 and 260 MB, same settings): it would
need some 12 GiB per worker for these 50,000-sample shards.

{table}

{summary}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
