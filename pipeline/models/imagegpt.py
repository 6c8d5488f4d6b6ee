"""ImageGPT (Chen et al. 2020, "Generative Pretraining from Pixels"): a GPT-2 transformer over palette tokens, as
OpenAI's released code defines it, so that its weights map one to one onto `transformers`' ImageGPT.

- Pre-norm blocks; the norm is not mean-centred: x / sqrt(mean(x^2) + eps) * g, a gain and no bias (OpenAI's
  `norm`, `transformers`' ImageGPTLayerNorm).
- Learned position embeddings; quick-GELU MLP of 4 d; no dropout (the paper trains without).
- Untied input embedding of vocab + 1 rows and output head of vocab: the extra row is the start token of the
  autoregressive objective (the input is [start, x_0 .. x_{n-2}], predicting x_0 .. x_{n-1}) and the mask token of
  the BERT one.
- Attention is torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs), causal or not.
- Every module initialises only its own parameters, in its own constructor: deepspeed.zero.Init may then partition
  each one as it is built (iGPT-XL's 6.8B parameters never sit whole on one rank).
Parameter names are GPT-2's (`wte`, `h.N.attn.c_attn`, ...); `to_hf`/`from_hf` add the `transformer.` prefix and
transpose the projections into/out of the Conv1D layout `transformers` keeps from TensorFlow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

EPS = 1e-5


@dataclass
class GPTShape:
    vocab: int = 512  # palette colours; the embedding has one row more (start / mask token)
    positions: int = 1024  # resolution^2 tokens
    width: int = 512
    layers: int = 24
    heads: int = 8


class Linear(nn.Linear):
    """nn.Linear initialised as GPT-2: N(0, std) weights, zero bias, in its own constructor (zero.Init)."""

    def __init__(self, fan_in: int, fan_out: int, std: float = 0.02, bias: bool = True):
        self.std = std
        super().__init__(fan_in, fan_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, rows: int, width: int, std: float):
        self.std = std
        super().__init__(rows, width)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class Norm(nn.Module):
    """OpenAI's iGPT norm: scaled by the root mean square, not centred; a gain, no bias."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares in fp32 whatever the compute dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.heads = s.heads
        self.c_attn = Linear(s.width, 3 * s.width)
        self.c_proj = Linear(s.width, s.width, std=0.02 / math.sqrt(2 * s.layers))  # GPT-2: residual branches scaled

    def forward(self, x: torch.Tensor, causal: bool, cache: dict | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.c_attn(x).split(d, -1))
        if cache is not None:  # sampling: keys and values of the tokens before these ones
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            causal = causal and t > 1  # one new query sees every cached key
        if causal and k.shape[2] != t:
            raise ValueError("a cached causal step takes one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.c_fc = Linear(s.width, 4 * s.width)
        self.c_proj = Linear(4 * s.width, s.width, std=0.02 / math.sqrt(2 * s.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # quick GELU, as OpenAI's iGPT and CLIP


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = Norm(s.width), Attention(s), Norm(s.width), MLP(s)

    def forward(self, x: torch.Tensor, causal: bool, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, cache)
        return x + self.mlp(self.ln_2(x))


class ImageGPT(nn.Module):
    """tokens (B, T) int64, ids in [0, vocab] (vocab: the start / mask token) -> logits (B, T, vocab)."""

    def __init__(self, shape: GPTShape, num_classes: int = 0, grad_checkpointing: bool = False):
        super().__init__()
        self.shape, self.grad_checkpointing = shape, grad_checkpointing
        self.wte = Embedding(shape.vocab + 1, shape.width, std=0.02)
        self.wpe = Embedding(shape.positions, shape.width, std=0.01)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.ln_f = Norm(shape.width)
        self.lm_head = Linear(shape.width, shape.vocab, bias=False)
        # Fine-tuning for classification: logits of the average-pooled final features (the paper's section 3.4)
        self.classifier = Linear(shape.width, num_classes, std=0.0) if num_classes else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (timm's name)."""
        self.grad_checkpointing = enable

    @property
    def start_token(self) -> int:
        return self.shape.vocab

    def hidden(self, tokens: torch.Tensor, causal: bool = True, caches: list[dict] | None = None,
               offset: int = 0, keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The residual stream after the last block, and (keep=True) the one after the embedding and each block."""
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        kept = [x] if keep else []
        for i, block in enumerate(self.h):
            if self.grad_checkpointing and self.training and caches is None:
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal, caches[i] if caches is not None else None)
            if keep:
                kept.append(x)
        return x, kept

    def forward(self, tokens: torch.Tensor, causal: bool = True, classify: bool = False):
        """Token logits (B, T, vocab); classify=True: (token logits, class logits of the average-pooled final
        features) — the fine-tuning objective reads both."""
        n = self.ln_f(self.hidden(tokens, causal)[0])
        logits = self.lm_head(n)
        return (logits, self.classifier(n.mean(1))) if classify else logits

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, causal: bool = True) -> list[torch.Tensor]:
        """The paper's probe features f_l: after the embedding and after each block l, normed by the norm that reads
        it next (block l+1's ln_1, ln_f after the last) and average-pooled over positions -> (layers + 1) x (B, d)."""
        _, kept = self.hidden(tokens, causal, keep=True)
        norms = [block.ln_1 for block in self.h] + [self.ln_f]
        return [norm(h).mean(1).float() for norm, h in zip(norms, kept)]

    @torch.no_grad()
    def sample(self, prefix: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Autoregressive sampling with a key/value cache: tokens (B, P) of the image so far (P may be 0) ->
        (B, length) tokens, the prefix kept. Temperature divides the logits; top_k > 0 keeps the k likeliest."""
        b = prefix.shape[0]
        out = prefix
        inputs = torch.cat([torch.full((b, 1), self.start_token, dtype=torch.long, device=prefix.device), prefix], 1)
        caches, offset = [{} for _ in self.h], 0
        while out.shape[1] < length:
            x, _ = self.hidden(inputs, causal=True, caches=caches, offset=offset)
            offset += inputs.shape[1]
            logits = self.lm_head(self.ln_f(x[:, -1])).float() / max(temperature, 1e-6)
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            inputs = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out = torch.cat([out, inputs], 1)
        return out


def n_params(shape: GPTShape) -> int:
    """Parameters of the generative model, from its shape alone (12 d^2 + 11 d per block)."""
    d = shape.width
    return (shape.vocab + 1 + shape.positions) * d + shape.layers * (12 * d * d + 11 * d) + d + d * shape.vocab


# ---------------------------------------------------------------------------------------------------- transformers

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> `transformers`' ImageGPTForCausalImageModeling's (Conv1D weights are (in, out))."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        if key.endswith(_CONV1D):
            value = value.t()
        out[key if key.startswith("lm_head.") else f"transformer.{key}"] = value.contiguous()
    return out


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformers`' ImageGPT state dict (causal-modelling or bare model) -> ours; the causal mask buffers of old
    checkpoints are dropped, and the classification head of ImageGPTForImageClassification is not read."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key.startswith("score."):
            continue
        out[key] = value.t() if key.endswith(_CONV1D) else value
    return out


def hf_config(shape: GPTShape) -> dict:
    """config.json of `transformers`' ImageGPTForCausalImageModeling for this shape (dropout off, as trained)."""
    return {"model_type": "imagegpt", "architectures": ["ImageGPTForCausalImageModeling"],
            "vocab_size": shape.vocab + 1, "n_positions": shape.positions, "n_embd": shape.width,
            "n_layer": shape.layers, "n_head": shape.heads, "n_inner": None, "activation_function": "quick_gelu",
            "layer_norm_epsilon": EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": False,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True}


def shape_of_hf(cfg: dict) -> GPTShape:
    inner = cfg.get("n_inner")
    if inner not in (None, 4 * cfg["n_embd"]) or cfg.get("activation_function", "quick_gelu") != "quick_gelu":
        raise ValueError(f"an ImageGPT with n_inner={inner} and activation {cfg.get('activation_function')}: "
                         "ours has an MLP of 4 x n_embd and quick GELU")
    return GPTShape(vocab=cfg["vocab_size"] - 1, positions=cfg["n_positions"], width=cfg["n_embd"],
                    layers=cfg["n_layer"], heads=cfg["n_head"])
