"""WebDataset shards -> new shards of exactly N samples: merge many small ones, split big ones, optionally mix.

Samples are streamed: members are read one at a time and grouped by key as webdataset does (group_by_keys, the
key being the name up to the first dot of its last path part), so memory holds one sample, or the B of
`--shuffle`'s buffer, never the corpus. Members are copied as raw bytes (no image is decoded to pixels or
re-encoded); every member of a sample and its key are kept, in tars written with a fixed mtime, so the same input
and seed give byte-identical shards. Each shard is written as NAME.tmp and renamed when complete, then
OUT/manifest.json (data_tools/manifest.py).

What is dropped, and counted in the manifest:
- an image member PIL cannot open and verify (header and structure; PNG checksums; JPEGs, decoded at 1/8 scale, cut
  short; `--full-decode` decodes every image at full size, at the cost of a decode per image). A sample left with
  no image is dropped (failures: decode_error), as is one that never had one (failures: no_image);
- a damaged input shard (unreadable, truncated, no end-of-archive marker): reported once with its path, the
  samples before the damage kept except the last, which may be missing members (failures: damaged_shard), and
  the other shards resharded; the command then exits 1.

`--shuffle` mixes across shards: the input shards in a seeded random order, then a seeded shuffle buffer of B
samples (each sample written is drawn at random from the buffer and replaced by the next one read). The same
seed gives the same shards. A sample moves at most about B positions earlier than the shuffled shard order puts
it, so B should span many input shards; memory is about B x the mean sample size.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_tools import DataToolsError
from data_tools.shards import shard_urls
from data_tools.manifest import MANIFEST, write_shard_manifest

# what PIL reads among webdataset's image extensions; a member is an image when the last part of its suffix is one
IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "gif", "tif", "tiff"}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's per-tar metadata members (not samples), skipped as it does
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: their own end checks catch truncation
_END_MARKER = tarfile.BLOCKSIZE  # a complete tar ends with zero blocks (two; some writers write one)


@dataclass
class Counts:
    """What one pass over the input dropped: the manifest's failures, dropped_members and damaged_inputs."""

    failures: Counter = field(default_factory=Counter)  # samples not written, by reason
    dropped_members: Counter = field(default_factory=Counter)  # members not written, of samples kept or not
    damaged: list[dict] = field(default_factory=list)  # {"path", "error", "samples_read"} per damaged input shard


def expand_shards(spec: str) -> list[Path]:
    """SHARDS (data_tools/shards.py) as local paths, every one of which must exist."""
    paths = [Path(u) for u in shard_urls(spec)]
    if missing := [p for p in paths if not p.is_file()]:
        raise DataToolsError(f"SHARDS {spec}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]}")
    return paths


def prepare_out(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Create OUT, which must not hold the input; refuse one holding shards unless `force`, which deletes its *.tar
    and manifest first: a listing or brace pattern over OUT must never pick up a stale shard of an earlier run."""
    if out.exists() and not out.is_dir():
        raise DataToolsError(f"--out {out} is a file")
    if out.is_dir():
        if any(p.resolve().parent == out.resolve() for p in inputs):
            raise DataToolsError(f"--out {out} holds the input shards: write to another directory")
        if old := sorted(out.glob("*.tar")):
            if not force:
                raise DataToolsError(f"--out {out} already holds {len(old)} shards: use --force to replace them, "
                                     "or another --out")
            for p in old:
                p.unlink()
            (out / MANIFEST).unlink(missing_ok=True)
        for p in out.glob("*.tar.tmp"):  # left by an interrupted run
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


class ShardSink:
    """Samples -> OUT/00000.tar, 00001.tar, ... of `per_shard` samples each (the last fewer). Each shard is written
    as NAME.tmp and renamed once complete; on an exception the partial one is deleted."""

    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard = Path(out), per_shard
        self.names: list[str] = []
        self.samples = 0
        self._writer = self._tmp = None
        self._count = 0

    def write(self, sample: dict) -> None:
        """`sample`: {"__key__": key, ext: bytes, ...}, written as members `key.ext` (keys starting with _ skipped)."""
        import webdataset as wds

        if self._writer is None:
            self._tmp = self.out / f"{len(self.names):05d}.tar.tmp"
            # raw bytes, no encoder; fixed mtime: the same samples make the same bytes (and sha256)
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
        self._writer.write(sample)
        self._count += 1
        self.samples += 1
        if self._count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        name = self._tmp.name.removesuffix(".tmp")
        os.replace(self._tmp, self.out / name)
        self.names.append(name)
        self._writer, self._count = None, 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self._writer is not None:
            if exc_type is None:
                self._finish()
            else:
                self._writer.close()
                self._tmp.unlink(missing_ok=True)


def _members(path: Path, errors: list[str]) -> Iterator[dict]:
    """{"fname", "data", "__url__"} per regular member, as webdataset's tar_file_iterator yields them; stops at the
    first damage and appends its description to `errors`."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(6).startswith(_COMPRESSED)
            f.seek(0)
            tar = tarfile.open(fileobj=f, mode="r|*")
            for m in tar:
                if m.isreg() and not _META.match(m.name):
                    yield {"fname": m.name, "data": tar.extractfile(m).read(), "__url__": str(path)}
                tar.members = []  # streaming: keep no TarInfo list
            # tarfile ends quietly when a tar stops at or inside a header: only the end-of-archive marker tells
            if not compressed and os.fstat(f.fileno()).st_size - tar.offset < _END_MARKER:
                errors.append("truncated: no end-of-archive marker")
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:  # OSError includes zlib/lzma errors
        errors.append(f"{type(e).__name__}: {e}")


def read_shard(path: Path, counts: Counts) -> Iterator[dict]:
    """The samples of one tar ({"__key__", "__url__", ext: bytes, ...}), grouped by key as webdataset does. A damaged
    tar yields the samples before the damage but the last, which may lack members, and is recorded in counts."""
    import webdataset as wds

    def duplicate(e: Exception) -> bool:  # the same key.ext twice in a row: the first one is kept
        counts.dropped_members["duplicate"] += 1
        return True

    errors: list[str] = []
    previous, read = None, 0
    for sample in wds.tariterators.group_by_keys(_members(path, errors), lcase=False, handler=duplicate):
        if previous is not None:  # a sample is complete once the next key starts
            read += 1
            yield previous
        previous = sample
    if previous is not None and not errors:
        read += 1
        yield previous
    if errors:
        if previous is not None:
            counts.failures["damaged_shard"] += 1
        counts.damaged.append({"path": str(path), "error": errors[0], "samples_read": read})
        print(f"damaged shard {path}: {errors[0]} ({read} samples read before it)", file=sys.stderr, flush=True)


def image_ok(data: bytes, full_decode: bool = False) -> bool:
    """Whether the trainer could decode the image. verify() checks a header and structure (PNG checksums) without
    decoding, but passes a JPEG cut short; JPEGs are therefore decoded at 1/8 scale (draft: every byte of the
    entropy-coded data is still read, a sixty-fourth of the pixels produced, half a full decode's time).
    full_decode decodes every image at full size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and not full_decode:
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load() if full_decode or img.format == "JPEG" else img.verify()
        return True
    except Exception:  # any failure, DecompressionBombError included, means the trainer could not use it
        return False


def checked(samples: Iterable[dict], counts: Counts, full_decode: bool = False) -> Iterator[dict]:
    """Samples with their corrupt image members removed; samples left without an image dropped."""
    for sample in samples:
        images = [k for k in sample if not k.startswith("_") and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        if not images:
            counts.failures["no_image"] += 1
            continue
        bad = [k for k in images if not image_ok(sample[k], full_decode)]
        for k in bad:
            del sample[k]
        counts.dropped_members["corrupt_image"] += len(bad)
        if len(bad) == len(images):
            counts.failures["decode_error"] += 1
            continue
        yield sample


def shuffled(samples: Iterable[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: each sample out is drawn at random from the last `buffer` read."""
    pool: list[dict] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = sample
    rng.shuffle(pool)
    yield from pool


def reshard(inputs: list[Path], out: str | Path, samples_per_shard: int, seed: int | None = None,
            buffer: int = 10000, full_decode: bool = False, force: bool = False, source: str | None = None) -> dict:
    """Rewrite the samples of `inputs` into OUT in shards of samples_per_shard (mixed when seed is not None);
    write and return the manifest."""
    out = Path(out)
    if samples_per_shard < 1:
        raise DataToolsError(f"--samples-per-shard must be >= 1, not {samples_per_shard}")
    if buffer < 1:
        raise DataToolsError(f"--buffer must be >= 1, not {buffer}")
    if not inputs:
        raise DataToolsError("no input shards")
    prepare_out(out, inputs, force)
    counts = Counts()
    order = list(inputs)
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    samples = checked((s for path in order for s in read_shard(path, counts)), counts, full_decode)
    if seed is not None:
        samples = shuffled(samples, buffer, rng)
    with ShardSink(out, samples_per_shard) as sink:
        for sample in samples:
            sink.write(sample)
    return write_shard_manifest(out, sink.names, failures=counts.failures, extra={
        "source": source or [str(p) for p in inputs],
        "input_shards": len(inputs),
        "samples_per_shard": samples_per_shard,
        "shuffle": None if seed is None else {"seed": seed, "buffer": buffer},
        "dropped_members": dict(sorted(counts.dropped_members.items())),
        "damaged_inputs": counts.damaged,
    })


def summary(manifest: dict, out: Path) -> str:
    lines = [f"{manifest['total_samples']} samples from {manifest['input_shards']} shards into "
             f"{len(manifest['shards'])} shards ({manifest['total_bytes'] / 1e6:.1f} MB) in {out}"]
    if manifest["failures"]:
        lines.append("samples dropped: " + ", ".join(f"{k} {v}" for k, v in manifest["failures"].items()))
    if any(manifest["dropped_members"].values()):
        lines.append("members dropped: " + ", ".join(f"{k} {v}" for k, v in manifest["dropped_members"].items()))
    if damaged := manifest["damaged_inputs"]:
        lines.append(f"damaged input shards: {len(damaged)}, e.g. {damaged[0]['path']} (all in the manifest)")
    lines.append(f"manifest: {out / MANIFEST}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.shuffle and (args.seed is not None or args.buffer is not None):
        raise DataToolsError("--seed and --buffer need --shuffle")
    seed = (args.seed or 0) if args.shuffle else None
    manifest = reshard(expand_shards(args.shards), args.out, args.samples_per_shard, seed,
                       args.buffer or 10000, args.full_decode, args.force, source=args.shards)
    print(summary(manifest, Path(args.out)), flush=True)
    return 1 if manifest["damaged_inputs"] else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reshard", help="rewrite WebDataset shards with N samples each (merge, split, mix)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", metavar="SHARDS", help="directory of *.tar, or a brace pattern: dir/{00000..00009}.tar")
    p.add_argument("--out", required=True, help="output directory (must not hold the input)")
    p.add_argument("--samples-per-shard", type=int, required=True, metavar="N", help="the last shard holds the rest")
    p.add_argument("--shuffle", action="store_true", help="mix: shuffled shard order and a shuffle buffer")
    p.add_argument("--seed", type=int, help="shuffle seed (default 0)")
    p.add_argument("--buffer", type=int, metavar="B", help="shuffle buffer in samples (default 10000)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every image at full size, not only verify it (slower)")
    p.add_argument("--force", action="store_true", help="replace the shards already in --out")
    p.set_defaults(func=run)
