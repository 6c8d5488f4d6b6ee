"""Running the suite (pipeline/eval/suite.py) on one model: zero-shot and linear probes, one dataset at a time.

`SuiteJob` is plain data so that submitit can pickle it for SLURM array tasks; called on a dataset name it loads
the model (or takes the one it is given), evaluates, and writes OUT/suite/NAME.json with the per-sample scores
beside it (NAME.zeroshot.npz, NAME.linear_probe.npz: `scores`, `targets`), so any metric can be recomputed
later. A result is filed with the identity of what was evaluated (a checkpoint directory, or open_clip weights):
a rerun for the same model skips what is done, and a dataset that was absent is tried again.

Linear probes cache the frozen features of each split in OUT/suite/features/NAME/{train,test}.npz.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.checkpoint import atomic_write_bytes, atomic_write_text
from pipeline.eval import datasets, metrics, suite
from pipeline.eval.checkpoints import default_device

log = logging.getLogger("pipeline")
EXAMPLES = 4  # images per dataset in the examples figure


@dataclass
class Subject:
    """What is evaluated: our checkpoint, or open_clip / OpenAI weights from a local file."""

    id: str  # results are filed under it: a checkpoint directory, or "open_clip:MODEL:PATH"
    step: int | None
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> the tensor features() and encode_image take
    features: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    zero_shot: tuple[torch.nn.Module, Callable] | None  # (model with encode_image/encode_text, tokenizer)


def check_pretrained(pretrained: str, model_name: str | None) -> None:
    """Refuse, in one line, open_clip weights that cannot be loaded as named."""
    import open_clip

    from pipeline.tasks import clip  # noqa: F401  (registers our model configs, CLIP-tiny among them)

    if not model_name:
        raise ValueError("--pretrained needs --model, the open_clip model name of the weights (e.g. ViT-B-32)")
    if model_name not in open_clip.list_models():
        raise ValueError(f"--model {model_name}: not an open_clip model config (e.g. ViT-B-32, ViT-L-14-336)")
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file")


def load_subject(checkpoint: str | None = None, pretrained: str | None = None, model_name: str | None = None,
                 device: str = "cpu") -> Subject:
    if pretrained:
        import open_clip

        check_pretrained(pretrained, model_name)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device=device)
        model.eval()
        return Subject(f"open_clip:{model_name}:{Path(pretrained).resolve()}", None, model, preprocess,
                       lambda x: {"image_embedding": model.encode_image(x)},
                       (model, open_clip.get_tokenizer(model_name)))
    from pipeline import checkpoint as ckpts
    from pipeline.eval.checkpoints import load_model

    cfg, task, model, ckpt = load_model(checkpoint, device)
    return Subject(str(ckpt), ckpts.read_state(ckpt)["step"], model, task.image_transform(train=False),
                   lambda x: task.features(model, x), task.zero_shot(model))


def class_names(spec: suite.Spec, split: datasets.Split) -> tuple[list[str] | None, str]:
    """(names, where from): the folder's classnames.txt, else package data (labels in the dataset's canonical
    order only), else the layout's metadata (torchvision's .classes, class folders)."""
    if split.classnames and split.names_source.endswith("classnames.txt"):
        return split.classnames, split.names_source
    package = suite.package_classnames(spec) if split.canonical_order else None
    if package:
        return package
    return split.classnames, split.names_source


def templates(spec: suite.Spec, split: datasets.Split) -> tuple[list[str] | None, str]:
    """(templates, where from): the folder's templates file, else package data."""
    if split.templates:
        return split.templates, f"{spec.name}/zeroshot_classification_templates.txt"
    return suite.package_templates(spec) or (None, "")


class TrainingSubset:
    """Zero-shot on a few suite datasets during training (CLIP's eval.suite), on rank 0: each dataset's split,
    names and templates are found once; the text classifier is rebuilt at every evaluation, as the text tower is
    training too. A dataset that cannot be read is named once in the log and left out."""

    def __init__(self, names: str, root: str, transform: Callable, tokenizer: Callable, max_images: int,
                 batch_size: int, workers: int):
        self.tokenizer, self.max_images, self.batch_size, self.workers = tokenizer, max_images, batch_size, workers
        self.sets = []
        for spec in suite.get(names):
            try:
                split = datasets.open_split(spec, suite.data_path(root, spec), "test", transform)
            except datasets.Unavailable as e:
                log.warning("eval.suite: %s left out: %s", spec.name, e)
                continue
            (names_, _), (templates_, _) = class_names(spec, split), templates(spec, split)
            if not names_ or not templates_:
                log.warning("eval.suite: %s left out: no %s", spec.name, "class names" if not names_ else "templates")
                continue
            dataset = split.dataset
            if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) > max_images > 0:
                # a fixed spread over the whole split: test sets are often sorted by class
                dataset = torch.utils.data.Subset(dataset, np.linspace(0, len(dataset) - 1, max_images).astype(int))
            self.sets.append((spec, dataset, names_, templates_))

    def evaluate(self, model, device, dtype) -> dict[str, tuple[str, float]]:
        from pipeline.eval import zeroshot

        out = {}
        for spec, dataset, names, prompts in self.sets:
            with torch.no_grad():
                text = zeroshot.classifier(model, self.tokenizer, names, prompts, device)
            loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                                 collate_fn=datasets.collate)
            s, y, _ = zeroshot.scores(model, text, _capped(loader, self.max_images), device, dtype)
            if len(y):
                out[spec.name] = (spec.metric, metrics.compute(spec.metric, s, y))
        return out


def _capped(batches, max_images: int):
    seen = 0
    for images, targets, skipped in batches:
        if max_images and seen >= max_images:
            return
        seen += skipped + (0 if images is None else len(images))
        yield images, targets, skipped


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _atomic_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _thumbnail(image):
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    return center_crop(resize(pil_to_tensor(image), 96, antialias=True), 96)


@dataclass
class SuiteJob:
    data_root: str
    out: str  # OUT: results go to OUT/suite/
    checkpoint: str | None = None  # one checkpoint directory (resolved before submission)
    pretrained: str | None = None  # or open_clip weights and their model name
    model_name: str | None = None
    zeroshot: bool = True
    linear_probe: bool = False
    batch_size: int = 256
    workers: int = 2
    device: str | None = None
    max_images: int = 0  # per split (0: all), for quick looks; results say it
    probe_backend: str = "auto"  # sklearn on CPU, torch on a GPU
    probe_max_iter: int = 1000
    progress: bool = False
    _subject: Subject | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        if self.pretrained:
            return f"open_clip:{self.model_name}:{Path(self.pretrained).resolve()}"
        return str(self.checkpoint)

    @property
    def results(self) -> Path:
        return Path(self.out) / "suite"

    def result_path(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def read(self, name: str) -> dict | None:
        path = self.result_path(name)
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        return result if result.get("model") == self.id else None

    def done(self, name: str) -> bool:
        r = self.read(name)
        if r is None or r["status"] != "evaluated":
            return False
        return all(mode in r for mode, wanted in (("zeroshot", self.zeroshot), ("linear_probe", self.linear_probe))
                   if wanted)

    def subject(self) -> Subject:
        if self._subject is None:
            self._subject = load_subject(self.checkpoint, self.pretrained, self.model_name,
                                         self.device or default_device())
        return self._subject

    def __getstate__(self):  # pickled for array tasks without the loaded model
        return {**self.__dict__, "_subject": None}

    def __call__(self, name: str) -> dict:
        spec = suite.BY_NAME[name]
        self.results.mkdir(parents=True, exist_ok=True)
        previous = self.read(name) or {}
        result = {"dataset": name, "title": spec.title, "metric": spec.metric, "model": self.id,
                  "max_images": self.max_images}
        root = suite.data_path(self.data_root, spec)
        try:
            if not root.is_dir():  # before loading the model: most of the 27 may be absent
                raise datasets.Unavailable(f"{root}: not found")
            subject = self.subject()
            result["step"] = subject.step
            test = datasets.open_split(spec, root, "test", subject.preprocess)
            result.update(status="evaluated", path=str(root), layout=test.layout)
            if self.zeroshot:
                result["zeroshot"] = previous.get("zeroshot") or self._zeroshot(spec, subject, test)
            if self.linear_probe:
                result["linear_probe"] = previous.get("linear_probe") or self._linear_probe(spec, subject, test)
        except datasets.Unavailable as e:
            result.update(status="not found", reason=str(e))
        except Exception as e:  # costs this dataset, not the others: the report names it, a rerun retries it
            if self._subject is None:
                raise  # the model itself cannot be loaded: no dataset can run
            log.exception("%s: evaluation failed", name)
            result.update(status="failed", reason=f"{type(e).__name__}: {e}")
        _atomic_json(self.result_path(name), result)
        return result

    # -- zero-shot -------------------------------------------------------------------------------------------

    def _batches(self, split: datasets.Split):
        dataset = split.dataset
        if self.max_images and not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset = torch.utils.data.Subset(dataset, range(min(self.max_images, len(dataset))))
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                             collate_fn=datasets.collate)
        return _capped(loader, self.max_images)

    def _progress(self, what: str, total: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        bar = tqdm(total=min(total, self.max_images or total), desc=what, unit="img", leave=False)
        return bar.update

    def _zeroshot(self, spec: suite.Spec, subject: Subject, test: datasets.Split) -> dict:
        if subject.zero_shot is None:
            return {"status": "not evaluated", "reason": "the model has no text tower"}
        names, names_from = class_names(spec, test)
        prompts, templates_from = templates(spec, test)
        if not names:
            return {"status": "not evaluated", "reason": f"no class names (none in {suite.CLIP_BENCHMARK} or {test.layout})"}
        if not prompts:
            return {"status": "not evaluated",
                    "reason": f"no prompt templates in {suite.CLIP_BENCHMARK} or open_clip, and no "
                              f"zeroshot_classification_templates.txt in {spec.name}/"}
        model, tokenizer = subject.zero_shot
        device = next(model.parameters()).device
        start = time.perf_counter()
        from pipeline.eval import zeroshot

        with torch.no_grad():
            text = zeroshot.classifier(model, tokenizer, names, prompts, device)
        s, y, skipped = zeroshot.scores(model, text, self._batches(test), device,
                                        progress=self._progress(f"{spec.name} zero-shot", test.size))
        if len(y) == 0:
            return {"status": "failed", "reason": f"no readable image in the test split ({skipped} skipped)"}
        bad = [] if spec.multilabel else sorted(set(y.tolist()) - set(range(len(names))))
        if bad:
            return {"status": "failed", "reason": f"labels {bad[:5]} outside the {len(names)} class names"}
        npz = self.results / f"{spec.name}.zeroshot.npz"
        _atomic_npz(npz, scores=s.numpy(), targets=y.numpy())
        value = metrics.compute(spec.metric, s, y)
        chance = spec.chance(len(names))
        if spec.multilabel:  # a random ranking's AP is about the rate of positives
            rated = y >= 0
            chance = float(np.mean([((y[:, c] == 1).sum() / rated[:, c].sum()).item()
                                    for c in range(y.shape[1]) if (y[:, c] == 1).any()]))
        out = {"status": "evaluated", "value": value, "n": len(y), "skipped": skipped, "classes": len(names),
               "chance": chance, "templates": len(prompts), "names_from": names_from,
               "templates_from": templates_from, "scores": npz.name, "seconds": time.perf_counter() - start}
        if not spec.multilabel:
            out.update(top1=metrics.top_k_accuracy(s, y, 1), top5=metrics.top_k_accuracy(s, y, min(5, len(names))))
            out["examples"] = self._examples(spec, subject, s, y, names)
        return out

    def _examples(self, spec, subject, s: torch.Tensor, y: torch.Tensor, names: list[str]) -> list[dict]:
        """The first EXAMPLES test images as thumbnails (OUT/suite/NAME.examples.npy) and their top-5 labels with
        probabilities (softmax of 100 x cosine, CLIP's logit scale), for the report's examples figure."""
        split = datasets.open_split(spec, suite.data_path(self.data_root, spec), "test", _thumbnail)
        # The evaluation's first batch is the split's first samples (a loader's worker 0 reads the first shard),
        # so reading them here in one process gives the same images as the first rows of the scores.
        items = split.dataset if isinstance(split.dataset, torch.utils.data.IterableDataset) else \
            (split.dataset[i] for i in range(len(split.dataset)))
        images = []
        for image, _, readable in items:
            if readable:
                images.append(image)
            if len(images) == min(EXAMPLES, len(s)):
                break
        images = torch.stack(images)
        buf = io.BytesIO()
        np.save(buf, images.numpy())
        atomic_write_bytes(self.results / f"{spec.name}.examples.npy", buf.getvalue())
        p = torch.softmax(100 * s[:len(images)].double(), dim=1)
        top = p.topk(min(5, p.shape[1]), dim=1)
        return [{"label": names[int(y[i])],
                 "top5": [[names[int(c)], float(v)] for v, c in zip(top.values[i], top.indices[i])]}
                for i in range(len(images))]

    # -- linear probe ----------------------------------------------------------------------------------------

    def _features(self, spec: suite.Spec, subject: Subject, split: datasets.Split, which: str):
        """{layer: (N, d)} float32 and targets of a split, from the cache when it is this model's."""
        cache = self.results / "features" / spec.name / f"{which}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                if str(z["model"]) == self.id and int(z["max_images"]) == self.max_images:
                    layers = [k for k in z.files if k.startswith("layer:")]
                    return {k[6:]: z[k] for k in layers}, z["targets"], int(z["skipped"])
        found, targets, skipped = {}, [], 0
        progress = self._progress(f"{spec.name} {which} features", split.size)
        with torch.no_grad():
            for images, y, bad in self._batches(split):
                skipped += bad
                if progress:
                    progress(bad + (0 if images is None else len(images)))
                if images is None:
                    continue
                device = next(subject.model.parameters()).device
                for name, f in subject.features(images.to(device)).items():
                    found.setdefault(name, []).append(f.float().cpu().numpy())
                targets.append(y.numpy())
        if not targets:
            raise datasets.Unavailable(f"{split.layout} {which} split of {spec.name}: no readable image")
        layers = {k: np.concatenate(v) for k, v in found.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_npz(cache, model=np.array(self.id), max_images=np.array(self.max_images),
                    skipped=np.array(skipped), targets=np.concatenate(targets),
                    **{f"layer:{k}": v for k, v in layers.items()})
        return layers, np.concatenate(targets), skipped

    def _linear_probe(self, spec: suite.Spec, subject: Subject, test: datasets.Split) -> dict:
        from pipeline.eval import linear_probe as lp

        if spec.multilabel:
            return {"status": "not evaluated", "reason": "multi-label targets: the probe is a multinomial regression"}
        try:
            train = datasets.open_split(spec, suite.data_path(self.data_root, spec), "train", subject.preprocess)
        except datasets.Unavailable as e:
            return {"status": "not evaluated", "reason": f"no train split: {e}"}
        start = time.perf_counter()
        train_x, train_y, train_skipped = self._features(spec, subject, train, "train")
        test_x, test_y, test_skipped = self._features(spec, subject, test, "test")
        backend = self.probe_backend
        if backend == "auto":
            backend = "torch" if (self.device or default_device()).startswith("cuda") else "sklearn"
        results = {name: lp.probe(train_x[name], train_y, test_x[name], test_y, backend=backend,
                                  max_iter=self.probe_max_iter, device=self.device) for name in train_x}
        layer = max(results, key=lambda k: results[k].val_accuracy)  # chosen on validation, never on test
        r = results[layer]
        # The probe's columns are the labels seen in training; a test label never seen there scores zero.
        classes = int(max(test_y.max(), train_y.max())) + 1
        scores = np.zeros((len(test_y), classes))
        scores[:, r.labels] = r.scores
        npz = self.results / f"{spec.name}.linear_probe.npz"
        _atomic_npz(npz, scores=scores, targets=test_y)
        return {"status": "evaluated", "value": metrics.compute(spec.metric, scores, test_y), "accuracy": r.accuracy,
                "layer": layer, "C": r.C, "val_accuracy": r.val_accuracy, "n_train": r.n_train, "n": r.n_test,
                "skipped": train_skipped + test_skipped, "backend": backend, "scores": npz.name,
                "chance": spec.chance(classes), "layers": {k: v.record() for k, v in results.items()},
                "seconds": time.perf_counter() - start}

    # -- the report ------------------------------------------------------------------------------------------

    def gather(self, names: list[str]) -> dict:
        """The report over `names` from their result files (pipeline/eval/report.py); OUT/suite.json and the rest."""
        from pipeline.eval import report

        results = {n: self.read(n) for n in names}
        return report.write(self.id, results, Path(self.out), self.results, tb=self._tb())

    def _tb(self) -> Path | None:
        if self.checkpoint:
            return Path(self.checkpoint).parent.parent / "tb"
        return None

