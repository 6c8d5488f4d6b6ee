"""Zero-shot classification (CLIP paper, section 3.1.2): class-name prompts -> text classifier -> accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from torch.utils.data import DataLoader

from pipeline.eval import datasets


def _template_fn(template: str):
    return lambda c: template.replace("{c}", c).replace("{}", c)


@torch.no_grad()
def evaluate(model, tokenizer, dataset_path, transform, *, batch_size: int = 64, device="cpu",
             dtype=torch.float32, num_workers: int = 0) -> dict:
    """Top-1, top-5 and mean per-class accuracy on one ImageFolder tree (datasets.load)."""
    from pipeline.eval import metrics

    data = datasets.load(dataset_path, transform)
    text = classifier(model, tokenizer, data.classnames, data.templates, device)
    loader = DataLoader(data.dataset, batch_size=batch_size, num_workers=num_workers)
    s, y, _ = scores(model, text, ((images, labels, 0) for images, labels in loader), device, dtype)
    k = len(data.classnames)
    return {"dataset": data.name, "n": len(y), "classes": k, "templates": len(data.templates),
            "top1": metrics.top_k_accuracy(s, y, 1), "top5": metrics.top_k_accuracy(s, y, min(5, k)),
            "mean_per_class": metrics.mean_per_class_recall(s, y), "chance": 1.0 / k}


def classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(d, K) text classifier: per class, the mean of its normalised prompt embeddings, normalised (the paper's
    prompt ensembling, done in embedding space)."""
    return open_clip.build_zero_shot_classifier(model, tokenizer, classnames, [_template_fn(t) for t in templates],
                                                num_classes_per_batch=10, device=device, use_tqdm=False)


@torch.no_grad()
def scores(model, text: torch.Tensor, batches, device, dtype=torch.float32, progress=None):
    """Cosine similarities (N, K) float32 of every readable image to every class, their targets, and the number of
    unreadable samples skipped; `batches` yields (images, targets, skipped) (pipeline/eval/datasets.collate)."""
    out, targets, skipped = [], [], 0
    for images, y, bad in batches:
        skipped += bad
        if images is not None:
            features = model.encode_image(images.to(device, dtype), normalize=True)
            out.append((features.float() @ text.float()).cpu())
            targets.append(y)
        if progress is not None:
            progress(bad + (0 if images is None else len(images)))
    if not out:
        return torch.zeros(0, text.shape[1]), torch.zeros(0, dtype=torch.long), skipped
    return torch.cat(out), torch.cat(targets), skipped


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """OUT/zeroshot.json (the report: checkpoint, step, one result per dataset, their mean) and zeroshot.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "zeroshot.json", out_dir / "zeroshot.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown_table(report["results"]))
    return json_path, md_path


def report(results: list[dict], **about) -> dict:
    """Results of several datasets as one report; the mean over datasets is the CLIP paper's summary figure."""
    mean = sum(r["top1"] for r in results) / len(results) if results else float("nan")
    return {**about, "datasets": len(results), "mean_top1": mean, "results": results}


def markdown_table(results: list[dict]) -> str:
    rows = ["| dataset | n | classes | top-1 | top-5 | mean per class | chance |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['dataset']} | {r['n']} | {r['classes']} | {r['top1']:.2%} | {r['top5']:.2%} | "
             f"{r['mean_per_class']:.2%} | {r['chance']:.2%} |" for r in results]
    return "\n".join(rows) + "\n"
