"""A labelled image folder -> WebDataset shards for supervised training (ViT reads `.cls`) and zero-shot captions.

Input: an ImageFolder tree (ROOT/<class>/**/*.jpg|png|...), listed exactly as torchvision's ImageFolder lists it
(classes: the sorted folder names; files: its extensions, case-insensitive, walked in sorted order), so label i
means the same class here and in an ImageFolder of the same tree; or a CSV of path and class-name columns (paths
relative to ROOT when given, else to the CSV's directory; classes: the sorted distinct names, in row order).

Each image becomes a sample keyed by its position in that listing (9 digits, so a key names its file):
  KEY.jpg   the file's own bytes when it is an upright JPEG and no --image-size is asked (no second lossy
            encoding); otherwise decoded, turned upright (EXIF), converted to 8-bit RGB, the shorter side resized
            to --image-size if given, and encoded as JPEG quality 95
  KEY.cls   class index as ASCII digits
  KEY.txt   class name, the caption a CLIP-style zero-shot setup starts from
  KEY.json  {"path", "label", "class"}
OUT also gets classnames.txt (one name per line, in index order) and manifest.json. Every image is fully decoded
once: a file that does not decode is skipped and counted (failures: decode_error, missing_file, ...), never
fatal. Samples are written in listing order, i.e. grouped by class: the training loader mixes only a few shards at
a time, so training shards should be written with --shuffle (a seeded permutation of the listing).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import random
from collections import Counter
from pathlib import Path

from data_tools import DataToolsError
from data_tools.manifest import MANIFEST, write_shard_manifest
from data_tools.reshard import ShardSink, prepare_out

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
CLASSNAMES = "classnames.txt"
_ORIENTATION = 0x0112  # EXIF tag


def image_folder(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(classes, [(path relative to root, class)]) in torchvision ImageFolder's order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataToolsError(f"{root}: no class folders (ImageFolder layout: ROOT/<class>/<image>)")
    items = []
    for name in classes:
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            items += [(os.path.relpath(os.path.join(folder, f), root), name)
                      for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not items:
        raise DataToolsError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its {len(classes)} class folders")
    return classes, items


def labelled_csv(path: Path, path_col: str, label_col: str) -> tuple[list[str], list[tuple[str, str]], Counter]:
    """(classes, [(path, class)], rows without a path or class) from a CSV with a header line."""
    if not path.is_file():
        raise DataToolsError(f"--csv {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for col, flag in ((path_col, "--path-col"), (label_col, "--label-col")):
            if col not in (reader.fieldnames or ()):
                raise DataToolsError(f"--csv {path}: no column {col!r} ({flag}); columns: {reader.fieldnames}")
        rows = [(r[path_col] or "", r[label_col] or "") for r in reader]
    items = [(p.strip(), c.strip()) for p, c in rows if p.strip() and c.strip()]
    if not items:
        raise DataToolsError(f"--csv {path}: no row with both a path and a class")
    return sorted({c for _, c in items}), items, Counter(missing_field=len(rows) - len(items))


def _upright_rgb(img):
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits (PIL would clip)
        import numpy as np
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


def encode(path: str, image_size: int | None = None) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None) for one image file, or (None, failure reason). Module level: runs in worker processes."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing_file"
    except OSError:
        return None, "unreadable_file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes the pixels: a truncated or corrupt file fails here, not in training
            if img.format == "JPEG" and not image_size and img.getexif().get(_ORIENTATION, 1) == 1:
                return data, None
            img = _upright_rgb(img)
        if image_size:
            scale = image_size / min(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95)
        return out.getvalue(), None
    except Image.DecompressionBombError:  # PIL's limit, 2x Image.MAX_IMAGE_PIXELS
        return None, "image_too_large"
    except Exception:
        return None, "decode_error"


def from_folder(root: str | Path | None, out: str | Path, samples_per_shard: int = 1000, csv_path: str | None = None,
                path_col: str = "path", label_col: str = "label", image_size: int | None = None,
                seed: int | None = None, processes: int = 1, force: bool = False) -> dict:
    """Write the shards, classnames.txt and manifest.json of a labelled folder or CSV into OUT (module docstring);
    `seed` not None: samples in a seeded random order. Returns the manifest."""
    out = Path(out)
    if samples_per_shard < 1:
        raise DataToolsError(f"--samples-per-shard must be >= 1, not {samples_per_shard}")
    if image_size is not None and image_size < 1:
        raise DataToolsError(f"--image-size must be >= 1, not {image_size}")
    if processes < 1:
        raise DataToolsError(f"--processes must be >= 1, not {processes}")
    if root is not None and not Path(root).is_dir():
        raise DataToolsError(f"ROOT {root}: no such directory")
    failures = Counter()
    if csv_path:
        classes, items, failures = labelled_csv(Path(csv_path), path_col, label_col)
        base = Path(root) if root is not None else Path(csv_path).parent
        source = {"csv": str(csv_path), "root": str(base)}
    else:
        if root is None:
            raise DataToolsError("give ROOT (an ImageFolder tree) or --csv")
        base = Path(root)
        # shards written inside the tree would become a class folder of the next run
        if out.resolve().is_relative_to(base.resolve()):
            raise DataToolsError(f"--out {out} is inside ROOT {root}: write the shards elsewhere")
        classes, items = image_folder(base)
        source = {"root": str(base)}
    index = {c: i for i, c in enumerate(classes)}
    listing = [(f"{i:09d}", path, name) for i, (path, name) in enumerate(items)]  # key: position in the listing
    if seed is not None:
        random.Random(seed).shuffle(listing)
    prepare_out(out, (), force)

    paths = [str(base / path) for _, path, _ in listing]
    convert = functools.partial(encode, image_size=image_size)
    with ShardSink(out, samples_per_shard) as sink:
        if processes > 1:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(processes) as pool:  # no fork of a threaded parent
                _write(sink, listing, pool.imap(convert, paths, chunksize=16), index, failures)
        else:
            _write(sink, listing, map(convert, paths), index, failures)
    tmp = out / (CLASSNAMES + ".tmp")
    tmp.write_text("".join(f"{c}\n" for c in classes))
    os.replace(tmp, out / CLASSNAMES)
    listed = {name for _, name in items}
    return write_shard_manifest(out, sink.names, failures=failures, extra={
        "source": source,
        "classes": classes,
        "empty_classes": [c for c in classes if c not in listed],
        "samples_per_shard": samples_per_shard,
        "image_size": image_size,
        "shuffle": None if seed is None else {"seed": seed},
    })


def _write(sink: ShardSink, listing: list[tuple[str, str, str]], results, index: dict[str, int],
           failures: Counter) -> None:
    """One sample per (key, path, class) of listing whose (jpg, failure) result has no failure."""
    for (key, path, name), (jpg, failure) in zip(listing, results):
        if failure:
            failures[failure] += 1
            continue
        meta = {"path": path, "label": index[name], "class": name}
        sink.write({"__key__": key, "jpg": jpg, "cls": str(index[name]).encode(), "txt": name.encode(),
                    "json": json.dumps(meta, ensure_ascii=False).encode()})


def summary(manifest: dict, out: Path) -> str:
    lines = [f"{manifest['total_samples']} images of {len(manifest['classes'])} classes into "
             f"{len(manifest['shards'])} shards ({manifest['total_bytes'] / 1e6:.1f} MB) in {out}"]
    if manifest["failures"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["failures"].items()))
    if manifest["empty_classes"]:
        lines.append(f"classes without images: {', '.join(manifest['empty_classes'][:10])}")
    lines.append(f"class names: {out / CLASSNAMES}; manifest: {out / MANIFEST}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.seed is not None and not args.shuffle:
        raise DataToolsError("--seed needs --shuffle")
    manifest = from_folder(args.root, args.out, args.samples_per_shard, args.csv, args.path_col, args.label_col,
                           args.image_size, (args.seed or 0) if args.shuffle else None, args.processes, args.force)
    print(summary(manifest, Path(args.out)), flush=True)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("from-folder", help="ImageFolder tree or labelled CSV -> WebDataset shards with .cls",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", nargs="?", help="ImageFolder tree (with --csv: the base of its paths)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    g = p.add_argument_group("labelled CSV instead of folders")
    g.add_argument("--csv", metavar="LABELS.csv", help="CSV with a header line: an image path and a class name per row")
    g.add_argument("--path-col", default="path")
    g.add_argument("--label-col", default="label", help="class names (sorted, they give the class indices)")
    g = p.add_argument_group("images and order")
    g.add_argument("--image-size", type=int, metavar="S", help="resize the shorter side to S (default: keep)")
    g.add_argument("--shuffle", action="store_true", help="write the samples in a seeded random order")
    g.add_argument("--seed", type=int, help="shuffle seed (default 0)")
    g.add_argument("--processes", type=int, default=1, help="decoding processes")
    g.add_argument("--force", action="store_true", help="replace the shards already in --out")
    p.set_defaults(func=run)
