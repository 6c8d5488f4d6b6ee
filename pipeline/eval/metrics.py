"""The per-dataset metrics of CLIP's 27-dataset evaluation suite (Radford et al. 2021, appendix A).

accuracy (top-1) for most datasets; mean per-class recall for FGVC Aircraft, Oxford Pets, Caltech-101 and
Flowers-102; 11-point interpolated mAP for Pascal VOC 2007; ROC-AUC for Hateful Memes; the mean of top-1 and top-5
accuracy for Kinetics-700. Written here, small and exact in float64, so a reported number does not depend on a
library's version; tests/test_eval_metrics.py checks each against scikit-learn or the VOC devkit's definition.

Ties are resolved against the model, never by class index, so relabelling classes or reordering samples cannot
change a number and a constant model gets no top-1 hit:
- top-k (and so accuracy, mean per-class recall, Kinetics): a sample is correct when fewer than k OTHER classes
  score >= its target's score. sklearn's `top_k_accuracy_score` instead breaks ties toward the higher class index
  and `argmax` toward the lower, so they agree with this only where the target's score is untied.
- VOC AP: tied scores are one threshold (all enter the ranking together), not the devkit's file order.
- ROC-AUC: a tied positive/negative pair counts one half (average ranks), exactly as sklearn.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy.stats import rankdata


def _numpy(x: Any) -> np.ndarray:
    """An array from a numpy array, a list or a torch tensor (without importing torch); floating tensors go
    through float64 first because numpy has no bfloat16."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _scores(scores: Any, ndim: int) -> np.ndarray:
    s = _numpy(scores)
    if s.ndim != ndim:
        raise ValueError(f"scores must be {ndim}-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError(f"scores are empty (shape {s.shape})")
    if not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values (nan or inf)")
    return s


def _targets(targets: Any, shape: tuple[int, ...], low: int, high: int) -> np.ndarray:
    """Integer targets of `shape` with values in [low, high); float labels are fine when integral."""
    t = _numpy(targets)
    if t.shape != shape:
        raise ValueError(f"targets have shape {t.shape}, scores need {shape}")
    if t.dtype == bool:
        t = t.astype(np.int64)
    if not np.issubdtype(t.dtype, np.number):
        raise ValueError(f"targets must be integers, got dtype {t.dtype}")
    if not np.issubdtype(t.dtype, np.integer):
        if not (np.isfinite(t).all() and (t == np.round(t)).all()):
            raise ValueError("targets must be integers, got non-integral values")
    t = t.astype(np.int64)
    if t.min() < low or t.max() >= high:
        bad = t[(t < low) | (t >= high)]
        raise ValueError(f"targets must lie in [{low}, {high - 1}], got {bad[0]} ({bad.size} out of range)")
    return t


def _top_k_hits(scores: Any, targets: Any, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(per-sample correct under the tie rule above, targets, number of classes)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    s = _scores(scores, 2)
    t = _targets(targets, s.shape[:1], 0, s.shape[1])
    target_score = s[np.arange(len(t)), t]
    rivals = (s >= target_score[:, None]).sum(axis=1) - 1  # the target itself is always >= itself
    return rivals < k, t, s.shape[1]


def top_k_accuracy(scores: Any, targets: Any, k: int = 1) -> float:
    """Fraction of samples whose target is among the top k of scores (N, C); targets (N,) class indices."""
    hits, _, _ = _top_k_hits(scores, targets, k)
    return float(hits.mean())


def mean_per_class_recall(scores: Any, targets: Any) -> float:
    """Mean over the classes present in targets of the fraction of their samples predicted right ("balanced
    accuracy"). Classes absent from targets have no recall and are left out, as in sklearn's
    `balanced_accuracy_score`; a right prediction is a top-1 hit under the module's tie rule."""
    hits, t, n_classes = _top_k_hits(scores, targets, 1)
    support = np.bincount(t, minlength=n_classes)
    right = np.bincount(t, weights=hits.astype(np.float64), minlength=n_classes)
    present = support > 0
    return math.fsum(right[present] / support[present]) / int(present.sum())  # exactly rounded: class order is moot


def _voc11_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """PASCAL VOC 2007 11-point AP of one class (devkit `VOCevalcls.m`): precision at recall >= t, maximised,
    averaged over t = 0, 0.1, ..., 1. Precision and recall are taken only at distinct scores so ties are one step."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold admits every tied sample at once
    tp = np.cumsum(positive)[last_of_tie]
    seen = np.flatnonzero(last_of_tie) + 1
    precision, n_pos = tp / seen, positive.sum()
    ap = 0.0
    for i in range(11):
        # recall >= i / 10 in integers: in floats 3 * 0.1 > 0.3, and a recall of exactly 3/10 would miss t = 0.3
        reached = 10 * tp >= i * n_pos
        ap += precision[reached].max() if reached.any() else 0.0
    return ap / 11


def voc11_map(scores: Any, targets: Any) -> float:
    """Mean over classes of the VOC 2007 11-point interpolated AP; scores (N, C), targets (N, C) with 1 positive,
    0 negative, -1 difficult (left out for that class). Classes without a positive have no AP and are left out,
    like absent classes in `mean_per_class_recall`."""
    s = _scores(scores, 2)
    t = _targets(targets, s.shape, -1, 2)
    aps = [_voc11_ap(s[t[:, c] >= 0, c], t[t[:, c] >= 0, c] == 1) for c in range(s.shape[1]) if (t[:, c] == 1).any()]
    if not aps:
        raise ValueError("voc11_map: no class has a positive target")
    return math.fsum(aps) / len(aps)


def roc_auc(scores: Any, targets: Any) -> float:
    """Binary ROC-AUC: the probability that a random positive outscores a random negative, ties counting one half
    (Mann-Whitney U from average ranks). scores (N,) or (N, 2) (column 1 is the positive class); targets in {0, 1}."""
    s = _numpy(scores)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    elif s.ndim != 1:
        raise ValueError(f"scores must have shape (N,) or (N, 2), got {s.shape}")
    s = _scores(s, 1)
    t = _targets(targets, s.shape, 0, 2)
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes in targets, got only class {t[0]}")
    ranks = rankdata(s)  # average ranks: a tie between a positive and a negative is worth 1/2
    return float((ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def kinetics_top1_top5_mean(scores: Any, targets: Any) -> float:
    """(top-1 + top-5) / 2, CLIP's Kinetics-700 metric."""
    return (top_k_accuracy(scores, targets, 1) + top_k_accuracy(scores, targets, 5)) / 2


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": top_k_accuracy,
    "mean_per_class_recall": mean_per_class_recall,
    "voc11_map": voc11_map,
    "roc_auc": roc_auc,
    "top1_top5_mean": kinetics_top1_top5_mean,
}


def compute(metric: str, scores: Any, targets: Any) -> float:
    """`METRICS[metric](scores, targets)`, with an error that lists the known names."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](scores, targets)
