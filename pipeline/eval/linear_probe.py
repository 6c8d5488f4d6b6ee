"""Linear probes: how linearly separable a frozen model's features are, the ImageGPT paper's per-layer probes
(Chen et al. 2020), the CLIP paper's linear-probe suite (Radford et al. 2021) and ViT's few-shot/linear evals.

A probe is an L-BFGS multinomial logistic regression on standardised features. Its inverse L2 strength C is chosen
on a stratified validation split of the training set (never on the test set), then refit on the whole training
set and scored once on the test set. `probe_layers` runs one probe per layer; `write_report` saves the results as
JSON plus a PNG of accuracy against depth (drawn with PIL: no plotting library is a dependency).

The fit is scikit-learn's (`backend="sklearn"`, the reference) or a full-batch torch L-BFGS on the same
objective (`backend="torch"`, on a GPU for sets of ImageNet's size, where scikit-learn's single-process fit takes
hours); tests check it reaches scikit-learn's accuracy on the same features. Features and labels may be numpy
arrays or torch tensors; torch is imported only by the torch backend, so the module loads in a CPU-only analysis
environment.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

# The CLIP paper sweeps the L2 strength lambda over 1e-6..1e6 in 96 log-spaced steps. Features are standardised
# here, which puts the useful range of C = 1/lambda within a few decades of 1, so a coarse 7-point log grid is the
# cheap default; pass a finer `Cs` for paper-grade numbers.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 7))


@dataclass
class ProbeResult:
    accuracy: float  # on the test set, with the chosen C, refit on train+val
    C: float  # the inverse regularisation chosen on the validation split
    val_accuracy: float  # best validation accuracy (the one that chose C)
    n_train: int
    n_test: int
    classes: int
    # (n_test, classes) class probabilities on the test set, columns in sorted label order: any metric later
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)  # the labels of those columns

    def record(self) -> dict:
        """Plain Python numbers only, so json.dumps takes it as it is."""
        return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in asdict(self).items()
                if k not in ("scores", "labels")}


class TorchLogistic:
    """Multinomial logistic regression fitted by full-batch L-BFGS in torch, with scikit-learn's objective
    (C * the summed cross-entropy + |W|^2 / 2, the intercept not penalised) and its interface (fit, predict,
    predict_proba, classes_, set_params(C=...)); warm starts from the last fit, as LogisticRegression(warm_start).
    Runs where the features are: pass torch tensors on the GPU, or numpy arrays and `device`."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, device: str | None = None, tol: float = 1e-6):
        self.C, self.max_iter, self.device, self.tol = C, max_iter, device, tol
        self._w = None

    def set_params(self, **params) -> "TorchLogistic":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def _tensor(self, x):
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.as_tensor(x).to(device, torch.float64 if device == "cpu" else torch.float32)

    def fit(self, x, y) -> "TorchLogistic":
        import torch

        x = self._tensor(x)
        self.classes_, y = np.unique(_numpy(y), return_inverse=True)
        y = torch.as_tensor(y, device=x.device)
        k = len(self.classes_)
        if self._w is None or self._w.shape != (x.shape[1] + 1, k):
            self._w = torch.zeros(x.shape[1] + 1, k, dtype=x.dtype, device=x.device)
        w = self._w.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([w], lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = x @ w[:-1] + w[-1]
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum") * self.C \
                + 0.5 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self._w = w.detach()
        return self

    def predict_proba(self, x) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self._tensor(x)
            return torch.softmax(x @ self._w[:-1] + self._w[-1], dim=1).double().cpu().numpy()

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]


def _standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """StandardScaler's transform with the statistics of `fit`, applied to it and to `others`."""
    scaler = StandardScaler().fit(fit)
    return [scaler.transform(a) for a in (fit, *others)]


def _numpy(x: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (any device; bf16/fp16 widened, as numpy has no bf16)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
    return np.asarray(x)


def _check(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features as (N, D) (trailing dimensions flattened) and labels as (N,), or a one-line ValueError."""
    x, y = _numpy(x), _numpy(y)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{name} set is empty")
    x = x.reshape(len(x), -1)
    if y.ndim != 1:
        raise ValueError(f"{name}_y must be 1-D labels, got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} labels")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{name}_x has {bad} of {len(x)} rows with non-finite features (NaN or inf)")
    return x, y


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Hold out `val_fraction` of the training set, stratified where every class can appear on both sides."""
    _, counts = np.unique(y, return_counts=True)
    n_val = math.ceil(val_fraction * len(y))
    stratify = counts.min() >= 2 and len(counts) <= min(n_val, len(y) - n_val)
    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=n_val, random_state=seed,
                                                  stratify=y if stratify else None)
    if len(np.unique(y_fit)) < 2:
        raise ValueError(f"too few training samples ({len(y)}) to hold out a validation split of {val_fraction}")
    return x_fit, x_val, y_fit, y_val


def probe(train_x, train_y, test_x, test_y, *, Cs=DEFAULT_CS, val_fraction: float = 0.2, seed: int = 0,
          max_iter: int = 1000, backend: str = "sklearn", device: str | None = None) -> ProbeResult:
    """Fit a linear probe on (train_x, train_y), choosing C on a held-out split of it; score it on the test set.

    Deterministic for a seed (the seed only draws the validation split: L-BFGS itself is deterministic).
    Ties in validation accuracy go to the smallest C, the strongest regularisation that does as well.
    backend: "sklearn" (the reference) or "torch" (TorchLogistic, on `device`: a GPU for large sets).
    """
    if backend not in ("sklearn", "torch"):
        raise ValueError(f"backend must be sklearn or torch, got {backend!r}")
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}")
    classes = len(np.unique(train_y))
    if classes < 2:
        raise ValueError(f"train_y has {classes} class; a probe needs at least 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or Cs[0] <= 0:
        raise ValueError(f"Cs must be positive and non-empty, got {Cs}")

    def model(**kwargs):
        if backend == "torch":
            return TorchLogistic(max_iter=max_iter, device=device, **kwargs)
        return LogisticRegression(solver="lbfgs", max_iter=max_iter, **kwargs)

    x_fit, x_val, y_fit, y_val = _split(train_x, train_y, val_fraction, seed)
    x_fit, x_val = _standardize(x_fit, x_val)  # statistics of the fitted features only
    # Strong to weak regularisation, each fit starting from the last one's weights: the small-C solutions are
    # near zero and quick, and each next one starts close to its own optimum.
    clf = model(warm_start=True) if backend == "sklearn" else model()  # TorchLogistic always starts warm
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe at max_iter is still a valid measurement
        for c in Cs:
            clf.set_params(C=c).fit(x_fit, y_fit)
            scores.append(float((clf.predict(x_val) == y_val).mean()))
        best = int(np.argmax(scores))  # first maximum: the smallest C
        x_all, x_test = _standardize(train_x, test_x)  # refit on train + val
        final = model(C=Cs[best]).fit(x_all, train_y)
        probabilities = final.predict_proba(x_test)
    accuracy = float((final.classes_[probabilities.argmax(1)] == test_y).mean())
    return ProbeResult(accuracy=accuracy, C=Cs[best], val_accuracy=scores[best], n_train=len(train_y),
                       n_test=len(test_y), classes=classes, scores=probabilities, labels=np.asarray(final.classes_))


def probe_layers(train: dict[str, Any], train_y, test: dict[str, Any], test_y, **kwargs) -> dict[str, ProbeResult]:
    """One probe per layer (the keys of `train`, in its order) on the same labels; kwargs go to `probe`."""
    missing = [k for k in train if k not in test]
    if missing:
        raise ValueError(f"test features lack layers {missing}")
    return {k: probe(train[k], train_y, test[k], test_y, **kwargs) for k in train}


def best_layer(results: dict[str, ProbeResult]) -> str:
    """The layer with the highest test accuracy (the first of equals: the shallowest, as the dict is ordered)."""
    return max(results, key=lambda k: results[k].accuracy)


def _ticks(lo: float, hi: float) -> tuple[float, float, float]:
    """A range within [0, 1] around accuracies [lo, hi], on a round step with at most 6 ticks: (start, stop, step)."""
    for step in (0.02, 0.05, 0.1, 0.2):
        start = max(0.0, math.floor(lo / step + 1e-9) * step)
        stop = min(1.0, max(math.ceil(hi / step - 1e-9) * step, start + step))
        start = min(start, stop - step)  # all accuracies 1.0: the range ends there
        if (stop - start) / step <= 6 + 1e-9:
            break
    return start, stop, step


def draw_layer_curve(results: dict[str, ProbeResult], title: str = "linear probe accuracy by layer",
                     size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Test accuracy against layer, one point per layer, the best one circled and labelled; the y-axis spans the
    accuracies on round ticks (a 0..1 axis would flatten the differences that matter), with chance level dashed
    where it falls inside. (figures.py's helpers tile images; it and checkpoint.py import torch, so nothing here
    imports them.)"""
    if not results:
        raise ValueError("no results to draw")
    width, height = size
    left, right, top, bottom = 56, 24, 32, 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    names, acc = list(results), [r.accuracy for r in results.values()]
    chance = 1 / max(r.classes for r in results.values())
    lo, hi, step = _ticks(min(acc), max(acc))
    n = len(names)
    x_of = lambda i: left + (i + 0.5) / n * (width - left - right)  # noqa: E731
    y_of = lambda a: height - bottom - (a - lo) / (hi - lo) * (height - top - bottom)  # noqa: E731

    draw.text((left, 8), title, fill="black")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for k in range(round((hi - lo) / step) + 1):
        a = lo + k * step
        draw.line([(left - 4, y_of(a)), (left, y_of(a))], fill="black")
        draw.line([(left + 1, y_of(a)), (width - right, y_of(a))], fill=(230, 230, 230))
        draw.text((8, y_of(a) - 6), f"{a:.2f}", fill="black")
    if lo <= chance <= hi:
        for x in range(left + 2, width - right, 8):
            draw.line([(x, y_of(chance)), (min(x + 4, width - right), y_of(chance))], fill=(150, 150, 150))
        draw.text((width - right - 40, y_of(chance) - 12), "chance", fill=(150, 150, 150))
    label_width = max(draw.textlength(s) for s in names) + 8
    every = max(1, math.ceil(n * label_width / (width - left - right)))
    for i in range(0, n, every):
        draw.line([(x_of(i), height - bottom), (x_of(i), height - bottom + 4)], fill="black")
        draw.text((x_of(i) - draw.textlength(names[i]) / 2, height - bottom + 8), names[i], fill="black")
    draw.text((width // 2 - 16, height - 16), "layer", fill="black")

    points = [(x_of(i), y_of(a)) for i, a in enumerate(acc)]
    if n > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    b = names.index(best_layer(results))
    x, y = points[b]
    draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(214, 39, 40), width=2)
    label = f"best: {names[b]}, {acc[b]:.1%}"
    lx = min(max(x - draw.textlength(label) / 2, left + 4), width - right - draw.textlength(label))
    draw.text((lx, max(y - 22, top - 12)), label, fill=(214, 39, 40))
    return image


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a .tmp sibling, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_report(results: dict[str, ProbeResult], out_dir: Path, name: str = "linear_probe",
                 **meta) -> tuple[Path, Path]:
    """out_dir/{name}.json (per-layer records, the best layer and its accuracy, plus `meta`) and
    out_dir/{name}.png (the curve). Returns (json_path, png_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_layer(results)
    report = {"layers": {k: r.record() for k, r in results.items()}, "best_layer": best,
              "best_accuracy": results[best].accuracy, **meta}
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    _atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode())
    buf = io.BytesIO()
    draw_layer_curve(results).save(buf, format="PNG")
    _atomic_write(png_path, buf.getvalue())
    return json_path, png_path
