"""Check a shard directory against its manifest.json before training on it (or after copying it somewhere).

Every shard the manifest lists is read once, start to end: its size and sha256 must match, the tar must be
complete (readable to its end-of-archive marker), its sample count (distinct keys) must match, and every image
member (jpg, jpeg, png, webp) must decode with PIL. Tars in the directory that the manifest does not list are
reported too: the `{00000..N}.tar` pattern a training config names would take them in.
Problem kinds: missing, unreadable, size, sha256, truncated, corrupt, samples, undecodable, unlisted (incomplete:
unlisted, and named in the manifest's incomplete_shards), manifest (its total_samples is not its shards' sum).
Exit status: 0 all is well, 1 problems found, 2 bad input (no manifest.json, not a directory).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_tools import DataToolsError
from data_tools.manifest import MANIFEST

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
UNDECODABLE_LISTED = 20  # per shard: a shard of garbage lists this many members, then a count of the rest
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close every tar that tarfile or GNU tar writes
READ_SIZE = 1 << 20


class _Hashing(io.RawIOBase):
    """A file read once: tarfile reads through it while it hashes and counts the bytes, so a shard costs one pass
    over the disk, not one for the sha256 and one for the tar."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass


def _decode_error(data: bytes) -> str | None:
    """Why PIL cannot decode these image bytes, or None when it can. The decoded pixels are dropped at once."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(e).__name__}: {e}"
    return None


def _end_marker_problem(path: Path, offset: int) -> tuple[str, str] | None:
    """tarfile ends its member loop quietly on a missing or broken header; only the end-of-archive marker where
    it stopped tells a complete tar from one cut at a member boundary or with a corrupt header."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(END_OF_ARCHIVE)
    if len(tail) < END_OF_ARCHIVE:
        return "truncated", f"ends at byte {offset + len(tail)} without the end-of-archive marker"
    if tail.count(0) != END_OF_ARCHIVE:
        return "corrupt", f"unreadable tar header at byte {offset}"
    return None


def check_shard(job: tuple[str, dict]) -> dict:
    """One shard against its manifest entry (runs in a pool worker): counts and a list of problems."""
    path, entry = Path(job[0]), job[1]
    name = entry["name"]
    result = {"name": name, "samples": 0, "images": 0, "undecodable": 0, "bytes": 0, "problems": []}

    def problem(kind: str, detail: str) -> None:
        result["problems"].append({"shard": name, "kind": kind, "detail": detail})

    if not path.is_file():
        problem("missing", f"listed in {MANIFEST} but not in the directory")
        return result
    keys, complete, member = set(), False, None
    try:
        with open(path, "rb") as raw:
            f = _Hashing(raw)
            try:
                # stream mode: members in file order, each image read once and dropped
                with tarfile.open(fileobj=f, mode="r|", bufsize=READ_SIZE) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key = member.name.split(".", 1)[0]
                        keys.add(key)
                        if member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                            result["images"] += 1
                            if error := _decode_error(tar.extractfile(member).read()):
                                result["undecodable"] += 1
                                if result["undecodable"] <= UNDECODABLE_LISTED:
                                    problem("undecodable", f"{key}: {member.name}: {error}")
                    end = tar.offset
                complete = True
            except (tarfile.TarError, EOFError) as e:
                where = f"after {len(keys)} samples" + (f" (last member {member.name})" if member else "")
                eof = "unexpected end" in str(e) or "empty file" in str(e) or "truncated" in str(e)
                problem("truncated" if eof else "corrupt", f"{e} {where}")
            f.drain()
    except OSError as e:
        problem("unreadable", e.strerror or str(e))
        return result
    result["bytes"], result["samples"] = f.bytes, len(keys)
    if complete and (marker := _end_marker_problem(path, end)):
        problem(marker[0], f"{marker[1]} after {len(keys)} samples")
        complete = False
    if result["undecodable"] > UNDECODABLE_LISTED:
        problem("undecodable", f"and {result['undecodable'] - UNDECODABLE_LISTED} more undecodable images")
    # a cut or corrupt tar already says why its count is short
    if complete and len(keys) != entry["samples"]:
        problem("samples", f"{len(keys)} samples in the tar, {entry['samples']} in {MANIFEST}")
    if f.bytes != entry["bytes"]:
        problem("size", f"{f.bytes} bytes, {entry['bytes']} in {MANIFEST}")
    elif f.sha.hexdigest() != entry["sha256"]:  # same size, other bytes
        problem("sha256", f"{f.sha.hexdigest()}, {entry['sha256']} in {MANIFEST}")
    result["problems"].sort(key=lambda p: p["kind"] == "undecodable")  # whole-shard problems first
    return result


def read_manifest(shard_dir: str | Path) -> dict:
    """SHARDS/manifest.json, refused in one line when it is not there or not a manifest."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise DataToolsError(f"{shard_dir}: not a directory")
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise DataToolsError(f"{path}: no such file (the manifest `python -m data_tools download` writes)")
    try:
        manifest = json.loads(path.read_text())
        for s in manifest["shards"]:
            s["name"], s["samples"], s["bytes"], s["sha256"]  # noqa: B018 - the keys every entry needs
    except (ValueError, KeyError, TypeError) as e:
        raise DataToolsError(f"{path}: not a shard manifest ({type(e).__name__}: {e})") from None
    return manifest


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def verify(shard_dir: str | Path, workers: int | None = None) -> dict:
    """Read every shard of shard_dir's manifest (workers processes, one shard each at a time) and return a report:
    counts and `problems`, a list of {shard, kind, detail}; `ok` is True when the list is empty."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataToolsError(f"--workers must be at least 1, not {workers}")
    listed = manifest["shards"]
    report = {"shard_dir": str(shard_dir), "shards": len(listed), "shards_ok": 0, "samples": 0,
              "manifest_samples": manifest.get("total_samples"), "images": 0, "undecodable": 0, "bytes": 0,
              "problems": []}
    jobs = ((str(shard_dir / s["name"]), s) for s in listed)
    from tqdm import tqdm  # on a terminal only (disable=None): 10^5 shards take a while

    with Pool(min(workers, max(len(listed), 1))) if workers > 1 else _InProcess() as pool, \
            tqdm(total=len(listed), unit="shard", desc="verify", disable=None, dynamic_ncols=True) as bar:
        # imap streams: per-shard results are small and arrive in manifest order; no worker holds more than the
        # image it is decoding
        for result in pool.imap(check_shard, jobs):
            for k in ("samples", "images", "undecodable", "bytes"):
                report[k] += result[k]
            report["shards_ok"] += not result["problems"]
            report["problems"] += result["problems"]
            bar.update()
    names, incomplete = {s["name"] for s in listed}, set(manifest.get("incomplete_shards", ()))
    for p in sorted(shard_dir.glob("*.tar")):
        if p.name in incomplete:  # a download's manifest names the tars img2dataset gave up on
            report["problems"].append({"shard": p.name, "kind": "incomplete", "detail": "img2dataset gave up on "
                                       "this shard; rerun the same download command to finish it"})
        elif p.name not in names:
            report["problems"].append({"shard": p.name, "kind": "unlisted",
                                       "detail": f"{p.stat().st_size} bytes, not in {MANIFEST}"})
    if report["manifest_samples"] is not None and report["manifest_samples"] != sum(s["samples"] for s in listed):
        report["problems"].append({"shard": MANIFEST, "kind": "manifest", "detail": f"total_samples "
                                   f"{report['manifest_samples']}, its shards add up to "
                                   f"{sum(s['samples'] for s in listed)}"})
    report["ok"] = not report["problems"]
    return report


class _InProcess:
    """Pool stand-in for --workers 1: no processes to start (and a debugger sees the work)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    imap = staticmethod(map)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(report: dict) -> str:
    problem_shards = len({p["shard"] for p in report["problems"]})
    line = (f"{report['shard_dir']}: {report['shards_ok']}/{report['shards']} shards ok, {report['samples']} "
            f"samples, {report['images']} images ({report['bytes'] / 1e6:.1f} MB read): ")
    line += (f"{_n(len(report['problems']), 'problem')} in {_n(problem_shards, 'file')}" if report["problems"]
             else "all ok")
    return "\n".join([line] + [f"{p['shard']}: {p['kind']}: {p['detail']}" for p in report["problems"]])


def run(args: argparse.Namespace) -> int:
    report = verify(args.shards, args.workers)
    print(json.dumps(report, indent=1) if args.json else summary(report), flush=True)
    return 0 if report["ok"] else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check shards against manifest.json: sizes, sha256, tars, images",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", metavar="SHARDS", help="shard directory holding manifest.json")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes, one shard each at a time (default: min(8, CPUs))")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
