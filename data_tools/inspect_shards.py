"""What a shard directory holds, in numbers and pictures, before a run is spent on it.

Counts (shards, samples, bytes: from manifest.json when there is one, else from the files), the stored images'
width and height (from each image's header: nothing is decoded, so a shard costs little more than its tar
headers), caption lengths in characters and words (.txt members), why rows were not downloaded (the manifest's
`failures`), and a grid of the first images. Writes DIR/inspect.json (every number) and DIR/grid.png and prints
a summary. `--sample-shards K` reads K shards spread evenly over the list, for corpora of 10^5 shards; the
counts still cover all of them when the manifest is there (without it, the sample count is estimated).
"""
from __future__ import annotations

import argparse
import bisect
import json
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

from data_tools import DataToolsError
from data_tools.manifest import MANIFEST, write_json
from data_tools.verify import IMAGE_EXTS

CELL = 96  # grid.png: each cell is CELL x CELL pixels, the image padded to keep its aspect ratio
GAP = 2  # background pixels around each thumbnail, so that neighbouring images stay apart
# Histogram bucket starts; each bucket runs to the next start, the last one has no end.
PIXEL_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048)
CHAR_EDGES = (0, 1, 10, 20, 40, 80, 160, 320, 640)
WORD_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128)
BAR = 40  # characters of the longest text histogram bar


def spread(names: list[str], k: int | None) -> list[str]:
    """k names spread evenly over the list, the first one included (all of them when k is None or too large)."""
    if k is None or k >= len(names):
        return list(names)
    return [names[i * len(names) // k] for i in range(k)]


def _label(edges: tuple[int, ...], i: int) -> str:
    if i == len(edges) - 1:
        return f">={edges[i]}"
    lo, hi = edges[i], edges[i + 1] - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


def distribution(values: Counter, edges: tuple[int, ...]) -> dict:
    """Bucketed histogram and exact statistics of a value -> count Counter (a Counter, not the values: memory
    grows with distinct lengths and sides, not with samples)."""
    hist = [0] * len(edges)
    for v, n in values.items():
        hist[bisect.bisect_right(edges, v) - 1] += n
    total = sum(values.values())
    median, seen = None, 0
    for v in sorted(values):
        seen += values[v]
        if 2 * seen >= total:
            median = v
            break
    return {"count": total, "min": min(values, default=None), "max": max(values, default=None),
            "mean": sum(v * n for v, n in values.items()) / total if total else None, "median": median,
            "most_common": values.most_common(5),
            "histogram": {_label(edges, i): n for i, n in enumerate(hist)}}


class _Grid:
    """The first n x n decodable images as thumbnails, pasted as they come (no list of images is kept)."""

    def __init__(self, n: int):
        self.n, self.filled = n, 0
        self.image = Image.new("RGB", (n * CELL, n * CELL), (24, 24, 24))

    @property
    def full(self) -> bool:
        return self.filled == self.n * self.n

    def add(self, f) -> None:
        try:
            with Image.open(f) as img:
                thumb = ImageOps.pad(img.convert("RGB"), (CELL - 2 * GAP,) * 2, color=(24, 24, 24))
        except Exception:  # noqa: BLE001 - an image that does not decode is left out of the grid (verify reports it)
            return
        row, col = divmod(self.filled, self.n)
        self.image.paste(thumb, (col * CELL + GAP, row * CELL + GAP))
        self.filled += 1


def _read_shard(path: Path, acc: dict, grid: _Grid) -> None:
    """Adds one shard's samples, image sides and caption lengths to acc; image members are read to the end of
    their header only (and in full for the grid's first images)."""
    keys = set()
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            keys.add(m.name.split(".", 1)[0])
            ext = m.name.rsplit(".", 1)[-1].lower()
            if ext in IMAGE_EXTS:
                try:
                    with Image.open(tar.extractfile(m)) as img:  # lazy: parses the header, decodes nothing
                        w, h = img.size
                except Exception:  # noqa: BLE001 - PIL raises several types for bytes that are not an image
                    acc["unreadable_images"] += 1
                    continue
                acc["width"][w] += 1
                acc["height"][h] += 1
                if not grid.full:
                    grid.add(tar.extractfile(m))
            elif ext == "txt":
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                acc["chars"][len(text)] += 1
                acc["words"][len(text.split())] += 1
    acc["samples"] += len(keys)


def inspect(shard_dir: str | Path, out: str | Path | None = None, grid: int = 8,
            sample_shards: int | None = None) -> dict:
    """Numbers of shard_dir (see the module docstring), written with the grid to out (default SHARDS/inspect);
    returns what inspect.json holds."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise DataToolsError(f"{shard_dir}: not a directory")
    if grid < 1 or (sample_shards is not None and sample_shards < 1):
        raise DataToolsError(f"--grid and --sample-shards must be at least 1, not {grid} and {sample_shards}")
    manifest = None
    if (shard_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((shard_dir / MANIFEST).read_text())
            names = [s["name"] for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataToolsError(f"{shard_dir / MANIFEST}: not a shard manifest ({type(e).__name__}: {e})") from None
    else:
        names = sorted(p.name for p in shard_dir.glob("*.tar"))
        if not names:
            raise DataToolsError(f"{shard_dir}: no {MANIFEST} and no .tar files")
    out = Path(out) if out else shard_dir / "inspect"

    acc = {"samples": 0, "unreadable_images": 0, "width": Counter(), "height": Counter(), "chars": Counter(),
           "words": Counter()}
    thumbs, skipped = _Grid(grid), []
    read = spread(names, sample_shards)
    for name in read:
        try:
            _read_shard(shard_dir / name, acc, thumbs)
        except (OSError, tarfile.TarError, EOFError) as e:  # described, not judged: `verify` says what is wrong
            skipped.append({"shard": name, "error": f"{type(e).__name__}: {e}"})
    shards_read = len(read) - len(skipped)

    if manifest is not None:
        samples, exact = manifest.get("total_samples", sum(s["samples"] for s in manifest["shards"])), True
        total_bytes = manifest.get("total_bytes", sum(s["bytes"] for s in manifest["shards"]))
    else:
        exact = shards_read == len(names)
        samples = acc["samples"] if exact else round(acc["samples"] / max(shards_read, 1) * len(names))
        total_bytes = sum((shard_dir / n).stat().st_size for n in names)
    out.mkdir(parents=True, exist_ok=True)
    thumbs.image.save(out / "grid.png")
    report = {
        "shard_dir": str(shard_dir), "source": MANIFEST if manifest is not None else "files",
        "shards": len(names), "samples": samples, "samples_exact": exact, "bytes": total_bytes,
        "shards_read": shards_read, "shards_unreadable": skipped, "samples_read": acc["samples"],
        "images_read": sum(acc["width"].values()), "unreadable_images": acc["unreadable_images"],
        "captions_read": sum(acc["chars"].values()),
        "width": distribution(acc["width"], PIXEL_EDGES), "height": distribution(acc["height"], PIXEL_EDGES),
        "caption_chars": distribution(acc["chars"], CHAR_EDGES),
        "caption_words": distribution(acc["words"], WORD_EDGES),
        "failures": (manifest or {}).get("failures", {}), "rows": (manifest or {}).get("rows"),
        "grid": {"path": str(out / "grid.png"), "n": grid, "cell": CELL, "images": thumbs.filled},
    }
    write_json(out / "inspect.json", report)
    return report


def _histogram_lines(hist: dict) -> list[str]:
    """Buckets from the first non-empty one to the last, with a bar scaled to the largest."""
    filled = [i for i, n in enumerate(hist.values()) if n]
    if not filled:
        return ["  (none)"]
    items = list(hist.items())[filled[0]:filled[-1] + 1]
    top = max(n for _, n in items)
    return [f"  {label:>9} {n:>10}  {'#' * max(round(BAR * n / top), 1 if n else 0)}".rstrip() for label, n in items]


def summary(report: dict) -> str:
    est = "" if report["samples_exact"] else " (estimated)"
    lines = [f"{report['shard_dir']}: {report['shards']} shards, {report['samples']} samples{est}, "
             f"{report['bytes'] / 1e6:.1f} MB (from {report['source']})",
             f"read {report['shards_read']} of {report['shards']} shards: {report['samples_read']} samples, "
             f"{report['images_read']} images, {report['captions_read']} captions"]
    if report["unreadable_images"]:
        lines.append(f"images whose header PIL cannot read: {report['unreadable_images']}")
    lines += [f"shard not read: {s['shard']}: {s['error']}" for s in report["shards_unreadable"]]
    for key, what in (("width", "image width (px)"), ("height", "image height (px)"),
                      ("caption_chars", "caption length (characters)"), ("caption_words", "caption length (words)")):
        d = report[key]
        if d["count"]:
            lines.append(f"{what}: median {d['median']}, mean {d['mean']:.1f}, {d['min']}..{d['max']}")
            lines += _histogram_lines(d["histogram"])
    if report["failures"]:
        lines.append(f"not downloaded (of {report['rows']} rows): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(report["failures"].items(), key=lambda kv: -kv[1])))
    g = report["grid"]
    lines.append(f"grid: {g['path']} ({g['images']} images, {g['n']}x{g['n']}); "
                 f"numbers: {Path(g['path']).with_name('inspect.json')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = inspect(args.shards, args.out, args.grid, args.sample_shards)
    print(summary(report), flush=True)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="counts, image sizes, caption lengths and a sample grid of shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", metavar="SHARDS", help="shard directory (manifest.json, else its *.tar files)")
    p.add_argument("--out", metavar="DIR", help="where inspect.json and grid.png go (default: SHARDS/inspect)")
    p.add_argument("--grid", type=int, default=8, metavar="N", help=f"N x N thumbnails of {CELL} px in grid.png")
    p.add_argument("--sample-shards", type=int, metavar="K", help="read only K shards, spread evenly (default: all)")
    p.set_defaults(func=run)
