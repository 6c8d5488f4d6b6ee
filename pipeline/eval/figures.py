"""The ViT paper's Figure 7 (Dosovitskiy et al. 2021), from a trained timm VisionTransformer:

1. the first 28 principal components of the patch-embedding filters, as RGB tiles;
2. the cosine similarity between each patch's position embedding and all the others', one tile per patch;
3. the mean attention distance of each head against depth: per image, query patch and head, the distance in
   pixels between the query's and each key's patch centres, weighted by the attention between them (over image
   patches: the class token is left out and the weights renormalised over the patches), averaged over the query
   patches and the images.

The computations are plain functions of tensors (tested on inputs with known answers); `draw_*` render them with
PIL (no plotting library is needed) as the PNGs `python -m pipeline.eval vit-figures` writes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

# ------------------------------------------------------------------------------------------------ computations


def filter_components(weight: torch.Tensor, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding filters (D, 3, P, P) -> their first k principal components (k, 3, P, P), unit norm, and the
    share of the variance each explains. Components are the right singular vectors of the centred filters."""
    d, c, p, q = weight.shape
    x = weight.detach().float().reshape(d, c * p * q)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    variance = s**2 / (s**2).sum()
    k = min(k, vt.shape[0])
    return vt[:k].reshape(k, c, p, q), variance[:k]


def position_similarity(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings of the patches (N, D), N = rows x cols -> cosine similarities (rows, cols, rows, cols):
    [i, j] is the map of patch (i, j)'s similarity to every patch."""
    e = torch.nn.functional.normalize(pos_embed.detach().float(), dim=-1)
    rows, cols = grid
    return (e @ e.T).reshape(rows, cols, rows, cols)


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, N) distances in pixels between the centres of the grid's patches, row-major."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    centres = torch.stack([y.flatten(), x.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def attention_distance(attention: torch.Tensor, grid: tuple[int, int], patch_size: int,
                       prefix: int = 1) -> torch.Tensor:
    """Attention of one layer (B, H, T, T), T = prefix tokens + patches -> each head's mean attention distance in
    pixels (H,): the distance between query and key patches weighted by the attention among the patches
    (renormalised over them), averaged over the query patches and the images."""
    a = attention.detach().float()[:, :, prefix:, prefix:]
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    d = patch_distances(grid, patch_size).to(a.device)
    return (a * d).sum(dim=-1).mean(dim=(0, 2))


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities (B, H, T, T) for `images`, from a timm VisionTransformer: its fused
    attention kernel is switched off for the pass, and the probabilities are read where timm computes them (the
    input of `attn_drop`)."""
    maps, hooks, fused = [], [], []
    for block in model.blocks:
        fused.append(block.attn.fused_attn)
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0].detach())))
    try:
        model(images)
    finally:
        for block, was in zip(model.blocks, fused):
            block.attn.fused_attn = was
        for h in hooks:
            h.remove()
    return maps


# ---------------------------------------------------------------------------------------------------- drawing


def _tile(images: list[np.ndarray], columns: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Equal-sized HxWx3 uint8 arrays -> one grid image on white."""
    h, w = images[0].shape[:2]
    h, w = h * scale, w * scale
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, arr in enumerate(images):
        tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return canvas


def draw_components(components: torch.Tensor, scale: int = 8) -> Image.Image:
    """Figure 7 left: each component as an RGB tile, stretched to [0, 255]; 7 to a row, as the paper."""
    tiles = []
    for c in components:
        x = c.permute(1, 2, 0).numpy()
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
        tiles.append((x * 255).round().astype(np.uint8))
    return _tile(tiles, columns=7, scale=scale)


_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def _colour(values: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    t = np.clip((values - lo) / (hi - lo), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return ((1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1]).round().astype(np.uint8)


def draw_similarity(similarity: torch.Tensor, scale: int = 6) -> Image.Image:
    """Figure 7 centre: one tile per patch (its row and column in the grid), coloured by cosine similarity."""
    rows, cols = similarity.shape[:2]
    tiles = [_colour(similarity[i, j].numpy()) for i in range(rows) for j in range(cols)]
    return _tile(tiles, columns=cols, pad=1, scale=scale)


def draw_distances(distances: list[torch.Tensor], image_size: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """Figure 7 right: mean attention distance (pixels) of every head against network depth (layer)."""
    width, height = size
    left, right, top, bottom = 56, 16, 16, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    layers, y_max = len(distances), float(image_size)  # a distance spans at most the image's diagonal / sqrt(2)
    x_of = lambda layer: left + (layer - 0.5) / layers * (width - left - right)  # noqa: E731
    y_of = lambda d: height - bottom - d / y_max * (height - top - bottom)  # noqa: E731
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for tick in range(0, int(y_max) + 1, max(1, int(y_max) // 4)):
        draw.line([(left - 4, y_of(tick)), (left, y_of(tick))], fill="black")
        draw.text((4, y_of(tick) - 6), str(tick), fill="black")
    for layer in range(1, layers + 1, max(1, layers // 8)):
        draw.text((x_of(layer) - 4, height - bottom + 6), str(layer), fill="black")
    draw.text((width // 2 - 60, height - 16), "network depth (layer)", fill="black")
    draw.text((4, top - 14), "mean attention distance (pixels)", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for layer, heads in enumerate(distances, start=1):
        for h, d in enumerate(heads.tolist()):
            x, y = x_of(layer), y_of(min(d, y_max))
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=palette[h % len(palette)])
    return image


def to_chw(image: Image.Image) -> torch.Tensor:
    """A PIL image as the (3, H, W) uint8 tensor TensorBoard's add_image takes."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
