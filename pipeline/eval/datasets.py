"""Local labelled datasets for evaluation (no downloads at eval time).

Supported layout: a torchvision ImageFolder tree (ROOT/<class>/*.jpg). Class names and prompt templates come
from clip_benchmark-style files beside it when present: classnames.txt (one per line, in sorted-folder order)
and zeroshot_classification_templates.txt (or templates.txt), one template per line with `{c}` for the class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
