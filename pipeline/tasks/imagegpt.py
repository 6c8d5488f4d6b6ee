"""ImageGPT (Chen et al. 2020, "Generative Pretraining from Pixels"): generative pretraining on palette tokens.

Data: any image shards. Loader workers take each image's centre square at `model.resolution` (32, 48 or 64 px:
1,024 / 2,304 / 4,096 tokens), flip it at random when training, and map each pixel to the nearest of the
`model.palette` colours (pipeline/models/palette.py; the palette comes from `data_tools palette`). Tokens travel
as int16.
Objectives (`model.objective`): `ar`, next-pixel prediction in raster order; `bert`, 15 % of the tokens replaced by
the mask token and predicted from the rest (bidirectional attention). Both log bits per dimension: the negative
log-likelihood of a token in bits over its 3 colour dimensions, as PixelCNN and iGPT report it.
Evaluation during training: validation bits/dim on `data.val`, and (AR) unconditional samples and completions of the
top half of held-out images, as image grids for TensorBoard. With `model.num_classes` it fine-tunes for
classification as the paper does: a linear head on the average-pooled final features, the generative loss kept as
an auxiliary term (`model.gen_loss_weight`), top-1 on `data.val`. `model.init_from` starts from a run of ours or a
`transformers` ImageGPT directory (pipeline.export --format hf writes one).
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint, config
from pipeline.models import imagegpt as gpt
from pipeline.models.palette import dequantize, load_palette, model_pixels, quantize
from pipeline.tasks.base import Evaluation, Task

log = logging.getLogger("pipeline")

# The paper's models (table of section 4): name -> (layers, width, heads)
PRESETS = {"igpt-s": (24, 512, 8), "igpt-m": (36, 1024, 8), "igpt-l": (48, 1536, 16), "igpt-xl": (60, 3072, 16)}
OBJECTIVES = ("ar", "bert")


@dataclass
class ImageGPTModelConfig(config.ModelConfig):
    name: str = "igpt-s"  # a preset (igpt-s/m/l/xl); width/layers/heads override it
    resolution: int = 32  # side in pixels: the paper's 32, 48 or 64 (tiny configs go lower)
    palette: Optional[str] = field(default=None, metadata={"path": "file", "read": "at start"})  # data_tools palette
    vocab: int = 512  # palette colours (9-bit colour)
    objective: str = "ar"  # ar | bert
    mask_prob: float = 0.15  # BERT: share of the tokens masked
    width: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    grad_checkpointing: bool = False
    flip: bool = True  # random horizontal flips of training images
    # Fine-tuning for classification (> 0 classes): loss = gen_loss_weight x generative loss + classification loss
    num_classes: int = 0
    gen_loss_weight: float = 1.0
    # Start from these weights: a run or checkpoint of ours, or a transformers ImageGPT directory (config.json...)
    init_from: Optional[str] = field(default=None, metadata={"path": "exists", "read": "at start"})


@dataclass
class ImageGPTEvalConfig(config.EvalConfig):
    max_images: int = 1024  # images of data.val per evaluation during training (0: all)
    samples: int = 8  # unconditional samples and completions per evaluation (AR; 0: none)
    temperature: float = 1.0
    top_k: int = 0  # sample from the k likeliest colours (0: all)


class ImageGPTTask(Task):
    ModelConfig = ImageGPTModelConfig
    EvalConfig = ImageGPTEvalConfig
    zero_init = True  # every module initialises its own parameters (pipeline/models/imagegpt.py)

    @classmethod
    def check(cls, cfg: config.Config) -> None:
        m = cfg.model
        if m.name not in PRESETS:
            raise config.ConfigError(f"model.name={m.name!r}: not an ImageGPT preset ({', '.join(PRESETS)})")
        if m.objective not in OBJECTIVES:
            raise config.ConfigError(f"model.objective={m.objective!r}: must be ar or bert")
        if m.resolution < 2:
            raise config.ConfigError(f"model.resolution={m.resolution}: must be at least 2")
        shape = cls._shape(cfg)
        if shape.width % shape.heads:
            raise config.ConfigError(f"model.width={shape.width} is not divisible by model.heads={shape.heads}")
        if not 0 < m.mask_prob < 1:
            raise config.ConfigError(f"model.mask_prob={m.mask_prob}: must be within (0, 1)")
        if m.num_classes < 0:
            raise config.ConfigError(f"model.num_classes={m.num_classes}: must be >= 0")
        if cfg.data.train and not m.palette:
            raise config.ConfigError("model.palette: a training run needs the palette its tokens come from "
                                     "(python -m data_tools palette SHARDS)")

    @staticmethod
    def _shape(cfg: config.Config) -> gpt.GPTShape:
        m = cfg.model
        layers, width, heads = PRESETS[m.name]
        return gpt.GPTShape(vocab=m.vocab, positions=m.resolution ** 2, width=m.width or width,
                            layers=m.layers or layers, heads=m.heads or heads)

    @property
    def shape(self) -> gpt.GPTShape:
        return self._shape(self.cfg)

    def build_model(self, device="cpu", initial=True) -> nn.Module:
        m = self.cfg.model
        with torch.device(device):
            model = gpt.ImageGPT(self.shape, m.num_classes, m.grad_checkpointing)
        if m.init_from and initial and str(device) != "meta":
            load_init(model, m.init_from)
        return model

    # ------------------------------------------------------------------------------------------------ data

    @functools.cached_property
    def palette(self) -> np.ndarray:
        path = self.cfg.model.palette
        if not path:
            raise config.ConfigError("model.palette: not set (python -m data_tools palette SHARDS)")
        try:
            centres = load_palette(path)
        except (OSError, ValueError) as e:
            raise config.ConfigError(f"model.palette={e}") from None
        if len(centres) != self.cfg.model.vocab:
            raise config.ConfigError(f"model.palette={path}: {len(centres)} colours, model.vocab is "
                                     f"{self.cfg.model.vocab}")
        return centres

    def transform(self, train: bool):
        """Training: {"tokens"}; evaluation: the tokens as the "image" that labelled datasets yield (classify.py)."""
        if train:
            return Tokenize(self.cfg.model.resolution, self.palette, flip=self.cfg.model.flip,
                            need_label=self.cfg.model.num_classes > 0)
        return Tokenize(self.cfg.model.resolution, self.palette, flip=False, key="image")

    def image_transform(self, train: bool):
        return Tokenize(self.cfg.model.resolution, self.palette, flip=False).tokens

    def decode_size(self) -> int:
        return self.cfg.model.resolution

    def input_size(self) -> tuple[int, str]:
        return self.cfg.model.resolution, "center_crop"  # what model_pixels keeps: the centre square

    @classmethod
    def input_size_of(cls, model_name: str) -> tuple[int, str] | None:
        """igpt-s .. igpt-xl, optionally with the resolution: igpt-l-48."""
        found = re.fullmatch(r"(igpt-(?:s|m|l|xl))(?:-(\d+))?", model_name)
        if not found:
            return None
        return int(found.group(2) or (64 if found.group(1) == "igpt-xl" else 32)), "center_crop"

    def on_device(self, batch, dtype):
        batch["tokens"] = batch["tokens"].long()
        if self.cfg.model.objective == "bert":
            # numpy's global RNG: seeded per rank and saved with each checkpoint (resume is exact)
            draw = torch.from_numpy(np.random.random_sample(tuple(batch["tokens"].shape)))
            batch["mask"] = (draw < self.cfg.model.mask_prob).to(batch["tokens"].device)
        return batch

    # ------------------------------------------------------------------------------------------------ objective

    def inputs(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's input for image tokens: AR shifts right behind the start token, BERT masks."""
        start = self.cfg.model.vocab
        if self.cfg.model.objective == "ar":
            return torch.cat([torch.full_like(tokens[:, :1], start), tokens[:, :-1]], 1)
        return tokens if mask is None else tokens.masked_fill(mask, start)

    def nll(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(mean NLL in nats of the predicted tokens, their count, class logits or None)."""
        tokens, mask = batch["tokens"], batch.get("mask")
        causal = self.cfg.model.objective == "ar"
        out = model(self.inputs(tokens, mask), causal=causal, classify=bool(self.cfg.model.num_classes))
        logits, classes = out if isinstance(out, tuple) else (out, None)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
        if causal:
            return losses.mean(), tokens.new_tensor(tokens.numel()), classes
        picked = mask.flatten()
        n = picked.sum()
        return (losses * picked).sum() / n.clamp(min=1), n, classes

    def loss(self, model, batch):
        nll, _, classes = self.nll(model, batch)
        logs = {"bits_per_dim": nll.item() / (3 * math.log(2))}
        if classes is None:
            return nll, logs
        cls = F.cross_entropy(classes.float(), batch["label"])
        logs.update(gen_loss=nll.item(), cls_loss=cls.item(),
                    top1=(classes.argmax(-1) == batch["label"]).float().mean().item())
        return self.cfg.model.gen_loss_weight * nll + cls, logs

    def loss_forward(self, model, batch):
        return model(self.inputs(batch["tokens"]), causal=self.cfg.model.objective == "ar",
                     classify=bool(self.cfg.model.num_classes))

    def example_batch(self, batch_size, device):
        batch = {"tokens": torch.zeros(batch_size, self.shape.positions, dtype=torch.long, device=device)}
        if self.cfg.model.num_classes:
            batch["label"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return batch

    def loader_batch(self, batch_size):
        batch = self.example_batch(batch_size, "meta")
        batch["tokens"] = batch["tokens"].to(torch.int16)
        return batch

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluates(self) -> bool:
        return bool(self.cfg.data.val)

    def evaluate(self, model, device, dtype) -> Evaluation:
        e = self.cfg.eval
        nll, tokens, correct, labelled, held_out = 0.0, 0, 0, 0, []
        rng = np.random.RandomState(0)  # the same BERT masks at every evaluation: comparable figures
        for images, labels in self.val_batches(e.max_images):
            batch = {"tokens": images.long().to(device), "label": labels.to(device)}
            if self.cfg.model.objective == "bert":
                batch["mask"] = torch.from_numpy(rng.random_sample(tuple(images.shape)) < self.cfg.model.mask_prob
                                                 ).to(device)
            mean, n, classes = self.nll(model, batch)
            nll, tokens = nll + mean.item() * n.item(), tokens + n.item()
            if classes is not None and (labels >= 0).any():
                known = batch["label"] >= 0
                correct += (classes.argmax(-1) == batch["label"])[known].sum().item()
                labelled += known.sum().item()
            if sum(map(len, held_out)) < e.samples:
                held_out.append(images[:e.samples])
        if not tokens:
            raise ValueError(f"data.val={self.cfg.data.val}: no readable image")
        bpd = nll / tokens / (3 * math.log(2))
        scalars = {"eval/bits_per_dim": bpd}
        summary = f"val bits/dim {bpd:.4f} ({tokens} tokens)"
        if labelled:
            scalars["eval/top1"] = correct / labelled
            summary += f", top1 {correct / labelled:.4f} ({labelled} images)"
        images = {}
        if e.samples and self.cfg.model.objective == "ar" and held_out:
            images = self.sample_grids(model, torch.cat(held_out)[:e.samples].long().to(device))
        return Evaluation(scalars, images, summary)

    def features(self, model, images):
        """The paper's f_l for l = 0 (the embedding) .. layers: normed, average-pooled (pipeline/models/imagegpt.py),
        from the objective's own input (AR: behind the start token; BERT: nothing masked)."""
        tokens = images.long()
        hidden = model.features(self.inputs(tokens), causal=self.cfg.model.objective == "ar")
        return {("embedding" if i == 0 else f"layer_{i}"): h for i, h in enumerate(hidden)}

    def val_batches(self, max_images: int = 0):
        from pipeline.eval.classify import labelled_batches

        return labelled_batches(self.cfg.data.val, self.transform(train=False), self.cfg.eval.batch_size,
                                self.cfg.eval.num_workers, max_images, labelled=False)

    def sample_grids(self, model, held_out: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """{"samples/unconditional": grid, "samples/completions": grid}: (3, H, W) uint8. Completions show, per
        image, the original, its top half given to the model, and the model's completion."""
        e, n = self.cfg.eval, len(held_out)
        gen = torch.Generator(held_out.device).manual_seed(seed)  # the same draws at every evaluation
        positions = self.shape.positions
        empty = held_out[:, :0]
        free = model.sample(empty, positions, e.temperature, e.top_k, gen)
        half = held_out[:, :positions // 2]
        completed = model.sample(half, positions, e.temperature, e.top_k, gen)
        given = torch.cat([half, torch.full_like(held_out[:, positions // 2:], -1)], 1)
        return {"samples/unconditional": self.grid(free),
                "samples/completions": self.grid(torch.stack([held_out, given, completed], 1).flatten(0, 1),
                                                  per_row=3 * max(1, min(n, 4)))}

    def grid(self, tokens: torch.Tensor, per_row: int = 8) -> torch.Tensor:
        """Token rows (N, T) -> one uint8 image grid (3, H, W); id -1 is drawn grey (not given)."""
        from torchvision.utils import make_grid

        r = self.cfg.model.resolution
        rgb = dequantize(tokens.clamp(min=0).cpu(), self.palette).view(-1, r, r, 3).permute(0, 3, 1, 2).clone()
        rgb[(tokens.cpu() < 0).view(-1, 1, r, r).expand_as(rgb)] = 128
        return make_grid(rgb, nrow=per_row, padding=1, pad_value=255)

    # ------------------------------------------------------------------------------------------------ interop

    export_format, export_suffix = "hf", ""  # a directory

    def export(self, state_dict, path):
        """A `transformers` ImageGPTForCausalImageModeling directory: config.json, model.safetensors and, when
        the palette is readable, preprocessor_config.json for ImageGPTImageProcessor (same token ids as ours)."""
        import json

        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(gpt.to_hf(state_dict), str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(gpt.hf_config(self.shape), indent=2) + "\n")
        try:
            clusters = self.palette.tolist()
        except config.ConfigError as e:
            log.warning("no preprocessor_config.json: %s", e)
            return
        r = self.cfg.model.resolution
        (path / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "ImageGPTImageProcessor", "clusters": clusters, "do_color_quantize": True,
             "do_normalize": True, "do_resize": True, "size": {"height": r, "width": r}, "resample": 2}) + "\n")


class Tokenize:
    """Picklable (loader workers): sample {"image": PIL, "label"?} -> {key: (T,) int16 tokens, "label"?}."""

    def __init__(self, resolution: int, palette: np.ndarray, flip: bool, key: str = "tokens",
                 need_label: bool = False):
        self.resolution, self.palette, self.flip, self.key = resolution, palette, flip, key
        self.need_label = need_label  # fine-tuning: a sample without one is skipped and counted by the loader

    def tokens(self, image) -> torch.Tensor:
        pixels = model_pixels(image, self.resolution)
        if self.flip and np.random.random_sample() < 0.5:  # numpy: seeded per batch in the loader (resume)
            pixels = pixels[:, ::-1]
        return torch.from_numpy(quantize(pixels, self.palette).reshape(-1).astype(np.int16))

    def __call__(self, sample: dict) -> dict:
        if self.need_label and "label" not in sample:
            raise ValueError("no .cls label (model.num_classes > 0 trains on labelled shards: data_tools from-folder)")
        out = {self.key: self.tokens(sample["image"])}
        if "label" in sample:
            out["label"] = torch.tensor(sample["label"])
        return out


def load_init(model: gpt.ImageGPT, path: str) -> None:
    """Start from `path`'s weights (ours, or a transformers ImageGPT directory): position embeddings resampled to
    this resolution (timm's 2-D bicubic resample_abs_pos_embed), a new classification head. Anything else that does
    not fit is refused, naming the keys."""
    from timm.layers import resample_abs_pos_embed

    state = checkpoint.load_weights(path)
    if (Path(path) / "config.json").is_file() or any(k.startswith("transformer.") for k in state):
        state = gpt.from_hf(state)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    notes = []
    old, new = state.get("wpe.weight"), model.wpe.weight
    if old is not None and old.shape != new.shape and math.isqrt(len(old)) ** 2 == len(old):
        r0, r = math.isqrt(len(old)), math.isqrt(len(new))
        state["wpe.weight"] = resample_abs_pos_embed(old[None].float(), new_size=[r, r], old_size=[r0, r0],
                                                     num_prefix_tokens=0)[0]
        notes.append(f"position embeddings {r0}x{r0} -> {r}x{r} (2-D bicubic)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise config.ConfigError(f"model.init_from={path}: does not fit this ImageGPT "
                                 f"({lines[0] if lines else str(e).splitlines()[0]})") from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise config.ConfigError(f"model.init_from={path}: does not fit this ImageGPT (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    if model.classifier is not None:
        notes.append(f"new classification head ({model.classifier.out_features} classes)")
    log.info("model.init_from %s%s", path, f": {'; '.join(notes)}" if notes else "")
