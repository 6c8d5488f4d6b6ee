"""`data_tools download` vs raw img2dataset, same URL list, same loopback server, same settings.

    python -m bench.download [--images 3000] [--rounds 3] [--size 256] [--write]

The demo corpus (`data_tools demo-corpus`, its own process) serves SIZE px JPEGs on 127.0.0.1. Each round runs both
commands as fresh processes into fresh folders, in alternating order: img2dataset's CLI with the settings ours hands
it, and ours, which adds reading and checking the list, the header check of every image
(data_tools/img2dataset_hooks.py) and the manifest (sha256 of every shard). Images/s = samples written / wall time
of the whole command, imports included. Goal: ours >= 0.95x img2dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine, median_range, write_section

SETTINGS = dict(image_size=64, resize_mode="border", processes=2, threads=16, samples_per_shard=500)


def serve(corpus: Path, images: int, size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", "demo-corpus", str(corpus), "--train", str(images),
                             "--val", "24", "--size", str(size)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc
    raise RuntimeError("demo-corpus did not start serving")


def ours(urls: Path, out: Path) -> list[str]:
    s = SETTINGS
    return [sys.executable, "-m", "data_tools", "download", str(urls), "--out", str(out), "--no-progress",
            "--image-size", str(s["image_size"]), "--resize-mode", s["resize_mode"], "--processes",
            str(s["processes"]), "--threads", str(s["threads"]), "--samples-per-shard", str(s["samples_per_shard"])]


def img2dataset(urls: Path, out: Path) -> list[str]:
    s = SETTINGS
    return ["img2dataset", f"--url_list={urls}", f"--output_folder={out}", "--input_format=parquet",
            "--url_col=url", "--caption_col=caption", "--output_format=webdataset", "--encode_format=jpg",
            f"--image_size={s['image_size']}", f"--resize_mode={s['resize_mode']}",
            f"--processes_count={s['processes']}", f"--thread_count={s['threads']}",
            f"--number_sample_per_shard={s['samples_per_shard']}", "--enable_wandb=False", "--timeout=10"]


def images_per_s(cmd: list[str], out: Path) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    samples = sum(json.loads(f.read_text())["successes"] for f in out.glob("*_stats.json"))
    return samples / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=256, help="side of the served images")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    about = machine()
    rates: dict[str, list[float]] = {"ours": [], "img2dataset": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        server = serve(corpus, args.images, args.size)
        try:
            for r in range(args.rounds):
                order = [("ours", ours), ("img2dataset", img2dataset)]
                for name, make in order if r % 2 == 0 else order[::-1]:
                    out = Path(tmp) / f"{name}-{r}"
                    rates[name].append(images_per_s(make(corpus / "urls.parquet", out), out))
                    print(f"round {r}: {name} {rates[name][-1]:.0f} images/s", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["img2dataset"])
    table = "\n".join(["| | images/s | ratio |", "|---|---|---|",
                       f"| img2dataset CLI | {median_range(rates['img2dataset'], '{:.0f}')} | 1 |",
                       f"| data_tools download | {median_range(rates['ours'], '{:.0f}')} | {ratio:.3f}x |"])
    print(table)
    if args.write:
        command = "python -m bench.download " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--write")
        write_section("Download: data_tools download vs img2dataset", f"""
`{command.strip()}` on {about}.

{args.images} demo-corpus JPEGs of {args.size} px served from 127.0.0.1 by a separate process; both commands with
{SETTINGS['processes']} processes x {SETTINGS['threads']} threads, resized to {SETTINGS['image_size']} px
({SETTINGS['resize_mode']}), shards of {SETTINGS['samples_per_shard']}; wall time of the whole command, median
(min–max) over {args.rounds} rounds. Goal: >= 0.95x.

{table}

Ours does more per run: reads and checks the list (dedupe, schemes, captions), checks every image's header before
OpenCV decodes it (decompression bombs, EXIF rotation, 16-bit, CMYK) and writes the manifest with each shard's
sha256.
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
