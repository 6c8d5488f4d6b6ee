"""`python -m pipeline.eval suite|zeroshot|classify|vit-figures|linear-probe|imagegpt-samples --checkpoint RUN ...`.

suite: the CLIP paper's 27 datasets (pipeline/eval/suite.py) from --data-root DIR (one folder per dataset, under
the registry's name), zero-shot and/or linear probes, each with the paper's metric -> OUT/suite.json, .md, .png,
suite_examples.png and TensorBoard (pipeline/eval/report.py); per dataset OUT/suite/NAME.json with its per-sample
scores beside it. Works on our checkpoints and on open_clip / OpenAI weights (--pretrained FILE --model NAME).
Locally one dataset after the other; with `--slurm CLUSTER` one array task per dataset, merged when all end. A
rerun evaluates only what is missing for that model.

zeroshot (CLIP): each dataset's result is written to OUT/zeroshot/NAME.json as it finishes; OUT/zeroshot.json and
.md gather them. With `--slurm CLUSTER` each dataset is one task of a SLURM job array (one GPU each on GPU clusters)
and a merge job gathers them when all have ended; datasets already evaluated for the same checkpoint step are not
run again.
classify (ViT): top-1, top-5 and mean per-class accuracy on labelled shards or ImageFolder trees -> OUT/classify.json
and .md.
vit-figures: the ViT paper's Figure 7 (pipeline/eval/figures.py) as PNGs in OUT/figures/ and images in the run's
TensorBoard at the checkpoint's step.
linear-probe: a linear probe per layer of the task's frozen features (ImageGPT: the paper's f_l of every layer;
pipeline/eval/linear_probe.py) -> OUT/linear_probe.json and .png (accuracy by layer), and TensorBoard.
imagegpt-samples: unconditional samples and completions of held-out images -> OUT/samples/*.png and TensorBoard.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, config
from pipeline.eval.checkpoints import default_device, load_model


@dataclass
class ZeroShot:
    """Zero-shot evaluation of one checkpoint; calling it on a dataset writes OUT/zeroshot/NAME.json. Plain data,
    so that submitit can pickle it for array tasks; the model is loaded in the process that evaluates."""

    checkpoint: str  # one checkpoint directory (resolved before submission: `latest` may move meanwhile)
    out: str
    batch_size: int = 256
    workers: int = 2
    device: str | None = None  # None: cuda when there is one

    def result_path(self, dataset: str | Path) -> Path:
        return Path(self.out) / "zeroshot" / f"{Path(dataset).name}.json"

    def done(self, dataset: str | Path) -> bool:
        path = self.result_path(dataset)
        return path.is_file() and json.loads(path.read_text()).get("checkpoint") == self.checkpoint

    def __call__(self, dataset: str, model=None) -> dict:
        from pipeline.eval.zeroshot import evaluate

        device = self.device or default_device()
        cfg, task, model, ckpt = model or load_model(self.checkpoint, device)
        result = evaluate(model, task.tokenizer, dataset, task.image_transform(train=False),
                          batch_size=self.batch_size, device=device, num_workers=self.workers)
        result.update(checkpoint=self.checkpoint, model=cfg.model.name, step=checkpoint.read_state(ckpt)["step"])
        path = self.result_path(dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        return result

    def gather(self, datasets: list[str]) -> dict:
        """The report over `datasets` from their result files; those without one are listed as missing."""
        from pipeline.eval.zeroshot import report, write_report

        results = [json.loads(self.result_path(d).read_text()) for d in datasets if self.done(d)]
        missing = [d for d in datasets if not self.done(d)]
        step = checkpoint.read_state(Path(self.checkpoint))["step"]
        full = report(results, checkpoint=self.checkpoint, step=step, missing=missing)
        write_report(full, Path(self.out))
        return full


@dataclass
class _Gather:
    job: Any  # ZeroShot or SuiteJob: what has .gather(items) -> the report
    items: list[str]

    def __call__(self) -> dict:
        return self.job.gather(self.items)


def _on_slurm(args, name: str, out: Path, job, todo: list[str], items: list[str], show, report: str) -> int:
    """One array task per item still to do, then a merge job that gathers the report over all items."""
    from launch import array

    if not todo:
        return show(job.gather(items), out)
    request = array.ArrayRequest.from_args(args, name=name, gpus_per_task=1)
    submitted = array.submit(request, out / "slurm", job, todo, _Gather(job, items))
    print(submitted.describe(f"{len(todo)} of {len(items)} datasets"))
    if not args.wait:
        print(f"report: {out / report} once job {submitted.merge.job_id} ends")
        return 0
    return show(submitted.merge.result(), out)


def _print(report: dict, out: Path) -> int:
    from pipeline.eval.zeroshot import markdown_table

    print(markdown_table(report["results"]), end="")
    for r in report["results"]:
        print(f"{r['dataset']}: zero-shot top-1 {r['top1']:.2%} ({r['top1'] / r['chance']:.1f}x chance)")
    if report["missing"]:
        print(f"missing (failed or not run): {', '.join(report['missing'])}; rerun the same command", file=sys.stderr)
    print(f"{report['datasets']} dataset(s), mean top-1 {report['mean_top1']:.2%} -> {out / 'zeroshot.json'}")
    return 1 if report["missing"] else 0


def zeroshot(args) -> int:
    from pipeline.eval import datasets as ds

    ckpt = checkpoint.resolve(args.checkpoint).resolve()  # refuses a run without checkpoints before any work
    paths = list(dict.fromkeys(str(Path(d).resolve()) for d in args.dataset))
    ds.check_names(paths)
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval"  # RUN/checkpoints/step_N -> RUN/eval
    job = ZeroShot(str(ckpt), str(out.resolve()), args.batch_size, args.workers, args.device)
    todo = [d for d in paths if not job.done(d)]
    if args.slurm:
        return _on_slurm(args, f"zeroshot-{ckpt.name}", out, job, todo, paths, _print, "zeroshot.json")
    if todo:
        loaded = load_model(ckpt, args.device or default_device())
        for d in todo:
            job(d, model=loaded)
    return _print(job.gather(paths), out)


def _print_suite(report: dict, out: Path) -> int:
    from pipeline.eval.report import METRIC_NAMES

    missing = []
    for r in report["results"]:
        for mode, label in (("zeroshot", "zero-shot"), ("linear_probe", "linear probe")):
            m = r.get(mode)
            if m and m["status"] == "evaluated":
                print(f"{r['dataset']}: {label} {METRIC_NAMES[r['metric']]} {m['value']:.2%} (chance "
                      f"{m['chance']:.2%}, {m['n']} images" + (f", {m['skipped']} unreadable skipped" if m['skipped']
                                                              else "") + ")")
            elif m:
                print(f"{r['dataset']}: {label} {m['status']}: {m.get('reason', '')}")
        if r["status"] == "not found":
            print(f"{r['dataset']}: not found: {r['reason']}")
        elif r["status"] == "failed":
            print(f"{r['dataset']}: failed: {r['reason']}", file=sys.stderr)
            missing.append(r["dataset"])
        elif r["status"].startswith("missing"):
            missing.append(r["dataset"])
    if missing:
        print(f"missing (failed or not run): {', '.join(missing)}; rerun the same command", file=sys.stderr)
    mean = report["mean_zeroshot"]
    print(f"{report['datasets']} dataset(s) evaluated zero-shot" + (f", mean {mean:.2%}" if mean is not None else "")
          + f" -> {out / 'suite.json'}, suite.md, suite.png")
    return 1 if missing else 0


def suite_command(args) -> int:
    from pipeline.eval import suite
    from pipeline.eval.suite_run import SuiteJob, check_pretrained

    if bool(args.checkpoint) == bool(args.pretrained):
        raise ValueError("give --checkpoint RUN, or --pretrained FILE --model NAME (open_clip weights)")
    specs = suite.get(args.datasets)
    if not Path(args.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {args.data_root}: not a directory")
    if args.checkpoint:
        ckpt = checkpoint.resolve(args.checkpoint).resolve()  # refuses a run without checkpoints before any work
        out = Path(args.out) if args.out else ckpt.parent.parent / "eval"
    else:
        ckpt = None
        check_pretrained(args.pretrained, args.model)
        if not args.out:
            raise ValueError("--pretrained needs --out, where the results go")
        out = Path(args.out)
    job = SuiteJob(str(Path(args.data_root).resolve()), str(out.resolve()), str(ckpt) if ckpt else None,
                   args.pretrained, args.model, zeroshot=not args.no_zeroshot, linear_probe=args.linear_probe,
                   batch_size=args.batch_size, workers=args.workers, device=args.device, max_images=args.max_images,
                   probe_backend=args.probe_backend, probe_max_iter=args.probe_max_iter,
                   progress=sys.stderr.isatty())
    names = [s.name for s in specs]
    todo = [n for n in names if not job.done(n)]
    if args.slurm:
        return _on_slurm(args, f"suite-{ckpt.name if ckpt else args.model}", out, job, todo, names, _print_suite,
                         "suite.json")
    for n in todo:
        print(f"{n} ...", file=sys.stderr, flush=True)
        job(n)
    return _print_suite(job.gather(names), out)


def classify(args) -> int:
    from pipeline.eval.classify import classify as accuracy
    from pipeline.eval.classify import labelled_batches, write_report

    ckpt = checkpoint.resolve(args.checkpoint).resolve()
    device = args.device or default_device()
    cfg, task, model, _ = load_model(ckpt, device)
    results = []
    for dataset in args.dataset:
        batches = labelled_batches(dataset, task.transform(train=False), args.batch_size, args.workers)
        r = accuracy(model, batches, cfg.model.num_classes, task.normalize, device)
        results.append({"dataset": _dataset_name(dataset), "path": dataset, **r})
        print(f"{dataset}: top-1 {r['top1']:.2%} top-5 {r['top5']:.2%} mean per class {r['mean_per_class']:.2%} "
              f"({r['n']} images, chance {r['chance']:.2%})")
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval"
    json_path, _ = write_report(results, out, checkpoint=str(ckpt), step=checkpoint.read_state(ckpt)["step"])
    print(f"-> {json_path}")
    return 0


def vit_figures(args) -> int:
    """Figure 7 of the ViT paper for a checkpoint, over the images under --images."""
    from pipeline.eval import figures
    from pipeline.metrics import Metrics

    ckpt = checkpoint.resolve(args.checkpoint).resolve()
    device = args.device or default_device()
    cfg, task, model, _ = load_model(ckpt, device)
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise ValueError(f"{ckpt}: vit-figures reads a ViT (task: vit), this checkpoint holds task {cfg.task}")
    images = torch.stack([task.image_transform(train=False)(img) for img in _images(args.images, args.max_images)])
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    components, variance = figures.filter_components(model.patch_embed.proj.weight.cpu())
    similarity = figures.position_similarity(model.pos_embed[0, model.num_prefix_tokens:].cpu(), grid)
    distances = []
    for start in range(0, len(images), args.batch_size):
        maps = figures.attention_maps(model, images[start:start + args.batch_size].to(device))
        distances.append(torch.stack([figures.attention_distance(a, grid, patch, model.num_prefix_tokens).cpu()
                                      for a in maps]) * len(maps[0]))
    distances = torch.stack(distances).sum(0) / len(images)  # (layers, heads), the mean over all images
    drawn = {"embedding_filters": figures.draw_components(components),
             "position_similarity": figures.draw_similarity(similarity),
             "attention_distance": figures.draw_distances(list(distances), task.image_size)}
    out = (Path(args.out) if args.out else ckpt.parent.parent / "eval") / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for name, image in drawn.items():
        image.save(out / f"{name}.png")
    (out / "attention_distance.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "images": len(images), "patch_size": patch,
         "distance_px": distances.tolist(), "filter_variance": variance.tolist()}, indent=1) + "\n")
    step = checkpoint.read_state(ckpt)["step"]
    metrics = Metrics(ckpt.parent.parent / "tb", enabled=True)
    metrics.images(step, {f"figures/{name}": figures.to_chw(image) for name, image in drawn.items()})
    metrics.close()
    print(f"{len(images)} images; figures -> {out} (and TensorBoard, step {step})")
    return 0


def linear_probe(args) -> int:
    """One L-BFGS logistic regression per layer of the task's features (ImageGPT: every layer), its regularisation
    chosen on a split of --train -> OUT/linear_probe.json + .png and the run's TensorBoard."""
    from pipeline.eval import linear_probe as lp
    from pipeline.eval.classify import ImageTransform, labelled_batches
    from pipeline.eval.figures import to_chw
    from pipeline.metrics import Metrics

    ckpt = checkpoint.resolve(args.checkpoint).resolve()
    device = args.device or default_device()
    cfg, task, model, _ = load_model(ckpt, device)

    def features(source: str):
        found, labels = {}, []
        for images, y in labelled_batches(source, ImageTransform(task.image_transform(train=False)),
                                          args.batch_size, args.workers, args.max_images):
            with torch.no_grad():
                for name, f in task.features(model, images.to(device)).items():
                    found.setdefault(name, []).append(f.float().cpu())
            labels.append(y)
        if not labels:
            raise ValueError(f"{source}: no labelled images (labelled shards or an ImageFolder tree)")
        return {name: torch.cat(f).numpy() for name, f in found.items()}, torch.cat(labels).numpy()

    train, train_y = features(args.train)
    test, test_y = features(args.test)
    results = lp.probe_layers(train, train_y, test, test_y, seed=args.seed, max_iter=args.max_iter)
    step = checkpoint.read_state(ckpt)["step"]
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval"
    json_path, png_path = lp.write_report(results, out, checkpoint=str(ckpt), step=step, train=args.train,
                                          test=args.test)
    metrics = Metrics(ckpt.parent.parent / "tb", enabled=True)
    metrics.scalars(step, {f"probe/{name}": r.accuracy for name, r in results.items()})
    metrics.images(step, {"probe/accuracy_by_layer": to_chw(lp.draw_layer_curve(results))})
    metrics.close()
    for name, r in results.items():
        print(f"{name}: test accuracy {r.accuracy:.2%} (C {r.C:g}, val {r.val_accuracy:.2%})")
    best = lp.best_layer(results)
    print(f"best: {best} {results[best].accuracy:.2%} of {len(results)} layers ({len(train_y)} train, "
          f"{len(test_y)} test images) -> {json_path}, {png_path}")
    return 0


def imagegpt_samples(args) -> int:
    """Unconditional samples and completions of the top half of held-out images, as PNG grids in OUT/samples/ and
    images in the run's TensorBoard."""
    from PIL import Image

    from pipeline.metrics import Metrics

    ckpt = checkpoint.resolve(args.checkpoint).resolve()
    device = args.device or default_device()
    cfg, task, model, _ = load_model(ckpt, device)
    if not hasattr(task, "sample_grids") or cfg.model.objective != "ar":
        raise ValueError(f"{ckpt}: imagegpt-samples samples an autoregressive ImageGPT (task: imagegpt, "
                         f"model.objective=ar), this checkpoint holds task {cfg.task}")
    cfg.eval.samples, cfg.eval.temperature, cfg.eval.top_k = args.n, args.temperature, args.top_k
    images = _images(args.images, args.n)
    held_out = torch.stack([task.image_transform(train=False)(img) for img in images]).long().to(device)
    with torch.no_grad():
        grids = task.sample_grids(model, held_out, seed=args.seed)
    out = (Path(args.out) if args.out else ckpt.parent.parent / "eval") / "samples"
    out.mkdir(parents=True, exist_ok=True)
    for name, grid in grids.items():
        path = out / f"{name.split('/')[-1]}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        tmp.replace(path)
    step = checkpoint.read_state(ckpt)["step"]
    metrics = Metrics(ckpt.parent.parent / "tb", enabled=True)
    metrics.images(step, grids)
    metrics.close()
    print(f"{args.n} samples and completions -> {out} (and TensorBoard, step {step})")
    return 0


def _images(path: str, limit: int):
    """PIL images under a directory (recursively) or in shards (a spec), at most `limit`."""
    from pipeline.data import decode_image, expand_urls, to_sample
    from pipeline.shards import open_shard

    found = []
    if Path(path).is_dir():
        files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        found = [decode_image(f.read_bytes()) for f in files[:limit]]
    else:
        for url in expand_urls(path):
            shard = open_shard(url, perm_seed=0)
            while not shard.done() and len(found) < limit:
                found.append(to_sample(shard.next())["image"])
            shard.close()
    if not found:
        raise FileNotFoundError(f"--images {path}: no images there")
    return found


def _dataset_name(path: str) -> str:
    """An ImageFolder's directory name, or the directory of a shard spec's shards."""
    from pipeline.data import expand_urls

    return Path(path).name if Path(path).is_dir() else Path(expand_urls(path)[0]).parent.name


def _command(sub, name: str, description: str, out: str = "", checkpoint_required: bool = True
             ) -> argparse.ArgumentParser:
    """A subcommand with what all of them read: --checkpoint, --out, --device."""
    p = sub.add_parser(name, help=description)
    p.add_argument("--checkpoint", required=checkpoint_required,
                   help="run dir (runs/NAME), checkpoints dir or one checkpoint")
    p.add_argument("--out", help=f"output dir (default: RUN/eval{'; ' + out if out else ''})")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    return p


def main(argv=None) -> int:
    from launch import array

    parser = argparse.ArgumentParser(prog="python -m pipeline.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = _command(sub, "suite", "the CLIP paper's 27-dataset suite: zero-shot and linear probes, the paper's metrics",
                 checkpoint_required=False)
    s.add_argument("--data-root", required=True, help="one folder per dataset, named as in the registry "
                                                      "(food101, cifar10, ..., imagenet1k)")
    s.add_argument("--datasets", help="comma-separated registry names (default: all 27)")
    s.add_argument("--pretrained", help="open_clip / OpenAI CLIP weights (a local file) instead of --checkpoint")
    s.add_argument("--model", help="the open_clip model name of --pretrained (e.g. ViT-B-32)")
    s.add_argument("--linear-probe", action="store_true", help="also fit linear probes (needs each train split)")
    s.add_argument("--no-zeroshot", action="store_true", help="linear probes only")
    s.add_argument("--max-images", type=int, default=0, help="images per split (0: all): a quick look")
    s.add_argument("--probe-backend", choices=("auto", "sklearn", "torch"), default="auto",
                   help="auto: torch's L-BFGS on a GPU, scikit-learn's on CPU")
    s.add_argument("--probe-max-iter", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2)
    array.add_arguments(s, "one array task per dataset")
    z = _command(sub, "zeroshot", "zero-shot classification of local labelled datasets")
    z.add_argument("--dataset", required=True, action="append",
                   help="ImageFolder tree (+ classnames.txt, templates); repeat for several")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--workers", type=int, default=2)
    array.add_arguments(z, "one array task per dataset")
    c = _command(sub, "classify", "top-1/top-5 of a classifier (ViT) on labelled shards or ImageFolder trees")
    c.add_argument("--dataset", required=True, action="append", help="labelled shards (a spec) or an ImageFolder")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--workers", type=int, default=2)
    f = _command(sub, "vit-figures", "the ViT paper's Figure 7: filters, position embeddings, attention",
                 "the figures go to OUT/figures/")
    f.add_argument("--images", required=True, help="a directory of images, or shards, for the attention distance")
    f.add_argument("--max-images", type=int, default=128, help="the paper averages over 128 images")
    f.add_argument("--batch-size", type=int, default=32)
    p = _command(sub, "linear-probe", "linear probes of every layer's features (ImageGPT), L-BFGS, C chosen on a "
                                      "validation split")
    p.add_argument("--train", required=True, help="labelled shards (a spec) or an ImageFolder to fit the probes on")
    p.add_argument("--test", required=True, help="labelled shards or an ImageFolder to score them on")
    p.add_argument("--max-images", type=int, default=0, help="images read from each set (0: all)")
    p.add_argument("--seed", type=int, default=0, help="the validation split")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (the CLIP paper's 1,000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    g = _command(sub, "imagegpt-samples", "ImageGPT samples and completions of held-out images",
                 "the grids go to OUT/samples/")
    g.add_argument("--images", required=True, help="a directory of images, or shards: the images completed")
    g.add_argument("--n", type=int, default=8, help="samples, and images completed")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest colours (0: all)")
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    commands = {"classify": classify, "vit-figures": vit_figures, "linear-probe": linear_probe,
                "imagegpt-samples": imagegpt_samples, "zeroshot": zeroshot, "suite": suite_command}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, NotImplementedError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
