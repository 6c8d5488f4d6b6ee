"""ViT on timm without processes: the paper's sizes, the cluster plan, transforms and losses, weights from another
resolution, the --target registry, and Figure 7's computations on inputs whose answers are known."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.tasks import get_task, input_size

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/vit/tiny_cpu.yaml")


def _task(path: str, *overrides: str):
    cfg = config.load(path, list(overrides))
    return get_task(cfg.task)(cfg)


@pytest.mark.parametrize("name,params,tolerance", [
    ("b16", 86e6, 0.015), ("l16", 307e6, 0.015), ("h14", 632e6, 0.015),
    # the /32 models hold a patch embedding 4x the /16 one's (32 x 32 x 3 x width): 2.4M more for Base
    ("b32", 86e6, 0.03), ("l32", 307e6, 0.015)])
def test_sizes_are_the_papers(name, params, tolerance):
    """Table 1 of the paper, at 1,000 classes, on the meta device."""
    model = _task(f"{ROOT}/configs/vit/{name}.yaml", "model.num_classes=1000").build_model(device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(params, rel=tolerance), n


def test_h14_fits_the_clusters_with_the_config_settings():
    from launch import plan

    v100 = plan.make(f"{ROOT}/configs/vit/h14.yaml", "v100", 16)
    assert v100.fits and v100.precision == "fp16" and v100.ranks == 128 and v100.accumulation == 1
    a100 = plan.make(f"{ROOT}/configs/vit/h14.yaml", "a100", 16)
    assert a100.fits and a100.precision == "bf16" and a100.total < 0.25 * a100.capacity


def test_targets_come_from_the_task_registry():
    assert input_size("vit_large_patch16_224") == (224, "keep_ratio")
    assert input_size("ViT-L-14-336") == (336, "keep_ratio")
    assert input_size(TINY) == (32, "keep_ratio")
    assert input_size(f"{ROOT}/configs/clip/vit_l14_336.yaml") == (336, "keep_ratio")
    with pytest.raises(config.ConfigError, match="--target nonsense: neither a config file nor a model name"):
        input_size("nonsense")


def test_config_refusals_are_one_line():
    for overrides, message in [(["model.name=vit_nonexistent"], "not a timm model"),
                               (["model.image_size=30"], "not a multiple of the patch size 4"),
                               (["model.mixup=0.8", "train.micro_batch_size=127", "train.global_batch_size=254"],
                                "must be even"),
                               (["model.randaugment=m9-rand"], "model.randaugment"),
                               (["optim.decay=step"], "cosine or linear")]:
        with pytest.raises(config.ConfigError, match=message) as e:
            config.load(TINY, overrides)
        assert "\n" not in str(e.value)


def test_loader_ships_uint8_crops_and_the_device_normalises_and_mixes():
    from PIL import Image

    task = _task(TINY, "model.mixup=0.8", "model.cutmix=1.0", "model.label_smoothing=0.1",
                 "model.randaugment=rand-m9-mstd0.5")
    out = task.transform(train=True)({"image": Image.new("RGB", (48, 40), (200, 10, 10)), "label": 3})
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 32, 32) and out["label"] == 3
    batch = {"image": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 3])}
    batch = task.on_device(batch, torch.float32)
    assert batch["image"].dtype == torch.float32 and batch["target"].shape == (4, 24)  # soft targets
    assert torch.allclose(batch["target"].sum(-1), torch.ones(4))
    model = task.build_model()
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss) and loss > 0
    plain = _task(TINY, "model.label_smoothing=0.1")
    b = plain.on_device({"image": batch["image"].new_zeros(4, 3, 32, 32, dtype=torch.uint8),
                         "label": torch.tensor([0, 1, 2, 3])}, torch.float32)
    loss, logs = plain.loss(plain.build_model(), b)
    assert "target" not in b and 0 <= logs["top1"] <= 1


def test_init_from_resamples_position_embeddings_and_replaces_the_head(tmp_path):
    """A 32 px, 24-class model's weights start a 48 px, 10-class one: the 8x8 grid of position embeddings is
    interpolated to 12x12, the head is new, every other weight is the source's."""
    source = _task(TINY).build_model()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    target = _task(TINY, "model.image_size=48", "model.num_classes=10",
                   f"model.init_from={tmp_path / 'timm.pth'}").build_model()
    assert source.pos_embed.shape == (1, 65, 96) and target.pos_embed.shape == (1, 145, 96)
    assert torch.equal(target.pos_embed[0, 0], source.pos_embed[0, 0])  # the class token's is kept as it is
    grid = source.pos_embed[0, 1:].reshape(8, 8, 96).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", antialias=True)
    assert torch.allclose(target.pos_embed[0, 1:].reshape(12, 12, 96).permute(2, 0, 1)[None], expected, atol=1e-5)
    assert target.head.weight.shape == (10, 96)
    assert torch.equal(target.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    with pytest.raises(config.ConfigError, match="does not fit"):  # another architecture is refused, named
        _task(TINY, "model.width=64", f"model.init_from={tmp_path / 'timm.pth'}").build_model()


# ---------------------------------------------------------------------------------------- Figure 7, known answers


def test_attention_distance_of_hand_built_maps():
    from pipeline.eval.figures import attention_distance, patch_distances

    grid, patch = (4, 4), 8
    n = 16
    # head 0: every patch attends to itself (distance 0); head 1: to the patch one to its right (8 px), the last
    # column to the one on its left; head 2: uniform over the patches (the mean of all pairwise distances);
    # the class token's row and column carry weight that must not count.
    a = torch.zeros(2, 3, n + 1, n + 1)
    a[:, :, :, 0] = 0.5
    for q in range(n):
        a[:, 0, q + 1, q + 1] = 0.5
        right = q + 1 if q % 4 != 3 else q - 1
        a[:, 1, q + 1, right + 1] = 0.5
    a[:, 2, 1:, 1:] = 0.5 / n
    d = attention_distance(a, grid, patch)
    uniform = patch_distances(grid, patch).mean()
    assert d.tolist() == pytest.approx([0.0, 8.0, float(uniform)])
    assert float(uniform) == pytest.approx(sum(math.dist(divmod(i, 4), divmod(j, 4)) for i in range(16)
                                               for j in range(16)) / 256 * patch)


def test_pca_recovers_filters_built_from_known_components():
    from pipeline.eval.figures import filter_components

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3 * 4 * 4, 3, generator=g))[0].T  # 3 orthonormal filters of 3x4x4
    centred = torch.randn(500, 3, generator=g)
    centred -= centred.mean(dim=0)
    # uncorrelated coefficients of decreasing variance: the basis is then exactly the principal directions
    coefficients = torch.linalg.qr(centred)[0] * torch.tensor([5.0, 2.0, 1.0]) * 500**0.5
    weight = (coefficients @ basis + 0.01 * torch.randn(500, 48, generator=g)).reshape(500, 3, 4, 4)
    components, variance = filter_components(weight, k=3)
    for found, true in zip(components.reshape(3, -1), basis):
        assert abs(float(found @ true)) == pytest.approx(1.0, abs=1e-3)  # the same direction, up to sign
    assert variance[0] > variance[1] > variance[2] and float(variance.sum()) > 0.99


def test_position_similarity_maps():
    from pipeline.eval.figures import draw_similarity, position_similarity

    pos = torch.randn(9, 16)
    s = position_similarity(pos, (3, 3))
    assert s.shape == (3, 3, 3, 3) and torch.allclose(s[1, 2, 1, 2], torch.tensor(1.0))
    assert torch.allclose(s[0, 1].flatten(), torch.nn.functional.cosine_similarity(pos[1:2], pos))
    assert draw_similarity(s).size[0] > 3 * 3


def test_linear_probe_features_are_timms_pre_logits():
    """`Task.features` (the suite's linear probes): on what image_transform(train=False) gives, the pooled, normed
    token the head reads, one (B, width) entry."""
    from PIL import Image

    task = _task(TINY)
    model = task.build_model().eval()
    images = torch.stack([task.image_transform(train=False)(Image.new("RGB", (40, 36), c))
                          for c in ((200, 10, 10), (10, 200, 10))])
    with torch.no_grad():
        features = task.features(model, images)
        logits = model(images)
    assert list(features) == ["pre_logits"] and features["pre_logits"].shape == (2, model.embed_dim)
    assert torch.allclose(model.head(features["pre_logits"]), logits, atol=1e-6)
