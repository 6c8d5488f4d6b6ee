"""Time and peak memory of `data_tools verify`, `reshard` and `palette` at three corpus sizes.

    python -m bench.data_tools_scale [--shards 8 32 128] [--per-shard 100] [--write]

Each command runs as its own process (its peak RSS from wait4) on corpora of 8, 32 and 128 shards of 100 photo-like
128 px JPEGs. Linear scaling shows as a constant time per shard and a flat peak memory. palette samples a fixed
number of pixels per image (`--pixels` grows with the corpus, 100 per image), so its work grows with it too.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, write_section


def make_corpus(root: Path, shards: int, per_shard: int) -> None:
    import json

    import webdataset as wds
    from PIL import Image

    from data_tools.manifest import write_shard_manifest

    rng = np.random.default_rng(shards)
    root.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue(), "txt": f"image {i} of shard {s}",
                         "json": json.dumps({"key": f"{s:05d}{i:04d}"}).encode()})
    write_shard_manifest(root, [f"{s:05d}.tar" for s in range(shards)])


# A child's peak RSS counts the memory of the process it was forked from (Linux keeps the pre-exec high-water
# mark), and this process holds torch: each command is started by a small Python that reports its child's peak.
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the command, imports included."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return elapsed, int(proc.stderr.split()[-1]) / 1024


def linear_fit(name: str, rows: list[tuple[str, int, float, float]]) -> str:
    """Table row: the least-squares line through (shards, seconds), the largest residual, the RSS slope."""
    n = np.array([r[1] for r in rows], dtype=float)
    seconds, rss = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    per_shard, fixed = np.polyfit(n, seconds, 1)
    deviation = np.max(np.abs(seconds - (fixed + per_shard * n)))
    return (f"| {name} | {fixed:.1f} | {per_shard * 1000:.0f} | {deviation:.1f} | "
            f"{np.polyfit(n, rss, 1)[0] * 100:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_tools_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    about = machine()
    py = [sys.executable, "-m", "data_tools"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.shards:
            corpus = Path(tmp) / f"c{n}"
            make_corpus(corpus, n, args.per_shard)
            commands = {
                "verify": py + ["verify", str(corpus), "--workers", "2"],
                "reshard": py + ["reshard", str(corpus), "--out", str(Path(tmp) / f"r{n}"), "--samples-per-shard",
                                 str(args.per_shard * 2), "--shuffle", "--seed", "0", "--buffer", "1000"],
                "palette": py + ["palette", str(corpus), "--k", "64", "--pixels", str(100 * n * args.per_shard),
                                 "--out", str(Path(tmp) / f"p{n}.npy")],
            }
            for name, cmd in commands.items():
                seconds, rss = run(cmd)
                rows.append((name, n, seconds, rss))
                print(f"{name} {n} shards: {seconds:.1f} s, {seconds / n * 1000:.0f} ms/shard, peak {rss:.0f} MiB",
                      flush=True)
    table = "\n".join(["| command | shards | samples | seconds | ms per shard | peak RSS, MiB |", "|---|---|---|---|---|---|",
                       *(f"| {name} | {n} | {n * args.per_shard} | {s:.1f} | {s / n * 1000:.0f} | {rss:.0f} |"
                         for name, n, s, rss in sorted(rows, key=lambda r: (r[0], r[1])))])
    header = ("| command | fixed, s | per shard, ms | largest distance from the line, s "
              "| peak RSS growth, MiB per 100 shards |")
    fits = "\n".join([header, "|---|---|---|---|---|", *(linear_fit(name, [r for r in rows if r[0] == name])
                                                          for name in ("verify", "reshard", "palette"))])
    print(table, fits, sep="\n\n")
    if args.write:
        command = "python -m bench.data_tools_scale " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--write")
        write_section("data_tools verify / reshard / palette at three sizes", f"""
`{command.strip()}` on {about}.

Corpora of {', '.join(map(str, args.shards))} shards of {args.per_shard} JPEGs (128x96); each command a fresh
process, wall time including its imports, peak RSS of the process tree's largest member. verify with 2
workers; reshard to shards of {args.per_shard * 2} with a shuffle buffer of 1000; palette with k=64 over 100
pixels per image. Linear scaling: the time per shard falls towards a constant as the fixed start-up cost is
amortised. Least-squares line seconds = fixed + per shard x shards through the three sizes, and how far the
measured times lie from it; palette's pixel sample grows with the corpus by design (100 pixels per image, 1.2 KB
each as float32 RGB), verify's and reshard's memory does not depend on the corpus.

{table}

{fits}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
