"""Small local copies of suite datasets in every layout pipeline/eval/datasets.py reads, with generated images
(each class its own mean colour plus noise, so probes have something to learn) and the registry's real class names
and templates where packages ship them:

  eurosat        clip_benchmark WebDataset (train, test; nshards.txt), names and templates from clip-benchmark;
                 one corrupt image in test
  voc2007        clip_benchmark WebDataset, multi-label (.npy targets with -1 for difficult), classnames.txt
  food101        torchvision root (food-101/meta/{train,test}.json, images/), templates from clip-benchmark
  mnist          torchvision root (MNIST/raw idx files), names and templates from clip-benchmark
  pets           ImageFolder with classnames.txt (mean per-class recall)
  kinetics700    frames: one folder of frames per clip (middle frame), templates from the folder
  hateful_memes  ImageFolder without templates anywhere: zero-shot "not evaluated", probe evaluated
  cifar100       malformed: nshards.txt names 2 shards, 1 exists
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def _image(rng: np.random.Generator, label: int, classes: int) -> Image.Image:
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 151 + 160) % 256], np.float64)
    pixels = np.clip(hue + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _wds(folder: Path, samples: list[tuple[bytes, bytes, str]], shards: int = 1) -> None:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nshards.txt").write_text(f"{shards}\n")
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s}.tar")) as w:
            for i, (image, label, ext) in enumerate(samples[s::shards]):
                w.write({"__key__": f"s{s}_{i:05d}", "png": image, ext: label})


def _per_class(classes: int, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(c, _image(rng, c, classes)) for c in range(classes) for _ in range(per_class)]


def eurosat(root: Path) -> None:
    for split, n, seed in (("train", 6, 1), ("test", 3, 2)):
        samples = [(_bytes(img), str(c).encode(), "cls") for c, img in _per_class(10, n, seed)]
        if split == "test":
            samples[4] = (b"not an image", samples[4][1], "cls")
        _wds(root / "eurosat" / split, samples, shards=2)


VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
       "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def voc2007(root: Path) -> None:
    rng = np.random.default_rng(3)
    samples = []
    for i in range(30):
        target = (rng.random(20) < 0.15).astype(np.int64)
        target[i % 20] = 1
        target[(i + 7) % 20] = -1 if i % 3 == 0 else target[(i + 7) % 20]  # difficult
        buf = io.BytesIO()
        np.save(buf, target)
        samples.append((_bytes(_image(rng, i % 20, 20)), buf.getvalue(), "npy"))
    _wds(root / "voc2007" / "test", samples)
    (root / "voc2007" / "classnames.txt").write_text("\n".join(VOC) + "\n")


FOOD = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare"]


def food101(root: Path) -> None:
    base = root / "food101" / "food-101"
    rng = np.random.default_rng(4)
    meta = {"train": {c: [] for c in FOOD}, "test": {c: [] for c in FOOD}}
    for split, n in (("train", 4), ("test", 2)):
        for label, c in enumerate(FOOD):
            (base / "images" / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{split}{i}"
                _image(rng, label, 5).save(base / "images" / c / f"{name}.jpg")
                meta[split][c].append(f"{c}/{name}")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))
    (base / "meta" / "classes.txt").write_text("\n".join(FOOD) + "\n")


def _idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # unsigned bytes
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def mnist(root: Path) -> None:
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.stack([np.asarray(_image(rng, int(y), 10).convert("L").resize((28, 28))) for y in labels])
        _idx(raw / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def _folder(root: Path, name: str, classes: list[str], per_class: dict[str, int], seed: int,
            frames: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, c in enumerate(classes):
            d = root / name / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if frames:
                    clip = d / f"clip{i}"
                    clip.mkdir(exist_ok=True)
                    for f in range(frames):  # only the middle frame carries the class colour
                        img = _image(rng, label, len(classes)) if f == (frames - 1) // 2 else _image(rng, 99, 100)
                        img.save(clip / f"{f:05d}.jpg")
                else:
                    _image(rng, label, len(classes)).save(d / f"{i}.png")


def pets(root: Path) -> None:
    from pipeline.eval import suite

    names = suite.package_classnames(suite.BY_NAME["pets"])[0][:6]
    folders = [f"class_{i:02d}" for i in range(6)]
    _folder(root, "pets", folders, {"train": 4, "test": 2}, 6)
    (root / "pets" / "classnames.txt").write_text("\n".join(names) + "\n")


def kinetics700(root: Path) -> None:
    _folder(root, "kinetics700", ["abseiling", "air drumming", "archery", "arm wrestling", "baking cookies",
                                  "balloon blowing", "bandaging"], {"test": 2, "train": 3}, 7, frames=5)
    (root / "kinetics700" / "zeroshot_classification_templates.txt").write_text(
        "a photo of {c}.\na video frame of a person {c}.\n")


def hateful_memes(root: Path) -> None:
    _folder(root, "hateful_memes", ["not_hateful", "hateful"], {"train": 8, "test": 6}, 8)


def cifar100(root: Path) -> None:
    folder = root / "cifar100" / "test"
    _wds(folder, [(_bytes(img), str(c).encode(), "cls") for c, img in _per_class(3, 2, 9)])
    (folder / "nshards.txt").write_text("2\n")


BUILDERS = (eurosat, voc2007, food101, mnist, pets, kinetics700, hateful_memes, cifar100)


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for b in BUILDERS:
        b(root)
    return root
