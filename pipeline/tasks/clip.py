"""CLIP (Radford et al. 2021): models, tokenizer, transforms and loss all come from open_clip.

Our only addition is holding `logit_scale` with shape [1] instead of []: DeepSpeed 0.19.8 cannot broadcast 0-dim
parameters ("self.dim() cannot be 0 to view Float as Byte" in deepspeed.initialize and zero.Init). `export`
converts it back, so exported state dicts load in open_clip unchanged.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import open_clip
import torch
import torch.distributed as dist
from open_clip.transform import MaybeConvertMode, PreprocessCfg, image_transform_v2
from torch import nn
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from pipeline import config
from pipeline.tasks.base import Evaluation, Task

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "models" / "open_clip_configs"
open_clip.add_model_config(MODEL_CONFIGS)  # our tiny CPU configs beside open_clip's RN50 ... ViT-L-14-336



class _QuietFromScratch(logging.Filter):
    """open_clip warns on every rank that no pretrained weights were loaded: pretraining from scratch is the point."""

    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietFromScratch())
# open_clip's ClipLoss gathers with torch.distributed.nn.all_gather, which torch 2.14 flags on every step.
warnings.filterwarnings("ignore", message=r".*all_gather.* is deprecated", category=FutureWarning)

MAX_LOGIT_SCALE = math.log(100)  # the paper clips the temperature so logits are scaled by at most 100


@dataclass
class ClipEvalConfig(config.EvalConfig):
    # Local labelled dataset (ImageFolder + classnames.txt), zero-shot top-1/top-5 during training; checked at
    # start by rank 0, which evaluates (pipeline/preflight.py)
    zeroshot: Optional[str] = field(default=None, metadata={"path": "imagefolder", "read_by": "main"})
    # A subset of the 27-dataset suite (pipeline/eval/suite.py), comma-separated names, zero-shot with the paper's
    # metrics on at most suite_max_images test images each, from suite_root (one folder per dataset)
    suite: Optional[str] = None
    suite_root: Optional[str] = field(default=None, metadata={"path": "dir", "read_by": "main"})
    suite_max_images: int = 500


@dataclass
class ClipModelConfig(config.ModelConfig):
    local_loss: bool = False  # each rank scores its own images against all texts: O(n) instead of O(n^2)/rank
    gather_with_grad: bool = True  # all-gather features with gradients (required for exact gradients)
    grad_checkpointing: bool = False
    # ResNet towers on GPUs: convolutions in channels-last (NHWC) layout, which tensor-core kernels read without
    # transposing. The batch goes to the model in that layout, and convolutions follow their input's layout
    # (cuDNN and oneDNN pick channels-last when the input is). The weights stay NCHW: DeepSpeed views parameters as
    # bytes to broadcast and flattens them into contiguous buffers, neither of which takes NHWC strides.
    channels_last: bool = False


class ClipTask(Task):
    ModelConfig = ClipModelConfig
    EvalConfig = ClipEvalConfig
    # open_clip's TextTransformer.init_parameters() re-initialises its children's weights after they are built:
    # under zero.Init those are already partitioned and the re-initialisation silently does nothing. CLIP towers
    # (at most 623M parameters, RN50x64) are built whole in host memory and partitioned by deepspeed.initialize.
    zero_init = False

    @classmethod
    def check(cls, cfg: config.Config) -> None:
        if cfg.model.name not in open_clip.list_models():
            raise config.ConfigError(
                f"model.name={cfg.model.name!r}: not an open_clip model config "
                f"(e.g. RN50, ViT-B-32, ViT-L-14-336, CLIP-tiny)")
        if cfg.eval.suite:
            from pipeline.eval import suite

            try:
                suite.get(cfg.eval.suite)
            except ValueError as e:
                raise config.ConfigError(f"eval.suite={cfg.eval.suite}: {str(e).split(': ', 1)[1]}") from None
            if not cfg.eval.suite_root:
                raise config.ConfigError("eval.suite needs eval.suite_root, the folder that holds its datasets")

    def __init__(self, cfg: config.Config):
        super().__init__(cfg)
        self.tokenizer = open_clip.get_tokenizer(cfg.model.name)
        self._loss = None

    def build_model(self, device="cpu", initial=True) -> nn.Module:
        with torch.device(device):
            model = open_clip.create_model(self.cfg.model.name, device=device, output_dict=True)
        # Before deepspeed.initialize, which cannot broadcast a 0-dim parameter (module docstring).
        model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
        if self.cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def image_transform(self, train: bool):
        with torch.device("meta"):
            model = open_clip.create_model(self.cfg.model.name, device="meta")
        return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=train)

    @functools.cached_property
    def _train_image(self) -> tuple[v2.Compose, transforms.Normalize]:
        return split_at_normalize(self.image_transform(train=True))

    def transform(self, train: bool):
        if not train:
            raise ValueError("CLIP evaluates with image_transform(train=False)")
        return ClipTransform(self._train_image[0], self.tokenizer)

    def on_device(self, batch, dtype):
        batch["image"] = normalize_uint8(batch["image"], self._train_image[1], dtype)
        if self.cfg.model.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def loss(self, model, batch):
        if self._loss is None:  # built lazily: rank and world size are known once the process group exists
            distributed = dist.is_available() and dist.is_initialized()
            self._loss = open_clip.ClipLoss(
                local_loss=self.cfg.model.local_loss, gather_with_grad=self.cfg.model.gather_with_grad,
                cache_labels=True, rank=dist.get_rank() if distributed else 0,
                world_size=dist.get_world_size() if distributed else 1)
        out = model(image=batch["image"], text=batch["text"])
        loss = self._loss(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"logit_scale": out["logit_scale"].detach().float().item()}

    def decode_size(self) -> int:
        return self.input_size()[0]

    def input_size(self) -> tuple[int, str]:
        return self.input_size_of(self.cfg.model.name)

    @classmethod
    def input_size_of(cls, model_name: str) -> tuple[int, str] | None:
        """open_clip's image size; stored keeping the ratio (the train transform crops from the whole image)."""
        if model_name not in open_clip.list_models():
            return None
        size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
        return (max(size) if isinstance(size, (list, tuple)) else size), "keep_ratio"

    def evaluates(self) -> bool:
        return bool(self.cfg.eval.zeroshot or self.cfg.eval.suite)

    def evaluate(self, model, device, dtype) -> Evaluation:
        from pipeline.eval.zeroshot import evaluate

        scalars, summary = {}, []
        if self.cfg.eval.zeroshot:
            r = evaluate(model, self.tokenizer, self.cfg.eval.zeroshot, self.image_transform(train=False),
                         batch_size=self.cfg.eval.batch_size, device=device, dtype=dtype,
                         num_workers=self.cfg.eval.num_workers)
            scalars.update({"eval/zeroshot_top1": r["top1"], "eval/zeroshot_top5": r["top5"]})
            summary.append(f"zero-shot {r['dataset']}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} "
                           f"(chance {r['chance']:.4f})")
        if self.cfg.eval.suite:
            for name, (metric, value) in self._suite.evaluate(model, device, dtype).items():
                scalars[f"eval/{name}/{metric}"] = value
                summary.append(f"{name} {metric} {value:.4f}")
        return Evaluation(scalars, summary="; ".join(summary))

    @functools.cached_property
    def _suite(self):
        from pipeline.eval.suite_run import TrainingSubset

        e = self.cfg.eval
        return TrainingSubset(e.suite, e.suite_root, self.image_transform(train=False), self.tokenizer,
                              e.suite_max_images, e.batch_size, e.num_workers)

    def features(self, model, images):
        """The image embedding, as the CLIP paper's linear probes use it."""
        return {"image_embedding": model.encode_image(images)}

    def zero_shot(self, model):
        return model, self.tokenizer

    def example_batch(self, batch_size, device):
        size = open_clip.get_model_config(self.cfg.model.name)["vision_cfg"]["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        ctx = self.tokenizer.context_length
        return {"image": torch.zeros(batch_size, 3, *size, device=device),
                "text": torch.zeros(batch_size, ctx, dtype=torch.long, device=device)}

    def loader_batch(self, batch_size):
        batch = self.example_batch(batch_size, "meta")
        batch["image"] = batch["image"].to(torch.uint8)  # normalised on the device (on_device)
        return batch

    def after_step(self, engine) -> None:
        # Clamp the learned log-temperature at ln(100), on the fp32 master copy too (ZeRO / mixed precision).
        engine.clamp_(engine.module.logit_scale, 0.0, MAX_LOGIT_SCALE)

    export_format = "open_clip"

    def export(self, state_dict, path):
        torch.save(to_open_clip(state_dict), path)


def to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> open_clip's: logit_scale back to a 0-dim tensor."""
    out = dict(state_dict)
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def from_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    out["logit_scale"] = out["logit_scale"].reshape(1)
    return out


class ClipTransform:
    """Picklable (DataLoader workers): PIL image + caption -> uint8 image tensor + token ids.

    open_clip's train transform, cut where it turns uint8 pixels into floats. Its random resized crop runs here on
    the uint8 tensor with torchvision's channels-last uint8 bicubic kernel: 3x faster than PIL's, the same crop
    boxes from the same random draws, pixels within two grey levels (under 0.2 on average). ToTensor + Normalize
    run on the device over the whole batch (`ClipTask.on_device`), so workers also ship a quarter of the bytes.
    Evaluation keeps open_clip's PIL transform (`image_transform`)."""

    def __init__(self, crop: v2.Compose, tokenizer):
        self.crop, self.tokenizer = crop, tokenizer

    def __call__(self, sample: dict) -> dict:
        return {"image": self.crop(pil_to_tensor(sample["image"])), "text": self.tokenizer(sample["text"])[0]}


def split_at_normalize(preprocess: transforms.Compose) -> tuple[v2.Compose, transforms.Normalize]:
    """open_clip's train Compose [RandomResizedCrop, MaybeConvertMode, MaybeToTensor, Normalize] -> (the crop on
    uint8 tensors, the Normalize). Anything else (colour jitter, timm augmentations) is refused, not dropped."""
    *head, to_tensor, normalize = preprocess.transforms
    steps = []
    for t in head:
        if isinstance(t, transforms.RandomResizedCrop):
            steps.append(v2.RandomResizedCrop(t.size, t.scale, t.ratio, t.interpolation, antialias=True))
        elif not isinstance(t, MaybeConvertMode):  # decode_image already gives RGB
            raise ValueError(f"open_clip train transform step {t!r}: no uint8 tensor version here")
    if not isinstance(to_tensor, transforms.ToTensor) or not isinstance(normalize, transforms.Normalize):
        raise ValueError(f"open_clip train transform {preprocess!r}: expected ... ToTensor, Normalize at the end")
    return v2.Compose(steps), normalize


def normalize_uint8(images: torch.Tensor, normalize: transforms.Normalize, dtype: torch.dtype) -> torch.Tensor:
    """ToTensor + Normalize over a batch of uint8 images, with the same float32 operations as open_clip's
    per-image transform (so the same values), then cast to the engine's precision."""
    mean = torch.tensor(normalize.mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(normalize.std, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std).to(dtype)
