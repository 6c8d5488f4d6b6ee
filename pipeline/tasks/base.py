"""The interface every model family implements; `pipeline/train.py` knows nothing else about a family."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pipeline import config
from pipeline.config import Config, ModelConfig


@dataclass
class Evaluation:
    """A family's evaluation during training: scalars for TensorBoard (`eval/...`), images (name -> a (3, H, W)
    tensor, uint8 or float in [0, 1]) and one line for the log."""

    scalars: dict[str, float]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: str = ""

_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "pos_embed", "cls_token", "logit_scale", "wpe", "wte")


class Task:
    ModelConfig: type[ModelConfig] = ModelConfig
    EvalConfig: type[config.EvalConfig] = config.EvalConfig  # the family's eval.* keys
    # True when every module initialises only its own parameters, in its own __init__: then ZeRO-3 may partition
    # parameters while the model is built (deepspeed.zero.Init), which would skip a parent's re-initialisation
    # of its children's weights.
    zero_init: bool = False

    def __init__(self, cfg: Config):
        self.check(cfg)
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse, with a ConfigError, what only the family knows is impossible (an unknown model name...)."""

    def build_model(self, device: str | torch.device = "cpu", initial: bool = True) -> nn.Module:
        """device="meta" sizes the model without allocating it (--describe, launch plan). `initial`: load the
        weights the config starts from (fine-tuning); False when a checkpoint's weights come next."""
        raise NotImplementedError

    def transform(self, train: bool) -> Callable[[dict], dict]:
        """Decoded sample dict (PIL image, caption str, label int...) -> dict of tensors."""
        raise NotImplementedError

    def on_device(self, batch: dict, dtype: torch.dtype) -> dict:
        """The rest of the transform, on the device over the whole batch (e.g. uint8 -> normalised `dtype`): what
        is cheap there but costly per image in a loader worker."""
        return batch

    def image_transform(self, train: bool) -> Callable:
        """PIL image -> tensor, as the model expects it (evaluation datasets use it directly)."""
        raise NotImplementedError

    def decode_size(self) -> int | None:
        """Shorter image side the train transform needs; larger JPEGs are decoded at reduced size (pipeline/data.py).
        None: always decode at full size."""
        return None

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch; the dict's scalars go to TensorBoard under train/."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, device: str | torch.device) -> dict:
        """A batch of the right shapes, for FLOP counting on the meta device."""
        raise NotImplementedError

    def loader_batch(self, batch_size: int) -> dict:
        """A batch as the loader workers deliver it, before `on_device` (on the meta device: `launch plan` sizes the
        batches loader workers hold in host memory). Default: the model's batch."""
        return self.example_batch(batch_size, "meta")

    def after_step(self, engine) -> None:
        """Called after each optimizer step (e.g. clamping CLIP's temperature)."""

    def evaluates(self) -> bool:
        """Whether the config gives this family something to evaluate during training (every eval.every steps and
        at the end)."""
        return False

    def evaluate(self, model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> Evaluation:
        """The family's evaluation of `model` (whole, in eval mode), on rank 0 while the other ranks wait."""
        raise NotImplementedError

    def features(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features of a batch of `image_transform(train=False)` outputs, for linear probes: {name: (B, d)},
        one entry per layer probed (ImageGPT: every layer), in depth order."""
        raise NotImplementedError(f"task {type(self).__name__} does not give features for linear probes")

    def zero_shot(self, model: nn.Module) -> tuple[nn.Module, Callable] | None:
        """(a model with open_clip's encode_image / encode_text, its tokenizer) for zero-shot classification over
        class-name prompts; None when the family has no text tower."""
        return None

    def input_size(self) -> tuple[int, str]:
        """(image side, img2dataset resize mode) this run's data is best stored at (`data_tools download --target
        CONFIG`)."""
        raise NotImplementedError

    @classmethod
    def input_size_of(cls, model_name: str) -> tuple[int, str] | None:
        """The same for a model name of this family (`--target ViT-L-14-336`), or None when it is not one."""
        return None

    export_format: str = "torch"  # `pipeline.export --format`: the library that loads the export back
    export_suffix: str = ".pt"  # "" when the export is a directory

    def export(self, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        """Write a consolidated fp32 state dict in the family's library format (open_clip, timm, transformers)."""
        torch.save(state_dict, path)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay for norms, biases, embeddings and scalars such as logit_scale."""
        decay, no_decay = [], []
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                skip = (p.ndim < 2 or name == "bias" or isinstance(module, _NO_DECAY_MODULES)
                        or full.split(".")[-1] in _NO_DECAY_NAMES)
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward = 3x forward), counted on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        model = self.build_model(device="meta")
        # two samples: BatchNorm in training mode refuses a single value per channel (a ResNet's last stage at 1x1)
        batch = self.example_batch(2, "meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.loss_forward(model, batch)
        return 3.0 * counter.get_total_flops() / 2

    def loss_forward(self, model: nn.Module, batch: dict) -> Any:
        """The model's forward on a batch, without the loss (for FLOP counting). Defaults to model(**batch)."""
        return model(**batch)
