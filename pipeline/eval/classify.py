"""Classification accuracy on labelled images: top-1, top-5, mean per-class accuracy.

Used by ViT's evaluation during training (`data.val`) and by `python -m pipeline.eval classify`. Datasets are
labelled WebDataset shards (`{key}.cls`, from `data_tools from-folder`; a brace-expanded spec) or ImageFolder
trees, read once in a fixed order; unreadable samples are skipped and counted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("pipeline")


class _Shards(IterableDataset):
    """Labelled samples of shards, split between loader workers by shard; (image, label) through `transform`
    (a sample dict -> {"image", "label"} transform, as the tasks' own)."""

    def __init__(self, urls: list[str], transform: Callable[[dict], dict], max_images: int = 0,
                 labelled: bool = True):
        self.urls, self.transform, self.max_images, self.labelled = urls, transform, max_images, labelled

    def __iter__(self):
        from pipeline.data import to_sample
        from pipeline.shards import open_shard

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        budget = -(-self.max_images // workers) if self.max_images else None  # this worker's share of the cap
        for url in self.urls[worker::workers]:
            shard = open_shard(url, perm_seed=0)  # any fixed order: the metrics do not depend on it
            if shard.error is not None:
                log.warning("%s: damaged (%r), its readable samples are used", url, shard.error)
            while not shard.done() and budget != 0:
                raw = shard.next()
                try:
                    sample = self.transform(to_sample(raw))
                except Exception as e:
                    log.warning("skipping sample %s of %s: %r", raw.get("__key__"), url, e)
                    continue
                if "label" in sample or not self.labelled:
                    budget = None if budget is None else budget - 1
                    yield sample["image"], sample.get("label", -1)
            shard.close()


class _Folder(torch.utils.data.Dataset):
    def __init__(self, root: Path, transform: Callable[[dict], dict]):
        from torchvision.datasets import ImageFolder

        self.folder, self.transform = ImageFolder(str(root)), transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        image, label = self.folder[i]
        sample = self.transform({"image": image.convert("RGB"), "label": label})
        return sample["image"], sample["label"]


class ImageTransform:
    """Picklable: a sample dict's image through a PIL -> tensor transform (a task's `image_transform`)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        return {**sample, "image": self.transform(sample["image"])}


def labelled_batches(source: str | Path, transform: Callable[[dict], dict], batch_size: int, workers: int = 0,
                     max_images: int = 0, labelled: bool = True) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images, labels) from labelled shards (a spec) or an ImageFolder tree (a directory).
    labelled=False: shard samples without a label too, labelled -1 (generative evaluation)."""
    if Path(str(source)).is_dir():
        dataset = _Folder(Path(source), transform)
        if max_images:
            dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    else:
        from pipeline.data import expand_urls

        dataset = _Shards(expand_urls(source), transform, max_images, labelled)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers)


@torch.no_grad()
def classify(model, batches: Iterable, num_classes: int, prepare: Callable[[torch.Tensor], torch.Tensor],
             device) -> dict:
    """top-1, top-5 and mean per-class accuracy of `model` (logits) over the batches; `prepare` turns a batch of
    images as the loader gives them into the model's input (normalisation, dtype)."""
    correct1 = correct5 = 0
    hits, totals = torch.zeros(num_classes), torch.zeros(num_classes)
    for images, labels in batches:
        logits = model(prepare(images.to(device))).float().cpu()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        hits.index_add_(0, labels, hit1.float())
        totals.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
    n = int(totals.sum())
    if n == 0:
        raise ValueError("no labelled images to evaluate")
    seen = totals > 0
    return {"n": n, "classes": num_classes, "top1": correct1 / n, "top5": correct5 / n,
            "mean_per_class": (hits[seen] / totals[seen]).mean().item(), "chance": 1 / num_classes}


def write_report(results: list[dict], out: Path, **about) -> tuple[Path, Path]:
    """OUT/classify.json (the results and what they are of) and classify.md (a table)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "classify.json", out / "classify.md"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps({**about, "results": results}, indent=1) + "\n")
    tmp.replace(json_path)
    rows = ["| dataset | n | classes | top-1 | top-5 | mean per class | chance |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['dataset']} | {r['n']} | {r['classes']} | {r['top1']:.2%} | {r['top5']:.2%} | "
             f"{r['mean_per_class']:.2%} | {r['chance']:.2%} |" for r in results]
    md_path.write_text("\n".join(rows) + "\n")
    return json_path, md_path
