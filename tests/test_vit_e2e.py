"""ViT end to end on real processes: `scripts/demo_vit.sh` shortened (labelled shards from the demo corpus with
from-folder, a tiny ViT on 2 DeepSpeed ZeRO-2 ranks, held-out top-1 during training, `pipeline.eval classify`,
`pipeline.eval vit-figures`), then its checkpoint exported to timm and fine-tuned from 32 px to 48 px."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
STEPS, CHANCE = 60, 1 / 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory, run_demo):
    root = tmp_path_factory.mktemp("vit")
    return root, run_demo("demo_vit.sh", root, STEPS=STEPS, TRAIN=1200, VAL=240)


def _tb(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_trains_and_evaluates_held_out_top1_during_training(demo):
    root, log = demo
    acc = _tb(root / "run")
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    for tag in ("train/loss", "train/top1", "train/lr", "eval/top1", "eval/top5", "eval/mean_per_class"):
        assert tag in scalars, sorted(scalars)
    assert sorted(scalars["eval/top1"]) == [20, 40, 60]  # every STEPS / 3 steps and at the end
    assert scalars["eval/top1"][STEPS] > 4 * CHANCE, scalars["eval/top1"]  # well above chance
    assert scalars["train/loss"][STEPS] < scalars["train/loss"][20]
    assert "2 ranks on cpu, ZeRO-2" in log


def test_classify_cli_agrees_with_the_evaluation_during_training(demo):
    root, _ = demo
    report = json.loads((root / "run/eval/classify.json").read_text())
    (result,) = report["results"]
    assert report["step"] == STEPS and result["n"] == 240 and result["classes"] == 24
    top1 = {e.step: e.value for e in _tb(root / "run").Scalars("eval/top1")}[STEPS]
    assert result["top1"] == pytest.approx(top1, abs=1e-6)
    assert "| val | 240 | 24 |" in (root / "run/eval/classify.md").read_text()


def test_figures_are_written_and_in_tensorboard(demo):
    from PIL import Image

    root, _ = demo
    figures = root / "run/eval/figures"
    for name in ("embedding_filters", "position_similarity", "attention_distance"):
        assert Image.open(figures / f"{name}.png").size[0] > 100
        assert f"figures/{name}" in _tb(root / "run").Tags()["images"]
    distances = json.loads((figures / "attention_distance.json").read_text())
    assert len(distances["distance_px"]) == 4 and len(distances["distance_px"][0]) == 4  # layers x heads
    assert all(0 < d < 32 * 2**0.5 for layer in distances["distance_px"] for d in layer)


def test_export_loads_in_timm_with_the_same_logits(demo, tmp_path):
    import timm

    from pipeline.eval.checkpoints import load_model

    root, _ = demo
    out = tmp_path / "vit.pth"
    r = subprocess.run([sys.executable, "-m", "pipeline.export", str(root / "run"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = load_model(root / "run")[2]
    # timm drops a head whose classes differ from its pretrained config's (1,000): the overlay says 24
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=24, img_size=32, patch_size=4, embed_dim=96,
                               depth=4, num_heads=4, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out), num_classes=24))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(images), ours(images))


def test_fine_tuning_at_a_higher_resolution(demo):
    """From the 32 px run to 48 px: position embeddings interpolated, a few steps, accuracy well above chance."""
    root, _ = demo
    run = root / "finetune"
    r = subprocess.run(
        [sys.executable, "-m", "launch", "local", "configs/vit/tiny_cpu.yaml", "--nproc", "2",
         f"data.train={root}/demo/train/{{00000..00003}}.tar", f"data.val={root}/demo/val/00000.tar",
         f"run.dir={run}", "model.image_size=48", f"model.init_from={root / 'run'}", "train.steps=10",
         "optim.warmup_steps=2", "optim.lr=5e-4", "train.log_every=5", "eval.every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "pos_embed 65 -> 145 tokens" in r.stderr  # 8x8 patches + class token -> 12x12 + 1
    top1 = {e.step: e.value for e in _tb(run).Scalars("eval/top1")}[10]
    assert top1 > 4 * CHANCE, top1
