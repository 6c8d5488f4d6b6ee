"""Zero-shot evaluation speed: ours (`pipeline.eval suite`) against clip_benchmark 1.6.2 on the same local dataset,
model, batch size and loader workers.

    python -m bench.suite_zeroshot [--model CLIP-tiny] [--images 2000] [--batch-size 64] [--workers 2] [--rounds 3]
                                   [--write]

The dataset is EuroSAT-shaped (10 classes, clip-benchmark's names and 3 templates) in clip_benchmark's own
WebDataset layout (test/nshards.txt, test/0.tar ..., classnames.txt, zeroshot_classification_templates.txt),
--images PNGs of 64 px in 4 shards. The model is open_clip's --model at random init (no weights can be downloaded
here; speed does not depend on them). Each side runs in a fresh process, alternating, --rounds times; images/s
counts the whole evaluation (text classifier, decoding, image tower, metrics) after the model is built:
- clip_benchmark: its `build_wds_dataset` and `metrics.zeroshot_classification.evaluate` (amp off on CPU), as its
  CLI runs them. Its top-k helper `accuracy` fails under our numpy 2.4 (`float()` of a 1-element array); the
  benchmark swaps in the same computation with `.item()`, a few microseconds at the end of the run;
- ours: `SuiteJob` on the same folder (datasets.open_split, zero-shot scores, the suite's metric, the per-sample
  .npz and the examples), as `python -m pipeline.eval suite --pretrained ...` runs it.
Both sides' top-1 is reported (the weights are random, so it is chance on both).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, median_range, write_section


def make_dataset(root: Path, images: int) -> Path:
    import webdataset as wds
    from PIL import Image

    from pipeline.eval import suite

    folder = root / "eurosat"
    (folder / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = 4
    for s in range(shards):
        with wds.TarWriter(str(folder / "test" / f"{s}.tar")) as w:
            for i in range(s, images, shards):
                label = i % 10
                pixels = np.clip(rng.normal(25 * label, 50, (64, 64, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                w.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(label).encode()})
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    spec = suite.BY_NAME["eurosat"]
    (folder / "classnames.txt").write_text("\n".join(suite.package_classnames(spec)[0]) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(suite.package_templates(spec)[0]) + "\n")
    return root


def _weights(model_name: str, path: Path) -> None:
    import open_clip
    import torch

    from pipeline.tasks import clip  # noqa: F401  (registers CLIP-tiny)

    torch.manual_seed(0)
    torch.save(open_clip.create_model(model_name).state_dict(), path)


def _theirs(root: Path, weights: Path, model_name: str, batch: int, workers: int) -> dict:
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification

    from pipeline.tasks import clip  # noqa: F401

    def accuracy(output, target, topk=(1,)):  # theirs, numpy-2 safe
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    zeroshot_classification.accuracy = accuracy
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    start = time.perf_counter()
    dataset = build_wds_dataset("wds/eurosat", preprocess, split="test", data_dir=str(root / "eurosat"))
    loader = torch.utils.data.DataLoader(dataset.batched(batch), batch_size=None, num_workers=workers)
    result = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                              amp=False)
    return {"seconds": time.perf_counter() - start, "top1": result["acc1"]}


def _ours(root: Path, weights: Path, model_name: str, batch: int, workers: int, out: Path) -> dict:
    from pipeline.eval.suite_run import SuiteJob

    job = SuiteJob(str(root), str(out), pretrained=str(weights), model_name=model_name, batch_size=batch,
                   workers=workers, device="cpu")
    job.subject()  # the model is built outside the timing, as on their side
    start = time.perf_counter()
    result = job("eurosat")["zeroshot"]
    return {"seconds": time.perf_counter() - start, "top1": result["top1"], "n": result["n"]}


def _child(side: str, root: str, weights: str, model_name: str, batch: int, workers: int, out: str) -> None:
    if side == "theirs":
        r = _theirs(Path(root), Path(weights), model_name, batch, workers)
    else:
        r = _ours(Path(root), Path(weights), model_name, batch, workers, Path(out))
    print("RESULT " + json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="CLIP-tiny")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", action="store_true", help="replace this section of docs/PERFORMANCE.md")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, root, weights, model_name, batch, workers, out = args.child
        return _child(side, root, weights, model_name, int(batch), int(workers), out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_dataset(tmp / "data", args.images)
        weights = tmp / "weights.pt"
        _weights(args.model, weights)
        runs = {"theirs": [], "ours": []}
        for r in range(args.rounds):
            for side in ("theirs", "ours"):
                out = tmp / f"out{r}"
                cmd = [sys.executable, "-m", "bench.suite_zeroshot", "--child", side, str(root), str(weights),
                       args.model, str(args.batch_size), str(args.workers), str(out)]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
                runs[side].append(json.loads(line[7:]))
                print(side, runs[side][-1], flush=True)
    rate = {side: [args.images / x["seconds"] for x in xs] for side, xs in runs.items()}
    same = {round(x["top1"], 6) for xs in runs.values() for x in xs}
    ratio = [o / t for o, t in zip(rate["ours"], rate["theirs"])]
    body = (f"`python -m bench.suite_zeroshot --model {args.model} --images {args.images} --batch-size "
            f"{args.batch_size} --workers {args.workers} --rounds {args.rounds}` on {machine()}.\n\n"
            f"Zero-shot over one local dataset in clip_benchmark's WebDataset layout ({args.images} PNGs, 64 px, "
            f"10 classes x 3 templates), the same open_clip model ({args.model}, random init), batch size and "
            f"loader workers, CPU fp32; each side in a fresh process, alternating; the whole evaluation after the "
            f"model is built. Median (min-max) over {args.rounds} rounds.\n\n"
            "| | images/s |\n|---|---|\n"
            f"| clip_benchmark 1.6.2 | {median_range(rate['theirs'])} |\n"
            f"| ours (`pipeline.eval suite`) | {median_range(rate['ours'])} |\n"
            f"| ours / clip_benchmark | {median_range(ratio, '{:.2f}')}x |\n\n"
            f"Top-1 on both sides: {', '.join(f'{t:.4f}' for t in sorted(same))} (random weights: chance). Ours "
            "also writes the per-sample scores (.npz), the paper's metric and the example "
            "thumbnails within that time. On a GPU: not measured, needs a GPU.")
    print(body)
    if args.write:
        write_section("Evaluation suite: zero-shot against clip_benchmark", body)


if __name__ == "__main__":
    main()
