"""ImageGPT's palette: RGB pixels <-> tokens, the nearest of k colours (k = 512: 9-bit colour).

Shared by the ImageGPT task (loader workers quantise), sampling (tokens back to pixels) and `data_tools palette`
(which fits the centres by k-means and imports the pixel path from here, so that it clusters exactly the pixels the
model sees). A palette file is float32 (k, 3), RGB in [-1, 1]: uint8 value v <-> v / 127.5 - 1 (0 -> -1, 255 -> 1),
the convention of OpenAI's released `kmeans_centers.npy` and of `transformers.ImageGPTImageProcessor(clusters=...)`.
numpy only at import: torch tensors are accepted (and returned on their device) when the caller has torch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCALE = 127.5  # uint8 v <-> v / SCALE - 1
CHUNK_ELEMENTS = 2**22  # pixels x centres per step of the nearest-centre search: 16 MB of float32 distances


def model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB pixels (size, size, 3) uint8 of an image as ImageGPT sees it: centre square, resized to size.

    Shrinking averages areas (BOX, as OpenCV's INTER_AREA in img2dataset), so no colour appears that was not
    mixed from the image's own; enlarging uses LANCZOS, as img2dataset does. Shards made with `data_tools download
    --target configs/imagegpt/s.yaml` are already 32 x 32 and pass through unchanged."""
    image = image.convert("RGB")
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        shrink = image.size[0] > size
        image = image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def to_unit(pixels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 RGB -> the palette's scale, [-1, 1]."""
    return pixels.astype(dtype) / SCALE - 1


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a tensor means the caller has it
    return torch is not None and isinstance(x, torch.Tensor)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)


def _nearest_chunks(x, centres, with_distance: bool = False):
    """(ids, squared distances or None) per chunk of x (n, 3) in [-1, 1], numpy or torch alike.

    argmin |x - c|^2 = argmin |c|^2 - 2 x.c; a chunk of CHUNK_ELEMENTS distances at a time bounds memory. numpy
    takes x.c as a matmul (float32 BLAS, 3x the multiply-adds' speed: what a loader worker runs); torch as three
    multiply-adds, exact float32 whatever the device (a GPU matmul may run in TF32)."""
    norms = (centres * centres).sum(1)
    chunk = max(1, CHUNK_ELEMENTS // len(centres))
    for start in range(0, len(x), chunk):
        p = x[start:start + chunk]
        if isinstance(p, np.ndarray):
            scores = norms - 2 * (p @ centres.T)
        else:
            scores = norms - 2 * (p[:, 0:1] * centres[:, 0] + p[:, 1:2] * centres[:, 1] + p[:, 2:3] * centres[:, 2])
        ids = scores.argmin(1)
        yield ids, (scores.min(1) + (p * p).sum(1) if with_distance else None)


def quantize(images, centres):
    """RGB pixels (..., 3) -> palette token ids (...) int64: the nearest centre (first on ties).

    `images`: uint8 (or any integer type) on the 0-255 scale, or float already in [-1, 1], channels last; numpy
    in, numpy out; a torch tensor in, a tensor out on its device (GPU quantisation of a batch in the training
    step). Memory is bounded by chunks, not by the batch size."""
    if images.shape[-1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected RGB channels last (..., 3)")
    shape = tuple(images.shape[:-1])
    if _is_tensor(images):
        import torch

        c = torch.as_tensor(centres).to(images.device, torch.float32)
        x = images.reshape(-1, 3)
        x = x.float() if x.is_floating_point() else x.float() / SCALE - 1
        ids = torch.empty(len(x), dtype=torch.int64, device=images.device)
    else:
        images = np.asarray(images)
        c = _numpy(centres).astype(np.float32)
        x = images.reshape(-1, 3)
        x = x.astype(np.float32) if images.dtype.kind == "f" else to_unit(x)
        ids = np.empty(len(x), dtype=np.int64)
    start = 0
    for chunk_ids, _ in _nearest_chunks(x, c):
        ids[start:start + len(chunk_ids)] = chunk_ids
        start += len(chunk_ids)
    return ids.reshape(shape)


def palette_colours(centres) -> np.ndarray:
    """Centres in [-1, 1] -> (k, 3) uint8 RGB, rounded to the nearest level."""
    return np.clip(np.rint((_numpy(centres).astype(np.float64) + 1) * SCALE), 0, 255).astype(np.uint8)


def dequantize(ids, centres):
    """Token ids (...) -> uint8 RGB (..., 3): each id's centre on the 0-255 scale (numpy or torch, like ids)."""
    colours = palette_colours(centres)
    if _is_tensor(ids):
        import torch

        return torch.as_tensor(colours, device=ids.device)[ids.long()]
    return colours[np.asarray(ids)]


def load_palette(path: str | os.PathLike) -> np.ndarray:
    """PALETTE.npy -> centres (k, 3) float32 in [-1, 1]; anything else is refused naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such palette file")
    try:
        centres = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a .npy palette ({type(e).__name__}: {e})") from None
    if not isinstance(centres, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: an .npz archive, not a palette array")
    if centres.ndim != 2 or centres.shape[1] != 3 or len(centres) == 0 or centres.dtype.kind != "f":
        raise ValueError(f"{path}: palette of shape {centres.shape} and dtype {centres.dtype}, "
                             "expected (k, 3) float")
    if not np.isfinite(centres).all() or np.abs(centres).max() > 1 + 1e-6:
        raise ValueError(f"{path}: palette values outside [-1, 1] (is it on the 0-255 scale?)")
    return centres.astype(np.float32)
