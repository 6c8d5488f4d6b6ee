"""ImageGPT end to end on real processes: `scripts/demo_imagegpt.sh` shortened (labelled shards, the palette from
`data_tools palette`, a tiny AR model on 2 DeepSpeed ZeRO-2 ranks with validation bits/dim and sample grids during
training, `pipeline.eval imagegpt-samples`, `pipeline.eval linear-probe` of every layer), then the run exported for
`transformers` and fine-tuned for classification from that export."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
STEPS = 45


@pytest.fixture(scope="module")
def demo(tmp_path_factory, run_demo):
    root = tmp_path_factory.mktemp("imagegpt")
    return root, run_demo("demo_imagegpt.sh", root, STEPS=STEPS, TRAIN=960, VAL=192)


def _tb(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_bits_per_dim_fall_and_samples_reach_tensorboard(demo):
    root, log = demo
    acc = _tb(root / "run")
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    train = scalars["train/bits_per_dim"]
    assert train[max(train)] < train[min(train)] - 0.3, train  # 3 bits/dim is a uniform guess over 512 colours
    assert sorted(scalars["eval/bits_per_dim"]) == [15, 30, 45]
    val = scalars["eval/bits_per_dim"]
    assert val[45] < val[15] and val[45] < 2.5, val
    for name in ("samples/unconditional", "samples/completions"):
        assert name in acc.Tags()["images"]
        image = acc.Images(name)[-1]
        assert image.step == STEPS and image.width > 16 and image.height > 16
    assert "2 ranks on cpu, ZeRO-2" in log


def test_samples_cli_and_per_layer_probe(demo):
    from PIL import Image

    root, log = demo
    samples = root / "run/eval/samples"
    assert Image.open(samples / "unconditional.png").size == (8 * 17 + 1, 17 + 1)  # 8 of 16 px, 1 px apart
    assert Image.open(samples / "completions.png").size[1] == 8 // 4 * 17 + 1  # rows of 4 x (original, half, done)
    report = json.loads((root / "run/eval/linear_probe.json").read_text())
    layers = report["layers"]
    assert list(layers) == ["embedding", "layer_1", "layer_2", "layer_3", "layer_4"]
    assert report["step"] == STEPS and all(r["n_test"] == 192 and r["classes"] == 24 for r in layers.values())
    # 24 classes: chance is 4 %; the features of a trained layer separate the shapes' colours and forms
    assert max(r["accuracy"] for r in layers.values()) > 0.2, layers
    assert Image.open(root / "run/eval/linear_probe.png").size == (640, 400)
    assert "probe/accuracy_by_layer" in _tb(root / "run").Tags()["images"]
    assert f"best: {report['best_layer']}" in log


def test_export_loads_in_transformers_with_the_same_logits(demo, tmp_path):
    from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    from pipeline.eval.checkpoints import load_model

    root, _ = demo
    r = subprocess.run([sys.executable, "-m", "pipeline.export", str(root / "run"), "--format", "timm"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "exports --format hf" in r.stderr
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "pipeline.export", str(root / "run"), "--format", "hf", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _, task, ours, _ = load_model(root / "run")
    theirs = ImageGPTForCausalImageModeling.from_pretrained(out).eval()
    tokens = task.inputs(torch.randint(0, 512, (2, 256)))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    assert ImageGPTImageProcessor.from_pretrained(out).clusters.shape == (512, 3)


def test_fine_tuning_for_classification_from_the_export(demo, tmp_path):
    """From the transformers directory: a new classification head on pooled features, the generative loss kept as
    an auxiliary term (that the objective learns is tested in test_imagegpt.py: a tiny model this short-trained
    needs more steps than a test affords)."""
    root, _ = demo
    export = tmp_path / "hf"
    assert subprocess.run([sys.executable, "-m", "pipeline.export", str(root / "run"), "--out", str(export)],
                          cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    run = tmp_path / "finetune"
    r = subprocess.run(
        [sys.executable, "-m", "launch", "local", "configs/imagegpt/tiny_cpu.yaml", "--nproc", "1",
         f"data.train={root}/demo/train/{{00000..00003}}.tar", f"data.val={root}/demo/val/00000.tar",
         f"model.palette={root}/demo/train/palette/k512.npy", f"run.dir={run}", f"model.init_from={export}",
         "model.num_classes=24", "model.gen_loss_weight=0.5", "train.steps=30", "optim.warmup_steps=2",
         "optim.lr=3e-3", "train.log_every=5", "eval.every=0", "eval.samples=0", "train.global_batch_size=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "new classification head (24 classes)" in r.stderr
    scalars = {tag: {e.step: e.value for e in _tb(run).Scalars(tag)}
               for tag in ("train/cls_loss", "train/gen_loss", "eval/top1", "eval/bits_per_dim")}
    assert sorted(scalars["train/cls_loss"]) == [5, 10, 15, 20, 25, 30] and 0 <= scalars["eval/top1"][30] <= 1
    # started from the pretrained generative model, not from scratch: far below a uniform guess (3 bits/dim)
    assert scalars["train/gen_loss"][5] < 0.8 * math.log(512) and scalars["eval/bits_per_dim"][30] < 2.5, scalars
