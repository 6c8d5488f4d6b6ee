"""The CLIP task: open_clip's loss equals the paper's pseudocode; exports load in open_clip; meta-device sizing."""
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline import config
from pipeline.tasks.clip import ClipTask, to_open_clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/clip/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def task():
    return ClipTask(config.load(TINY))


def _batch(task, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = task.example_batch(n, "cpu")
    return {"image": torch.randn(ex["image"].shape, generator=g),
            "text": task.tokenizer([f"a photo of shape {i} in colour {i * 7}" for i in range(n)])}


def paper_loss(image_features, text_features, t):
    """Figure 3 of Radford et al. 2021, with the cross-entropies written out (no torch loss functions)."""
    i_e = image_features / image_features.norm(dim=1, keepdim=True)
    t_e = text_features / text_features.norm(dim=1, keepdim=True)
    logits = i_e @ t_e.T * math.exp(t)
    n = logits.shape[0]
    diag = logits.diagonal()
    loss_i = (torch.logsumexp(logits, dim=0) - diag).sum() / n  # cross_entropy_loss(logits, labels, axis=0)
    loss_t = (torch.logsumexp(logits, dim=1) - diag).sum() / n  # axis=1
    return (loss_i + loss_t) / 2


@pytest.mark.parametrize("t", [math.log(1 / 0.07), 1.5])
def test_loss_matches_paper_pseudocode(task, t):
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        model.logit_scale.fill_(t)
    batch = _batch(task)
    loss, logs = task.loss(model, batch)
    with torch.no_grad():
        expected = paper_loss(model.encode_image(batch["image"]), model.encode_text(batch["text"]), t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["logit_scale"] == pytest.approx(math.exp(t), rel=1e-6)


def test_logit_scale_is_1d_for_deepspeed_and_exports_to_open_clip(task, tmp_path):
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert model.logit_scale.shape == (1,)  # DeepSpeed 0.19.8 cannot broadcast 0-dim parameters
    path = tmp_path / "open_clip.pt"
    task.export(model.state_dict(), path)
    ref = open_clip.create_model("CLIP-tiny", pretrained=str(path)).eval()
    assert ref.logit_scale.shape == ()
    batch = _batch(task, n=4)
    with torch.no_grad():
        assert torch.allclose(ref.encode_image(batch["image"]), model.encode_image(batch["image"]))
        assert torch.allclose(ref.encode_text(batch["text"]), model.encode_text(batch["text"]))
    assert to_open_clip(model.state_dict())["logit_scale"].shape == ()


def test_activation_checkpointing_changes_memory_not_results():
    plain = ClipTask(config.load(TINY))
    checkpointed = ClipTask(config.load(TINY, ["model.grad_checkpointing=true"]))
    results = []
    for task in (plain, checkpointed):
        torch.manual_seed(0)
        model = task.build_model()
        loss, _ = task.loss(model, _batch(task))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert checkpointed.cfg.model.grad_checkpointing and results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale(task):
    model = task.build_model(device="meta")
    decay, no_decay = task.param_groups(model)
    ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == task.cfg.optim.weight_decay
    for n in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
              "visual.positional_embedding", "ln_final.weight", "ln_final.bias",
              "transformer.resblocks.0.attn.in_proj_bias"):
        assert n in names, n
    for n in ("transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.weight",
              "visual.conv1.weight", "text_projection"):
        assert n not in names, n
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_describe_sizes_vit_l14_336_on_meta_without_allocating():
    # Peak RSS growth across --describe, after the imports: 428M fp32 weights would add 1.6 GiB.
    code = ("import resource, sys; from pipeline.train import main; import pipeline.tasks.clip; "
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
            "main(sys.argv[1:]); print('growth_kb', peak() - before)")
    r = subprocess.run([sys.executable, "-c", code, "configs/clip/vit_l14_336.yaml", "--describe"],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    assert "parameters: 427944193" in r.stdout.splitlines()  # as open_clip counts
    assert "model:\n  name: ViT-L-14-336" in r.stdout  # the resolved config follows
    growth_gb = int(r.stdout.split("growth_kb")[1]) / 2**20
    assert growth_gb < 0.4, f"--describe grew the peak RSS by {growth_gb:.2f} GiB"


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16",
                                  "ViT-L-14", "ViT-L-14-336"])
def test_every_tower_builds_on_meta(name):
    task = ClipTask(config.load(TINY, [f"model.name={name}"]))
    model = task.build_model(device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert task.flops_per_sample() > 1e9


def test_train_transform_split_matches_open_clip():
    """Loader workers crop uint8 tensors and the device normalises the batch: the same crops (same random draws)
    and the same values as open_clip's PIL train transform, to within two grey levels (under 0.2 on average)."""
    import numpy as np
    from PIL import Image

    task = ClipTask(config.load(TINY, ["model.name=ViT-B-32"]))
    reference, ours = task.image_transform(train=True), task.transform(train=True)
    grey = 1 / 255 / min(task._train_image[1].std)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(256, 341), (512, 384), (150, 233), (224, 224), (400, 180)]):
        img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        torch.manual_seed(i)
        expected = reference(img)
        torch.manual_seed(i)
        sample = ours({"image": img, "text": "a red circle"})
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 224, 224)
        got = task.on_device({"image": sample["image"][None]}, torch.float32)["image"][0]
        diff = (got - expected).abs()
        assert diff.max() <= 2 * grey + 1e-6 and diff.mean() <= 0.2 * grey, (h, w, diff.max(), diff.mean())
    assert task.on_device({"image": sample["image"][None]}, torch.bfloat16)["image"].dtype == torch.bfloat16


def test_train_transform_refuses_augmentations_it_cannot_split():
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    from pipeline.tasks.clip import split_at_normalize

    jitter = image_transform_v2(PreprocessCfg(), is_train=True,
                                aug_cfg=AugmentationCfg(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8))
    with pytest.raises(ValueError, match="no uint8 tensor version"):
        split_at_normalize(jitter)
