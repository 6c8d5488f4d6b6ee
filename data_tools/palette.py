"""SHARDS -> PALETTE.npy: ImageGPT's colour palette, k-means over the pixels the model will see.

ImageGPT (Chen et al. 2020) reads an image as a sequence of palette indices: every RGB pixel becomes the nearest of
k = 512 colours (9-bit colour: a 3 x 8-bit pixel would need a 16.7M-way softmax), the centres of k-means over
pixels of training images downsampled to the model's resolution and scaled to [-1, 1]. So the pixels clustered
here are exactly those the model will see: each image is decoded, converted to RGB, centre-cropped to a square
and resized to --image-size (pipeline.models.palette.model_pixels, the ImageGPT task's own pixel path).

Scale: a palette is float32, shape (k, 3), RGB in [-1, 1], uint8 value v <-> v / 127.5 - 1 (0 -> -1, 255 -> 1);
quantisation (pixels <-> tokens) lives with the model family, in pipeline/models/palette.py.

Sampling: every pixel of every readable image gets a random key and the --pixels pixels of smallest key are kept
(bottom-k sampling: a uniform sample without replacement, in one pass, without knowing the image count first).
Keys come from a generator seeded with (seed, shard index), so each shard's candidates are a function of that
shard alone; shards are read in parallel (--workers) and merged in shard order, so the sample, and the palette,
depend on the seed and the shards only. Sorted by key, the sample is also a random order: k-means is fed it in
batches of --batch-size through MiniBatchKMeans.partial_fit (k-means++ on the first 3 batches, as `fit` does),
so k-means memory is bounded by the batch. The sample itself is held as uint8, 3 bytes a pixel; while shards are
read, each process holds up to 2 x --pixels candidates of 11 bytes (key and pixel): 22 MB per 10^6 pixels.

Corrupt images, samples without an image and unreadable or truncated shards are skipped and counted (in the JSON
sidecar PALETTE.json and the printed summary); only a corpus with no readable pixel at all is an error.
"""
from __future__ import annotations

import argparse
import io
import json
import itertools
import multiprocessing
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from data_tools import DataToolsError
from data_tools.shards import is_remote, shard_urls
from pipeline.models.palette import _nearest_chunks, model_pixels, to_unit

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the sample fields read as the image, first present wins (as training)
EXAMPLES_KEPT = 20  # skipped samples named in the sidecar; the counts are complete
MAX_IMAGE_AREA = 100e6  # larger images are skipped from their header, undecoded (decompression bombs)


@dataclass
class PixelSample:
    """Pixels drawn from shards, in random order, with the count of everything read and skipped."""

    pixels: np.ndarray  # (n, 3) uint8 RGB
    images: int = 0
    corrupt: int = 0  # image bytes PIL could not decode (or too large to)
    no_image: int = 0  # samples with none of IMAGE_KEYS
    examples: list[str] = field(default_factory=list)  # "url#key: error" of the first skipped samples
    damaged: list[dict] = field(default_factory=list)  # {"url", "error"} of shards unreadable or cut short


@dataclass
class PaletteFit:
    """A fitted palette and what it was fitted on (the sidecar's content)."""

    centres: np.ndarray  # (k, 3) float32 in [-1, 1]
    sample: PixelSample
    urls: list[str]
    seed: int
    image_size: int
    pixels_requested: int
    batch_size: int
    inertia: float  # sum over the sample of the squared distance to the nearest centre, in [-1, 1] units

    def record(self) -> dict:
        s = self.sample
        return {"k": len(self.centres), "seed": self.seed, "image_size": self.image_size,
                "scale": "RGB in [-1, 1]: uint8 v -> v / 127.5 - 1",
                "pixels_requested": self.pixels_requested, "pixels_used": len(s.pixels), "images_read": s.images,
                "corrupt_images": s.corrupt, "samples_without_image": s.no_image, "skipped_examples": s.examples,
                "shards": self.urls, "damaged_shards": s.damaged, "batch_size": self.batch_size,
                "inertia": self.inertia, "inertia_per_pixel": self.inertia / max(len(s.pixels), 1),
                "sklearn_version": version("scikit-learn"), "numpy_version": np.__version__}


# ---------------------------------------------------------------------------------------------------- reading


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_IMAGE_AREA:  # header only: a few-KB PNG can claim 50k x 50k
            raise ValueError(f"image of {image.width}x{image.height} pixels is larger than {MAX_IMAGE_AREA:.0f}")
        return model_pixels(image, size)


class _Smallest:
    """The n (key, pixel) pairs of smallest key among those added; memory at most ~2n pairs.

    Deterministic for a given sequence of add() calls (argpartition on the same arrays), which is what makes the
    sample independent of --workers: the calls per shard, and the merge of shards in shard order, never change."""

    def __init__(self, n: int):
        self.n, self.size, self.threshold = n, 0, np.inf
        self.keys: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []

    def add(self, keys: np.ndarray, pixels: np.ndarray) -> None:
        if self.threshold < np.inf:  # cannot enter the n smallest: dropped now rather than at the next prune
            keep = keys < self.threshold
            keys, pixels = keys[keep], pixels[keep]
        self.keys.append(keys)
        self.pixels.append(pixels)
        self.size += len(keys)
        if self.size > 2 * self.n:
            self._prune()

    def _prune(self) -> None:
        keys = np.concatenate(self.keys) if self.keys else np.empty(0)
        pixels = np.concatenate(self.pixels) if self.pixels else np.empty((0, 3), np.uint8)
        if len(keys) > self.n:
            kept = np.argpartition(keys, self.n - 1)[:self.n]
            keys, pixels = keys[kept], pixels[kept]
            self.threshold = keys.max()
        self.keys, self.pixels, self.size = [keys], [pixels], len(keys)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys ascending, pixels in the same order (a random order: the keys are i.i.d. uniform)."""
        self._prune()
        order = np.argsort(self.keys[0], kind="stable")
        return self.keys[0][order], self.pixels[0][order]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e.args[0] if e.args else e}"[:200]


def read_shard(task: tuple[int, str, int, int, int]) -> dict:
    """One shard's candidates (index, url, pixels, image_size, seed) -> its `pixels` smallest-key pixels + counts.

    Keys are drawn from a generator seeded with (seed, shard index), per decoded image in tar order: a pure
    function of the shard and the seed, whichever process reads it. A damaged tar keeps the samples before the
    damage (webdataset's tar iterator stops there) and is reported once."""
    index, url, pixels, image_size, seed = task
    rng = np.random.default_rng([seed, index])
    smallest, counts, examples, errors = _Smallest(pixels), Counter(), [], []
    for raw in wds.tariterators.tarfile_samples([{"url": url}], handler=lambda e: errors.append(e) or True):
        data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
        if data is None:
            counts["no_image"] += 1
            if len(examples) < EXAMPLES_KEPT:
                examples.append(f"{url}#{raw.get('__key__')}: no {'/'.join(IMAGE_KEYS)} field")
            continue
        try:
            rgb = _decode(data, image_size).reshape(-1, 3)
        except Exception as e:  # anything PIL raises on bad bytes: skip and count, never abort
            counts["corrupt"] += 1
            if len(examples) < EXAMPLES_KEPT:
                examples.append(f"{url}#{raw.get('__key__')}: {_error(e)}")
            continue
        counts["images"] += 1
        smallest.add(rng.random(len(rgb)), rgb)
    keys, kept = smallest.result()
    return {"keys": keys, "pixels": kept, "images": counts["images"], "corrupt": counts["corrupt"],
            "no_image": counts["no_image"], "examples": examples,
            "error": _error(errors[0]) if errors else None}


def _read_in_order(tasks: list[tuple], workers: int):
    """read_shard of each task, in task order; in `workers` spawned processes (no fork of a parent that torch or
    OpenMP made threaded), at most 2 x workers shards in flight so finished results never pile up in memory.
    A worker that dies (killed for memory) ends the run with an error rather than a pool that waits forever."""
    if workers == 1 or len(tasks) == 1:
        yield from map(read_shard, tasks)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        todo = iter(tasks)
        pending = deque(pool.submit(read_shard, t) for t in itertools.islice(todo, 2 * workers))
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool:
                raise DataToolsError(f"a process reading shards died (out of memory?): try fewer --workers, "
                                     f"or fewer --pixels (up to {22 * tasks[0][2] / 1e6:.3g} MB each)") from None
            if (task := next(todo, None)) is not None:
                pending.append(pool.submit(read_shard, task))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def sample_pixels(urls: Sequence[str], pixels: int, image_size: int, seed: int, workers: int = 1,
                  progress: bool = False) -> PixelSample:
    """A uniform random sample of (at most) `pixels` model pixels over all shards, in random order.

    Shards are read by `workers` processes (spawned: safe after torch or OpenMP started threads in this one),
    results merged in shard order, so the sample does not depend on `workers`."""
    tasks = [(i, url, pixels, image_size, seed) for i, url in enumerate(urls)]
    merged, sample = _Smallest(pixels), PixelSample(np.empty((0, 3), np.uint8))
    results = _read_in_order(tasks, workers)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(tasks), unit="shard", desc="palette", dynamic_ncols=True)
    for task, r in zip(tasks, results):
        merged.add(r["keys"], r["pixels"])
        sample.images += r["images"]
        sample.corrupt += r["corrupt"]
        sample.no_image += r["no_image"]
        sample.examples += r["examples"][:EXAMPLES_KEPT - len(sample.examples)]
        if r["error"]:
            sample.damaged.append({"url": task[1], "error": r["error"]})
    sample.pixels = merged.result()[1]
    return sample


# ---------------------------------------------------------------------------------------------------- fitting


def fit_centres(pixels: np.ndarray, k: int, seed: int, batch_size: int) -> np.ndarray:
    """k-means centres (k, 3) float32 in [-1, 1] of uint8 pixels (n, 3) given in random order.

    MiniBatchKMeans.partial_fit, one pass, one batch converted to float at a time. partial_fit initialises
    (k-means++, seeded, n_init=1) on its first call's data, so the first call gets 3 batches (at least 3k
    pixels): what MiniBatchKMeans.fit's default init_size would use."""
    from sklearn.cluster import MiniBatchKMeans  # slow import: only once there is something to fit

    first = min(len(pixels), max(3 * batch_size, 3 * k))
    kmeans = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=1, batch_size=batch_size, init_size=first,
                             random_state=seed, compute_labels=False)
    kmeans.partial_fit(to_unit(pixels[:first], np.float64))
    for start in range(first, len(pixels), batch_size):
        kmeans.partial_fit(to_unit(pixels[start:start + batch_size], np.float64))
    return kmeans.cluster_centers_.astype(np.float32)


def _check(k: int, pixels: int, image_size: int, seed: int, batch_size: int, workers: int) -> None:
    for name, value in (("k", k), ("pixels", pixels), ("image-size", image_size), ("batch-size", batch_size),
                        ("workers", workers)):
        if value < 1:
            raise DataToolsError(f"--{name} must be at least 1, not {value}")
    if pixels < k:
        raise DataToolsError(f"--pixels {pixels} is fewer than --k {k}: k-means needs a pixel per centre at least")
    if not 0 <= seed < 2**32:
        raise DataToolsError(f"--seed must be in [0, 2**32), not {seed}")


def fit(urls: str | os.PathLike | Sequence[str], k: int = 512, pixels: int = 10**6, image_size: int = 32,
        seed: int = 0, batch_size: int = 4096, workers: int = 1, progress: bool = False) -> PaletteFit:
    """Sample pixels from the shards and fit the palette; everything the sidecar reports comes with it."""
    _check(k, pixels, image_size, seed, batch_size, workers)
    urls = shard_urls(urls)
    sample = sample_pixels(urls, pixels, image_size, seed, workers, progress)
    if len(sample.pixels) == 0:
        first = sample.damaged[0]["error"] if sample.damaged else (sample.examples or ["no samples"])[0]
        raise DataToolsError(f"{urls[0] if len(urls) == 1 else urls[0] + ' ...'}: no readable pixel in "
                             f"{len(urls)} shards ({sample.corrupt} corrupt images, {len(sample.damaged)} "
                             f"unreadable shards; first problem: {first})")
    if len(sample.pixels) < k:
        raise DataToolsError(f"{urls[0]}: only {len(sample.pixels)} pixels in {sample.images} images, "
                             f"fewer than --k {k}")
    centres = fit_centres(sample.pixels, k, seed, batch_size)
    inertia = 0.0  # converted to float a batch at a time, as fitted: memory bounded by the batch
    for start in range(0, len(sample.pixels), batch_size):
        batch = to_unit(sample.pixels[start:start + batch_size])
        inertia += sum(float(d.sum()) for _, d in _nearest_chunks(batch, centres, with_distance=True))
    return PaletteFit(centres, sample, urls, seed, image_size, pixels, batch_size, inertia)


def fit_palette(urls: str | os.PathLike | Sequence[str], k: int = 512, pixels: int = 10**6, image_size: int = 32,
                seed: int = 0, batch_size: int = 4096, workers: int = 1) -> np.ndarray:
    """ImageGPT palette of shards (a directory, a brace pattern or a list): centres (k, 3) float32 in [-1, 1].

    Bit-identical for the same shards, seed and settings, whatever `workers` (module docstring)."""
    return fit(urls, k, pixels, image_size, seed, batch_size, workers).centres


# ---------------------------------------------------------------------------------------------------- files


def save_palette(result: PaletteFit, path: str | os.PathLike) -> Path:
    """PALETTE.npy and its sidecar PALETTE.json, each written to .tmp then renamed: never a half-written file."""
    path = Path(path)
    if path.suffix != ".npy":
        raise DataToolsError(f"{path}: a palette file name ends in .npy")
    if path.is_dir():
        raise DataToolsError(f"{path}: is a directory; --out names the .npy file")
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda f: np.save(f, result.centres.astype(np.float32)))
    _replace(path.with_suffix(".json"), lambda f: f.write(json.dumps(result.record(), indent=2).encode() + b"\n"))
    return path


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a .tmp name
        write(f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- CLI


def summary(result: PaletteFit, path: Path) -> str:
    s = result.sample
    lines = [f"{len(result.centres)} colours from {len(s.pixels)} pixels of {s.images} images "
             f"({result.image_size}x{result.image_size}) in {len(result.urls)} shards; inertia "
             f"{result.inertia:.6g} ({result.inertia / len(s.pixels):.3g} per pixel, [-1, 1] scale)"]
    if len(s.pixels) < result.pixels_requested:
        lines.append(f"all the pixels there are: {len(s.pixels)} of --pixels {result.pixels_requested}")
    if s.corrupt or s.no_image:
        lines.append(f"skipped: {s.corrupt} corrupt images, {s.no_image} samples without an image"
                     + (f", e.g. {s.examples[0]}" if s.examples else ""))
    for shard in s.damaged:
        lines.append(f"damaged shard (samples before the damage kept): {shard['url']}: {shard['error']}")
    lines.append(f"palette: {path} (float32 (k, 3), RGB in [-1, 1]), record: {path.with_suffix('.json')}")
    return "\n".join(lines)


def default_out(urls: list[str], shards: str, k: int) -> Path:
    """SHARDS/palette/k{k}.npy: beside the shards (the directory, or a pattern's first shard's directory), in a
    folder of its own: img2dataset's incremental mode reads every SHARDS/*.json as a shard record."""
    folder = Path(shards) if Path(shards).is_dir() else Path(urls[0]).parent
    if is_remote(urls[0]) or not folder.is_dir():
        raise DataToolsError(f"{shards}: shards are not in a local directory; name the palette file with --out")
    return folder / "palette" / f"k{k}.npy"


def _count(text: str) -> int:
    """Integers also written as 1e6 or 1_000_000."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    _check(args.k, args.pixels, args.image_size, args.seed, args.batch_size, args.workers)  # before any reading
    urls = shard_urls(args.shards)
    out = Path(args.out) if args.out else default_out(urls, args.shards, args.k)
    result = fit(urls, args.k, args.pixels, args.image_size, args.seed, args.batch_size, args.workers,
                 progress=not args.no_progress)
    save_palette(result, out)
    print(summary(result, out), flush=True)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("palette", help="ImageGPT colour palette: k-means over the pixels of shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", metavar="SHARDS", help="directory of *.tar, or a brace pattern 's/{00000..00099}.tar'")
    p.add_argument("--k", type=int, default=512, help="palette size (ImageGPT: 512, 9-bit colour)")
    p.add_argument("--out", metavar="PALETTE.npy",
                   help="default: SHARDS/palette/k{k}.npy; record beside it (.json)")
    p.add_argument("--pixels", type=_count, default=10**6, help="pixels sampled over all images (default 1e6)")
    p.add_argument("--image-size", type=int, default=32,
                   help="side the images are resized to first: the model's resolution (ImageGPT 32/48/64)")
    p.add_argument("--seed", type=int, default=0, help="pixel sample and k-means initialisation")
    p.add_argument("--batch-size", type=int, default=4096, help="pixels per MiniBatchKMeans step")
    p.add_argument("--workers", type=int, default=1, help="processes reading shards (the result does not change)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
