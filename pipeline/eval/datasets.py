"""Local labelled datasets for evaluation, read from disk (nothing is downloaded at eval time).

`load`: one ImageFolder tree (ROOT/<class>/*.jpg), the `zeroshot` command's and training's evaluation set. Class
names and prompt templates come from clip_benchmark-style files beside it when present: classnames.txt (one per
line, in sorted-folder order) and zeroshot_classification_templates.txt (or templates.txt), one template per line
with `{c}` for the class.

`open_split`: one split ("test" or "train") of a suite dataset's folder (pipeline/eval/suite.py), in the first of
these layouts that the folder holds:
- clip_benchmark's WebDataset: SPLIT/nshards.txt and SPLIT/0.tar.. (or SPLIT/*.tar), samples {key}.jpg|png|webp
  with {key}.cls (an integer) or, for multi-label sets, {key}.npy (a 0/1 vector); classnames.txt and
  zeroshot_classification_templates.txt beside SPLIT/;
- an ImageFolder tree: SPLIT/<class>/*.jpg;
- video frames: SPLIT/<class>/<clip>/*.jpg, one folder of extracted frames per clip, of which the middle frame is
  used (the CLIP paper's protocol for UCF101 and Kinetics-700). Video files are not decoded here: extract their
  frames first (e.g. `ffmpeg -i clip.mp4 clip/%05d.jpg`);
- the original release as torchvision reads it (`download=False`): the folder is the `root` of the dataset's
  torchvision class (Food101, CIFAR10, ..., ImageNet); its `.classes` are the names.
Every item is (image tensor, target, readable): an unreadable image is not an error but a skipped, counted sample
(`collate` drops it), so one bad file costs one sample, not the dataset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

DEFAULT_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.")
TEMPLATE_FILES = ("zeroshot_classification_templates.txt", "templates.txt")


@dataclass
class LabelledDataset:
    name: str
    dataset: object  # a torch Dataset of (image tensor, label)
    classnames: list[str]
    templates: list[str]


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def check(root: str | Path) -> list[str]:
    """What `load` would refuse, found without listing every image (a run checks its evaluation set at start):
    a directory of class folders, each holding at least one image, and a classnames.txt of as many lines.
    Returns the class folders; the errors say what is wrong, without the path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError("dataset directory not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError("not an ImageFolder tree (no class folders)")
    for c in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / c).iterdir() if f.is_file()):
            raise ValueError(f"not an ImageFolder tree (class folder {c} holds no image)")
    names_file = root / "classnames.txt"
    if names_file.is_file() and len(_lines(names_file)) != len(classes):
        raise ValueError(f"classnames.txt has {len(_lines(names_file))} names for {len(classes)} class folders")
    return classes


def load(root: str | Path, transform: Callable) -> LabelledDataset:
    root = Path(root)
    try:
        check(root)
        dataset = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{root}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{root}: {e}") from None
    names_file = root / "classnames.txt"
    classnames = _lines(names_file) if names_file.is_file() else [c.replace("_", " ") for c in dataset.classes]
    template_file = next((root / f for f in TEMPLATE_FILES if (root / f).is_file()), None)
    templates = _lines(template_file) if template_file else list(DEFAULT_TEMPLATES)
    return LabelledDataset(root.name, dataset, classnames, templates)


def check_names(roots: list[str | Path]) -> None:
    """Results are filed by dataset name (its folder's): two datasets of one name would overwrite each other."""
    seen: dict[str, str] = {}
    for root in roots:
        name = Path(root).name
        if name in seen and seen[name] != str(root):
            raise ValueError(f"two datasets named {name!r} ({seen[name]}, {root}): results are filed by name")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: dataset directory not found")
        seen[name] = str(root)


log = logging.getLogger("pipeline")


class Unavailable(Exception):
    """A dataset split that is absent or malformed; the message says where and why, in one line."""


@dataclass
class Split:
    dataset: torch.utils.data.Dataset  # (image tensor, target, readable); target an int or a (K,) int64 vector
    layout: str  # "webdataset", "imagefolder", "frames", "torchvision:Food101", ...
    size: int  # samples on disk, readable or not
    classnames: list[str] | None = None  # the layout's own (classnames.txt, torchvision's .classes, folders)
    names_source: str = ""
    templates: list[str] | None = None  # the layout's own templates file
    canonical_order: bool = True  # labels follow the dataset's own class order (False: sorted folder names)


def collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(images, targets, skipped) of a batch of (image, target, readable) items; images None when none was."""
    good = [(image, target) for image, target, readable in batch if readable]
    if not good:
        return None, None, len(batch)
    images = torch.stack([g[0] for g in good])
    targets = torch.as_tensor(np.stack([np.asarray(g[1], dtype=np.int64) for g in good]))
    return images, targets, len(batch) - len(good)


def _safe(transform: Callable, load: Callable, target, where: str):
    try:
        return transform(load()), target, True
    except Exception as e:  # a corrupt or truncated image: counted by collate, named in the log
        log.warning("skipping %s: %r", where, e)
        return torch.zeros(0), target, False


class _WebDataset(IterableDataset):
    """clip_benchmark's WebDataset split, shards split between loader workers; in each shard, tar order."""

    def __init__(self, urls: list[str], transform: Callable, multilabel: bool):
        self.urls, self.transform, self.multilabel = urls, transform, multilabel

    def __iter__(self):
        import io

        from pipeline.data import IMAGE_KEYS, decode_image
        from pipeline.shards import IndexedShard

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for url in self.urls[worker::workers]:
            shard = IndexedShard(url, perm_seed=0)
            shard.order = np.sort(shard.order)  # tar order: the same for every reader
            if shard.error is not None:
                log.warning("%s: damaged (%r), its readable samples are used", url, shard.error)
            while not shard.done():
                raw = shard.next()
                where = f"sample {raw.get('__key__')} of {url}"
                image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
                label = raw.get("npy" if self.multilabel else "cls")
                if image is None or label is None:
                    log.warning("skipping %s: no image or no %s", where, "npy" if self.multilabel else "cls")
                    yield torch.zeros(0), np.zeros(0, np.int64) if self.multilabel else -1, False
                    continue
                target = np.load(io.BytesIO(label)).astype(np.int64) if self.multilabel else int(label)
                yield _safe(self.transform, lambda: decode_image(image), target, where)
            shard.close()


class _Files(torch.utils.data.Dataset):
    """(path, target) pairs; each image decoded when read."""

    def __init__(self, items: list[tuple[Path, int]], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, target = self.items[i]
        return _safe(self.transform, lambda: Image.open(path).convert("RGB"), target, str(path))


class _Torchvision(torch.utils.data.Dataset):
    def __init__(self, dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, target = self.dataset[i]
        except Exception as e:
            log.warning("skipping sample %d of %s: %r", i, type(self.dataset).__name__, e)
            return torch.zeros(0), -1, False
        return _safe(self.transform, lambda: image.convert("RGB"), target, f"sample {i}")


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)


def _webdataset(root: Path, split: str, transform: Callable, multilabel: bool) -> Split | None:
    folder = root / split
    counted = folder / "nshards.txt"
    if counted.is_file():
        try:
            n = int(counted.read_text().strip())
        except ValueError:
            raise Unavailable(f"{counted}: not a number of shards") from None
        urls = [str(folder / f"{i}.tar") for i in range(n)]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise Unavailable(f"{missing[0]}: missing ({len(missing)} of the {n} shards nshards.txt names)")
    else:
        urls = sorted(str(p) for p in folder.glob("*.tar")) if folder.is_dir() else []
        if not urls:
            return None
    from pipeline.shards import IndexedShard

    size = 0
    for url in urls:
        shard = IndexedShard(url, perm_seed=0)
        size += len(shard)
        shard.close()
    names = root / "classnames.txt"
    templates = root / "zeroshot_classification_templates.txt"
    return Split(_WebDataset(urls, transform, multilabel), "webdataset", size,
                 _lines(names) if names.is_file() else None, str(names) if names.is_file() else "",
                 _lines(templates) if templates.is_file() else None)


def _folders(root: Path, split: str, transform: Callable) -> Split | None:
    """An ImageFolder tree, or a tree of per-clip frame folders (middle frame)."""
    folder = root / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        return None
    items, layout = [], "imagefolder"
    for label, c in enumerate(classes):
        clips = sorted(p for p in (folder / c).iterdir() if p.is_dir())
        if clips:
            layout = "frames"
            for clip in clips:
                frames = _images(clip)
                if frames:
                    items.append((frames[(len(frames) - 1) // 2], label))
                else:
                    log.warning("skipping %s: a clip folder without frames", clip)
        items += [(f, label) for f in _images(folder / c)]
    if not items:
        raise Unavailable(f"{folder}: class folders without images")
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names, source = _lines(names_file), str(names_file)
        if len(names) != len(classes):
            raise Unavailable(f"{names_file}: {len(names)} names for {len(classes)} class folders in {folder}")
    else:
        names, source = [c.replace("_", " ") for c in classes], f"class folders of {folder}"
    templates = next((root / f for f in TEMPLATE_FILES if (root / f).is_file()), None)
    return Split(_Files(items, transform), layout, len(items), names, source,
                 _lines(templates) if templates else None, canonical_order=names_file.is_file())


def _torchvision(root: Path, split: str, transform: Callable, spec) -> Split | None:
    kwargs = dict(dict(spec.splits).get(split, ()))
    if not spec.torchvision or not root.is_dir() or not (split in dict(spec.splits)):
        return None
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision)
    try:
        dataset = cls(str(root), download=False, **kwargs) if "download" in cls.__init__.__code__.co_varnames \
            else cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError, ValueError, ImportError) as e:
        said = (str(e).splitlines() or [type(e).__name__])[0].split(". You can use download=True")[0]
        raise Unavailable(f"{root}: not a torchvision {spec.torchvision} root with a {split!r} split "
                          f"(torchvision: {said})") from None
    classes = getattr(dataset, "classes", None)
    names = [(c if isinstance(c, str) else c[0]).replace("_", " ") for c in classes] if classes else None
    return Split(_Torchvision(dataset, transform), f"torchvision:{spec.torchvision}", len(dataset), names,
                 f"torchvision {spec.torchvision}.classes" if names else "")


def open_split(spec, root: str | Path, split: str, transform: Callable) -> Split:
    """The `split` of the suite dataset `spec` (pipeline/eval/suite.py) in its folder `root`, in the first layout
    found there; Unavailable (absent, malformed) otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise Unavailable(f"{root}: not found")
    found = _webdataset(root, split, transform, spec.multilabel)
    if found is None and not spec.multilabel:
        found = _folders(root, split, transform)
    if found is None:
        found = _torchvision(root, split, transform, spec)
    if found is None:
        raise Unavailable(f"{root}: no {split!r} split in a known layout (clip_benchmark WebDataset {split}/*.tar, "
                          f"ImageFolder {split}/<class>/, frames {split}/<class>/<clip>/"
                          + (f", torchvision {spec.torchvision} root" if spec.torchvision else "") + ")")
    if found.size == 0:
        raise Unavailable(f"{root}: the {split!r} split ({found.layout}) holds no samples")
    return found
