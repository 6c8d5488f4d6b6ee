"""ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): supervised classification on timm's
VisionTransformer — models, initialisation, mixup/cutmix, RandAugment, losses and the checkpoint filter that
resamples position embeddings all come from timm.

Data: labelled shards (`{key}.cls`, from `data_tools from-folder`). Loader workers crop uint8 tensors (torchvision's
channels-last uint8 kernels, as CLIP's) and, when `model.randaugment` is set, run timm's RandAugment on the crop;
the device normalises the batch and applies mixup/cutmix (`on_device`). Evaluation during training: top-1/top-5
on `data.val` (pipeline/eval/classify.py). `model.init_from` starts from any checkpoint — ours, or a timm state
dict on disk — at another `model.image_size` (position embeddings resampled by 2-D interpolation) and
`model.num_classes` (a new head).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from pipeline import checkpoint, config
from pipeline.tasks.base import Evaluation, Task

log = logging.getLogger("pipeline")


@dataclass
class VitModelConfig(config.ModelConfig):
    num_classes: int = 1000
    image_size: Optional[int] = None  # default: the timm model's (224 for vit_*_224)
    # Overrides of the timm model's architecture, named as in the paper (tiny configs, ablations)
    patch_size: Optional[int] = None
    width: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    # The loss and the augmentations (the family's transform and on_device own them)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # timm Mixup alpha; 0: off
    cutmix: float = 0.0  # timm CutMix alpha; 0: off
    randaugment: Optional[str] = None  # timm's RandAugment spec, e.g. rand-m9-mstd0.5-inc1; null: off
    crop_scale: float = 0.08  # RandomResizedCrop's smallest area (Inception crop)
    # Start from these weights (fine-tuning): a run or checkpoint directory of ours, or a timm state dict file
    init_from: Optional[str] = field(default=None, metadata={"path": "exists", "read": "at start"})


@dataclass
class VitEvalConfig(config.EvalConfig):
    max_images: int = 0  # images of data.val per evaluation during training (0: all)


def _overrides(m: VitModelConfig) -> dict:
    names = {"patch_size": "patch_size", "width": "embed_dim", "layers": "depth", "heads": "num_heads"}
    return {timm_key: getattr(m, key) for key, timm_key in names.items() if getattr(m, key) is not None}


class VitTask(Task):
    ModelConfig = VitModelConfig
    EvalConfig = VitEvalConfig
    # timm's VisionTransformer initialises its children from the parent (init_weights): built whole, then split.
    zero_init = False

    @classmethod
    def check(cls, cfg: config.Config) -> None:
        m = cfg.model
        if not timm.is_model(m.name):
            raise config.ConfigError(f"model.name={m.name!r}: not a timm model (e.g. vit_base_patch16_224)")
        if m.num_classes < 1:
            raise config.ConfigError(f"model.num_classes={m.num_classes}: must be >= 1")
        size, patch = cls._size(cfg), m.patch_size or _timm_patch(m.name)
        if patch and size % patch:
            raise config.ConfigError(f"model.image_size={size} is not a multiple of the patch size {patch}")
        if (m.mixup or m.cutmix) and cfg.train.micro_batch_size % 2:
            raise config.ConfigError(f"model.mixup/cutmix pair the samples of a micro-batch: "
                                     f"train.micro_batch_size={cfg.train.micro_batch_size} must be even")
        if m.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(m.randaugment, {})
            except Exception as e:
                raise config.ConfigError(f"model.randaugment={m.randaugment!r}: {e}") from None

    @staticmethod
    def _size(cfg: config.Config) -> int:
        return cfg.model.image_size or _timm_size(cfg.model.name)

    @property
    def image_size(self) -> int:
        return self._size(self.cfg)

    def build_model(self, device="cpu", initial=True) -> nn.Module:
        m = self.cfg.model
        with torch.device(device):
            model = timm.create_model(m.name, pretrained=False, num_classes=m.num_classes, img_size=self.image_size,
                                      drop_path_rate=m.drop_path, **_overrides(m))
        if m.init_from and initial and str(device) != "meta":
            load_init(model, m.init_from)
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    @functools.cached_property
    def _data(self) -> dict:
        """timm's preprocessing config of this model (mean, std, crop_pct, interpolation)."""
        from timm.data import resolve_model_data_config

        return resolve_model_data_config(self.build_model(device="meta"))

    def transform(self, train: bool):
        size = self.image_size
        if train:
            return VitTrainTransform(size, self.cfg.model.crop_scale, self.cfg.model.randaugment, self._data["mean"])
        return VitEvalTransform(size, self._data["crop_pct"])

    def image_transform(self, train: bool):
        """PIL image -> normalised float tensor, as the model takes it (evaluation datasets, figures)."""
        return Normalized(self.transform(train), self._data["mean"], self._data["std"])

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return normalize(images, self._data["mean"], self._data["std"], dtype)

    @functools.cached_property
    def _mixup(self):
        m = self.cfg.model
        if not (m.mixup or m.cutmix):
            return None
        from timm.data import Mixup

        # Draws from numpy's global RNG: seeded per rank, saved and restored with the checkpoints.
        return Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, label_smoothing=m.label_smoothing,
                     num_classes=m.num_classes)

    def on_device(self, batch, dtype):
        batch["image"] = self.normalize(batch["image"], dtype)
        if self._mixup is not None:  # soft targets: mixed one-hot labels, smoothed
            batch["image"], batch["target"] = self._mixup(batch["image"], batch["label"])
        return batch

    def loss(self, model, batch):
        logits = model(batch["image"])
        if "target" in batch:  # mixup/cutmix soft targets
            return SoftTargetCrossEntropy()(logits.float(), batch["target"]), {}
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.cfg.model.label_smoothing)
        return loss, {"top1": (logits.argmax(-1) == batch["label"]).float().mean().item()}

    def loss_forward(self, model, batch):
        return model(batch["image"])

    export_format = "timm"  # our state dict is timm's: timm.create_model(..., pretrained_cfg_overlay=dict(file=...))

    def decode_size(self) -> int:
        return self.image_size

    def input_size(self) -> tuple[int, str]:
        return self.image_size, "keep_ratio"  # the train transform crops from the whole image

    @classmethod
    def input_size_of(cls, model_name: str) -> tuple[int, str] | None:
        if not (model_name.startswith(("vit_", "deit")) and timm.is_model(model_name)):
            return None
        return _timm_size(model_name), "keep_ratio"

    def example_batch(self, batch_size, device):
        size = self.image_size
        return {"image": torch.zeros(batch_size, 3, size, size, device=device),
                "label": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def loader_batch(self, batch_size):
        batch = self.example_batch(batch_size, "meta")
        batch["image"] = batch["image"].to(torch.uint8)  # normalised on the device (on_device)
        return batch

    def evaluates(self) -> bool:
        return bool(self.cfg.data.val)

    def evaluate(self, model, device, dtype) -> Evaluation:
        from pipeline.eval.classify import classify, labelled_batches

        batches = labelled_batches(self.cfg.data.val, self.transform(train=False), self.cfg.eval.batch_size,
                                   self.cfg.eval.num_workers, self.cfg.eval.max_images)
        r = classify(model, batches, self.cfg.model.num_classes, lambda x: self.normalize(x, dtype), device)
        return Evaluation({"eval/top1": r["top1"], "eval/top5": r["top5"], "eval/mean_per_class": r["mean_per_class"]},
                          summary=f"val ({r['n']} images): top1 {r['top1']:.4f} top5 {r['top5']:.4f} "
                                  f"(chance {1 / self.cfg.model.num_classes:.4f})")

    def features(self, model, images):
        """timm's pre-logits: the pooled, normed token the head reads (the ViT paper's linear evaluation)."""
        return {"pre_logits": model.forward_head(model.forward_features(images), pre_logits=True)}


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> (x / 255 - mean) / std in `dtype`."""
    mean = torch.tensor(mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(std, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std).to(dtype)


class Normalized:
    """Picklable: a uint8 transform's image, normalised."""

    def __init__(self, transform, mean, std):
        self.transform, self.mean, self.std = transform, mean, std

    def __call__(self, img) -> torch.Tensor:
        return normalize(self.transform.image(img), self.mean, self.std)


def _timm_size(name: str) -> int:
    cfg = timm.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def _timm_patch(name: str) -> int | None:
    import re

    found = re.search(r"patch(\d+)", name)
    return int(found.group(1)) if found else None


class VitTrainTransform:
    """Picklable (loader workers): PIL image + label -> uint8 crop tensor + label. Inception crop and flip on the
    uint8 tensor; timm's RandAugment (PIL operations) on the crop when asked."""

    def __init__(self, size: int, scale: float, randaugment: str | None, mean):
        self.crop = v2.Compose([v2.RandomResizedCrop(size, scale=(scale, 1.0), antialias=True,
                                                     interpolation=InterpolationMode.BICUBIC),
                                v2.RandomHorizontalFlip()])
        self.augment = None
        if randaugment:
            from timm.data.auto_augment import rand_augment_transform

            self.augment = rand_augment_transform(randaugment, {"img_mean": tuple(round(255 * x) for x in mean),
                                                                "translate_const": int(size * 0.45)})

    def image(self, img) -> torch.Tensor:
        out = self.crop(pil_to_tensor(img))
        return pil_to_tensor(self.augment(to_pil_image(out))) if self.augment is not None else out

    def __call__(self, sample: dict) -> dict:
        return {"image": self.image(sample["image"]), "label": torch.tensor(sample["label"])}


class VitEvalTransform:
    """Resize the shorter side to size / crop_pct and centre-crop, on uint8 tensors (timm's eval transform)."""

    def __init__(self, size: int, crop_pct: float):
        self.steps = v2.Compose([v2.Resize(int(size / crop_pct), antialias=True,
                                           interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(size)])

    def image(self, img) -> torch.Tensor:
        return self.steps(pil_to_tensor(img))

    def __call__(self, sample: dict) -> dict:
        return {"image": self.image(sample["image"]), "label": torch.tensor(sample["label"])}


def load_init(model: nn.Module, path: str) -> None:
    """Start from `path`'s weights: position embeddings resampled to this model's patch grid (timm's
    checkpoint_filter_fn: 2-D bicubic), the head replaced when the classes differ. Anything else that does not
    fit is refused, naming the keys."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint.load_weights(path)
    before = tuple(state["pos_embed"].shape) if "pos_embed" in state else None
    state = checkpoint_filter_fn(state, model)
    notes = []
    if before and tuple(state["pos_embed"].shape) != before:
        notes.append(f"pos_embed {before[1]} -> {state['pos_embed'].shape[1]} tokens (2-D bicubic)")
    head = model.get_classifier()
    if "head.weight" in state and state["head.weight"].shape != head.weight.shape:
        notes.append(f"head replaced ({state['head.weight'].shape[0]} -> {head.weight.shape[0]} classes)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ (another width, depth...)
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise config.ConfigError(f"model.init_from={path}: does not fit {model.__class__.__name__} "
                                 f"({lines[0] if lines else str(e).splitlines()[0]})") from None
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise config.ConfigError(f"model.init_from={path}: does not fit {model.__class__.__name__} (missing "
                                 f"{sorted(set(missing) - {'head.weight', 'head.bias'})[:3]}, unexpected "
                                 f"{sorted(unexpected)[:3]})")
    log.info("model.init_from %s%s", path, f": {'; '.join(notes)}" if notes else "")
