"""SHARDS/manifest.json: every tar with sample count, size and sha256, and every input row's fate.

Built from img2dataset's own per-shard records: `{shard}_stats.json` holds count, successes and `status_dict`,
a counter of "success" and the raw error message of each failed row (str() of the exception: "HTTP Error 404:
File not found", "timed out", "Image decoding error", ...). Raw messages are kept and also mapped to short reasons.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Mapping

from data_tools import DataToolsError

MANIFEST = "manifest.json"
RAW_MESSAGES_KEPT = 200  # some messages carry byte counts or hosts; keep the manifest small on web-scale lists

_REASONS = (  # first match wins
    (r"^HTTP Error 5\d\d", "http_5xx"),
    (r"^HTTP Error 3\d\d", "redirect_loop"),  # urllib follows redirects; a 3xx error is a loop or too many
    (r"timed out", "timeout"),
    (r"Connection refused", "connection_refused"),
    (r"Connection reset", "connection_reset"),
    (r"Remote end closed connection", "connection_closed"),
    (r"IncompleteRead", "truncated"),  # body shorter than Content-Length
    (r"Name or service not known|nodename nor servname|name resolution|No address associated", "dns_error"),
    (r"SSL|CERTIFICATE", "ssl_error"),
    (r"unknown url type|no host given", "invalid_url"),
    # img2dataset cannot tell an HTML page served as .jpg from a corrupt image: both fail cv2.imdecode
    (r"Image decoding error", "decode_error"),
    (r"image too small", "image_too_small"),
    (r"image area too large", "image_too_large"),
    (r"JPEG cut short", "image_truncated"),  # data_tools/img2dataset_hooks.py
    (r"aspect ratio too large", "bad_aspect_ratio"),
    (r"X-Robots-Tag", "disallowed"),
    (r"hash mismatch", "hash_mismatch"),
)


def failure_reason(message: str) -> str:
    """Short key for one of img2dataset's raw error messages (http_404, timeout, decode_error, ...)."""
    if m := re.match(r"HTTP Error (4\d\d)", message):
        return f"http_{m.group(1)}"
    return next((reason for pattern, reason in _REASONS if re.search(pattern, message)), "other")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tar_samples(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})


def build_manifest(shard_dir: str | Path, skipped: Mapping[str, int] | None = None) -> dict:
    """Manifest of an img2dataset webdataset directory; `skipped` counts rows filtered out before img2dataset."""
    shard_dir = Path(shard_dir)
    shards, raw, rows = [], Counter(), 0
    for stats_file in sorted(shard_dir.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        tar = shard_dir / stats_file.name.replace("_stats.json", ".tar")
        samples = _tar_samples(tar)
        if samples != stats["successes"]:
            raise DataToolsError(f"{tar}: {samples} samples in the tar but {stats['successes']} in {stats_file.name}")
        # Shards whose rows all failed stay listed with samples 0: the list then matches the files on disk and
        # the `{00000..N}.tar` brace pattern, and every row's shard is accounted for; readers skip empty tars.
        shards.append({"name": tar.name, "samples": samples, "bytes": tar.stat().st_size, "sha256": _sha256(tar)})
        rows += stats["count"]
        raw.update({msg: n for msg, n in stats["status_dict"].items() if msg != "success"})
    failures = Counter()
    for msg, n in raw.items():
        failures[failure_reason(msg)] += n
    failures.update(skipped or {})
    kept = dict(raw.most_common(RAW_MESSAGES_KEPT))
    if len(raw) > len(kept):
        kept["(other messages)"] = sum(raw.values()) - sum(kept.values())
    done = {s["name"] for s in shards}
    return {
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "failures": dict(sorted(failures.items())),
        "failures_raw": kept,
        "rows": rows + sum((skipped or {}).values()),
        # tars without stats: img2dataset gave up on the shard (it retries them on the next incremental run)
        "incomplete_shards": sorted(p.name for p in shard_dir.glob("*.tar") if p.name not in done),
    }


def write_manifest(shard_dir: str | Path, extra: Mapping | None = None,
                   skipped: Mapping[str, int] | None = None) -> dict:
    """build_manifest() plus `extra` keys, written atomically to SHARDS/manifest.json."""
    manifest = {**build_manifest(shard_dir, skipped), **(extra or {})}
    write_json(Path(shard_dir) / MANIFEST, manifest)
    return manifest


def write_json(path: Path, data: Mapping) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def shard_entry(path: str | Path) -> dict:
    """One shard's line in the manifest: name, samples, bytes, sha256 (read back from the file on disk)."""
    path = Path(path)
    return {"name": path.name, "samples": _tar_samples(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_shard_manifest(shard_dir: str | Path, names: list[str], extra: Mapping | None = None,
                         failures: Mapping[str, int] | None = None) -> dict:
    """Manifest of shards we wrote ourselves (no img2dataset stats files), with build_manifest()'s keys, written
    atomically to SHARDS/manifest.json. `failures` counts input samples not written, by reason; `rows` is then
    total_samples + their sum, the same invariant as a download's manifest."""
    shard_dir = Path(shard_dir)
    shards = [shard_entry(shard_dir / name) for name in names]
    failures = {k: n for k, n in sorted((failures or {}).items()) if n}
    total = sum(s["samples"] for s in shards)
    manifest = {
        "shards": shards,
        "total_samples": total,
        "total_bytes": sum(s["bytes"] for s in shards),
        "failures": failures,
        "failures_raw": {},
        "rows": total + sum(failures.values()),
        "incomplete_shards": [],  # every shard is written under a temporary name and renamed once complete
        **(extra or {}),
    }
    write_json(shard_dir / MANIFEST, manifest)
    return manifest
