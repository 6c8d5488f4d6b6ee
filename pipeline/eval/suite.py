"""The CLIP paper's 27-dataset evaluation suite (Radford et al. 2021, appendix A, Table 9): what each dataset is
scored with, where its class names and prompt templates come from, and what OpenAI's ViT-L/14@336px scored.

Names and templates are never typed here. In order of preference:
- the dataset folder's own files (`classnames.txt`, `zeroshot_classification_templates.txt`, as clip_benchmark's
  WebDataset copies ship them);
- package data: clip-benchmark 1.6.2's `en_classnames.json` / `en_zeroshot_classification_templates.json`
  (templates for 23 of the 27, names for 12) and open_clip's ImageNet names and OpenAI's 80 ImageNet prompts;
- the dataset's own metadata on disk (torchvision's `.classes`, which reads Food-101's meta/classes.txt, CIFAR's
  batches.meta, ...; ImageFolder class folders).
A dataset without templates anywhere (Birdsnap, UCF101, Kinetics-700, Hateful Memes unless their folder holds a
templates file) is not evaluated zero-shot, and the report says why; its linear probe still runs.

Package names are used for layouts whose labels follow the dataset's canonical order (clip_benchmark's
WebDataset, torchvision's roots), never for an ImageFolder tree, whose labels follow its sorted folder names.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.eval import metrics

CLIP_BENCHMARK = "clip-benchmark 1.6.2"
REFERENCE = "OpenAI CLIP ViT-L/14@336px, zero-shot, CLIP paper Table 11"


@dataclass(frozen=True)
class Spec:
    name: str  # the folder under --data-root, and the result's name
    title: str
    metric: str  # a key of metrics.METRICS
    classes: int  # the paper's count (Table 9), for chance level when the data is absent
    package: str | None = None  # clip_benchmark's key for its names / templates
    torchvision: str | None = None  # torchvision.datasets class that reads the original release's root
    # keyword arguments of that class per split; a split the class cannot select is absent
    splits: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    video: bool = False  # scored on each clip's middle frame, as the paper does
    reference: float | None = None  # REFERENCE's score in [0, 1]

    @property
    def multilabel(self) -> bool:
        return self.metric == "voc11_map"

    def chance(self, classes: int | None = None) -> float:
        """The metric's value for a model that guesses: 1/K for accuracies, 0.5 for ROC-AUC, the mean of 1/K and
        5/K for Kinetics' metric; for VOC's mAP, roughly the rate of positives, unknown without the data."""
        k = classes or self.classes
        if self.metric == "roc_auc":
            return 0.5
        if self.metric == "top1_top5_mean":
            return (1 / k + min(5, k) / k) / 2
        if self.metric == "voc11_map":
            return float("nan")
        return 1 / k


def _split(test: dict, train: dict) -> tuple:
    return (("test", tuple(test.items())), ("train", tuple(train.items())))


_BOOL = _split({"train": False}, {"train": True})
_TEST_TRAIN = _split({"split": "test"}, {"split": "train"})

# In the paper's order (Table 9). References: Table 11, ViT-L/14@336px row.
SUITE: tuple[Spec, ...] = (
    Spec("food101", "Food-101", "accuracy", 101, "food101", "Food101", _TEST_TRAIN, reference=0.938),
    Spec("cifar10", "CIFAR-10", "accuracy", 10, "cifar10", "CIFAR10", _BOOL, reference=0.957),
    Spec("cifar100", "CIFAR-100", "accuracy", 100, "cifar100", "CIFAR100", _BOOL, reference=0.775),
    Spec("birdsnap", "Birdsnap", "accuracy", 500, reference=0.495),
    Spec("sun397", "SUN397", "accuracy", 397, "sun397", reference=0.684),
    Spec("cars", "Stanford Cars", "accuracy", 196, "cars", "StanfordCars", _TEST_TRAIN, reference=0.788),
    Spec("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall", 100, "fgvc_aircraft", "FGVCAircraft",
         _split({"split": "test"}, {"split": "trainval"}), reference=0.372),
    Spec("voc2007", "Pascal VOC 2007", "voc11_map", 20, "voc2007_multilabel", reference=0.843),
    Spec("dtd", "DTD", "accuracy", 47, "dtd", "DTD", _TEST_TRAIN, reference=0.557),
    Spec("pets", "Oxford-IIIT Pets", "mean_per_class_recall", 37, "pets", "OxfordIIITPet",
         _split({"split": "test"}, {"split": "trainval"}), reference=0.935),
    Spec("caltech101", "Caltech-101", "mean_per_class_recall", 102, "caltech101", reference=0.928),
    Spec("flowers", "Oxford Flowers-102", "mean_per_class_recall", 102, "flowers", "Flowers102", _TEST_TRAIN,
         reference=0.783),
    Spec("mnist", "MNIST", "accuracy", 10, "mnist", "MNIST", _BOOL, reference=0.883),
    Spec("fer2013", "FER2013", "accuracy", 7, "fer2013", "FER2013", _TEST_TRAIN, reference=0.577),
    Spec("stl10", "STL-10", "accuracy", 10, "stl10", "STL10", _TEST_TRAIN, reference=0.994),
    Spec("eurosat", "EuroSAT", "accuracy", 10, "eurosat", reference=0.596),
    Spec("resisc45", "RESISC45", "accuracy", 45, "resisc45", reference=0.717),
    Spec("gtsrb", "GTSRB", "accuracy", 43, "gtsrb", "GTSRB", _TEST_TRAIN, reference=0.523),
    Spec("kitti_distance", "KITTI distance", "accuracy", 4, "kitti_closest_vehicle_distance", reference=0.219),
    Spec("country211", "Country211", "accuracy", 211, "country211", "Country211", _TEST_TRAIN, reference=0.349),
    Spec("pcam", "PatchCamelyon", "accuracy", 2, "pcam", "PCAM", _TEST_TRAIN, reference=0.630),
    Spec("ucf101", "UCF101", "accuracy", 101, video=True, reference=0.769),
    Spec("kinetics700", "Kinetics-700", "top1_top5_mean", 700, video=True, reference=0.613),
    Spec("clevr_count", "CLEVR counts", "accuracy", 8, "clevr_count_all", reference=0.248),
    Spec("hateful_memes", "Hateful Memes", "roc_auc", 2, reference=0.633),
    Spec("renderedsst2", "Rendered SST2", "accuracy", 2, "renderedsst2", "RenderedSST2", _TEST_TRAIN,
         reference=0.679),
    Spec("imagenet1k", "ImageNet", "accuracy", 1000, "imagenet1k", "ImageNet",
         _split({"split": "val"}, {"split": "train"}), reference=0.762),
)
BY_NAME: dict[str, Spec] = {s.name: s for s in SUITE}
assert len(SUITE) == 27 and all(s.metric in metrics.METRICS for s in SUITE)


def get(names: str | list[str] | None) -> list[Spec]:
    """Specs by name (a list or a comma-separated string; None or "all": the whole suite), in the suite's order."""
    if names is None or names == "all":
        return list(SUITE)
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ValueError(f"--datasets {','.join(unknown)}: not in the suite (known: {', '.join(BY_NAME)})")
    return [s for s in SUITE if s.name in wanted]


@functools.cache
def _package(kind: str) -> dict[str, list[str]]:
    """clip-benchmark's English class names ("classnames") or templates ("zeroshot_classification_templates")."""
    path = importlib.resources.files("clip_benchmark.datasets") / f"en_{kind}.json"
    return json.loads(path.read_text())


def package_classnames(spec: Spec) -> tuple[list[str], str] | None:
    """(names, where from) from package data, in the dataset's canonical label order, or None."""
    if spec.name == "imagenet1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), "open_clip 3.3.0 (IMAGENET_CLASSNAMES)"
    names = _package("classnames").get(spec.package or "")
    return (list(names), f"{CLIP_BENCHMARK} en_classnames.json[{spec.package}]") if names else None


def package_templates(spec: Spec) -> tuple[list[str], str] | None:
    """(templates with {c}, where from), or None when no package ships any for this dataset."""
    if spec.name == "imagenet1k":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES], "open_clip 3.3.0 (OPENAI_IMAGENET_TEMPLATES)"
    templates = _package("zeroshot_classification_templates").get(spec.package or "")
    if not templates:
        return None
    return list(templates), f"{CLIP_BENCHMARK} en_zeroshot_classification_templates.json[{spec.package}]"


def data_path(root: str | Path, spec: Spec) -> Path:
    return Path(root) / spec.name
