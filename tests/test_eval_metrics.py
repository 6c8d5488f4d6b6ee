"""CLIP's per-dataset metrics (pipeline/eval/metrics.py) against scikit-learn on the same predictions, and VOC
11-point mAP, which sklearn lacks, against re-implementations of the devkit's definition and hand-computed values."""
import ast
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score,
                             top_k_accuracy_score)

from pipeline.eval import metrics
from pipeline.eval.metrics import (METRICS, compute, kinetics_top1_top5_mean, mean_per_class_recall, roc_auc,
                                   top_k_accuracy, voc11_map)

SEEDS = range(5)


def _classification(seed: int, n: int = 300, c: int = 12, absent: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tie-free scores (N, C) and targets with uneven class sizes; the last `absent` classes never occur as
    targets but are still predicted. Scores lean toward the target so accuracies are neither ~0 nor ~1."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(c - absent))
    targets = rng.choice(c - absent, size=n, p=p)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), targets] += 1.5
    return scores, targets


# --- top-k, accuracy, Kinetics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_accuracy_matches_sklearn(seed):
    scores, targets = _classification(seed)
    labels = np.arange(scores.shape[1])  # else sklearn infers the classes from targets alone
    for k in (1, 2, 5, 12):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k == n_classes: "meaningless" perfect score, still the right value
            want = top_k_accuracy_score(targets, scores, k=k, labels=labels)
        assert top_k_accuracy(scores, targets, k) == pytest.approx(want, abs=1e-15)
    assert top_k_accuracy(scores, targets) == pytest.approx(accuracy_score(targets, scores.argmax(1)), abs=1e-15)
    assert 0.2 < top_k_accuracy(scores, targets) < 0.8  # the data exercise both outcomes


@pytest.mark.parametrize("seed", SEEDS)
def test_kinetics_is_mean_of_sklearn_top1_top5(seed):
    scores, targets = _classification(seed, c=20)
    labels = np.arange(20)
    want = (top_k_accuracy_score(targets, scores, k=1, labels=labels)
            + top_k_accuracy_score(targets, scores, k=5, labels=labels)) / 2
    assert kinetics_top1_top5_mean(scores, targets) == pytest.approx(want, abs=1e-15)


def test_tie_rule_counts_ties_against_the_model():
    """Fewer than k other classes may score >= the target. sklearn breaks ties by index (top_k_accuracy_score
    toward the higher, argmax toward the lower), so it credits a constant model with some class."""
    scores = np.array([[1.0, 1.0, 0.0], [2.0, 3.0, 3.0], [0.5, 0.5, 0.5]])
    targets = np.array([0, 2, 2])
    assert top_k_accuracy(scores, targets, 1) == 0.0
    assert top_k_accuracy(scores, targets, 2) == pytest.approx(2 / 3)  # the 3-way tie needs k = 3
    assert top_k_accuracy(scores, targets, 3) == 1.0
    assert top_k_accuracy_score(targets, scores, k=1, labels=[0, 1, 2]) == pytest.approx(2 / 3)  # rows 2 and 3
    assert accuracy_score(targets, scores.argmax(1)) == pytest.approx(1 / 3)  # row 1
    assert accuracy_score([0], np.zeros((1, 3)).argmax(1)) == 1.0 and top_k_accuracy(np.zeros((1, 3)), [0]) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_ties_do_not_depend_on_class_order(seed):
    """Coarse scores have many ties; relabelling the classes must not move any tie-sensitive metric."""
    scores, targets = _classification(seed, c=8)
    scores = np.round(scores)
    perm = np.random.default_rng(seed + 100).permutation(8)
    relabelled_scores, relabelled_targets = scores[:, perm], np.argsort(perm)[targets]
    for name in ("accuracy", "mean_per_class_recall", "top1_top5_mean"):
        assert compute(name, scores, targets) == compute(name, relabelled_scores, relabelled_targets), name
    assert top_k_accuracy(scores, targets, 3) == top_k_accuracy(relabelled_scores, relabelled_targets, 3)


# --- mean per-class recall ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("absent", [0, 3])
def test_mean_per_class_recall_matches_sklearn_balanced_accuracy(seed, absent):
    """Classes absent from targets are left out of the mean. sklearn does the same for a predicted class that is
    absent from targets (recall 0/0 is dropped, with a warning), so the numbers agree."""
    scores, targets = _classification(seed, absent=absent)
    predictions = scores.argmax(1)
    if absent:
        assert np.isin(predictions, np.arange(12 - absent, 12)).any()  # the convention is exercised
        with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
            want = balanced_accuracy_score(targets, predictions)
    else:
        want = balanced_accuracy_score(targets, predictions)
    got = mean_per_class_recall(scores, targets)
    assert got == pytest.approx(want, abs=1e-15)
    assert got != pytest.approx(top_k_accuracy(scores, targets), abs=1e-3)  # uneven classes: not plain accuracy


def test_mean_per_class_recall_by_hand():
    scores = np.eye(3)[[0, 0, 0, 1, 2, 2]]  # predictions 0 0 0 1 2 2
    targets = np.array([0, 0, 1, 1, 1, 2])  # recall: class 0 2/2, class 1 1/3, class 2 1/1; class 3... none
    assert mean_per_class_recall(scores, targets) == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert mean_per_class_recall(np.c_[scores, np.zeros(6)], targets) == pytest.approx((1 + 1 / 3 + 1) / 3)


# --- ROC-AUC -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random(400) < 0.3).astype(int)
    scores = rng.normal(size=400) + targets
    assert roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    tied = np.round(scores * 2) / 2  # many positive/negative ties, each worth one half
    assert len(np.unique(tied)) < 20
    assert roc_auc(tied, targets) == pytest.approx(roc_auc_score(targets, tied), abs=1e-12)
    two_columns = np.c_[rng.normal(size=400), scores]  # column 1 is the positive class; column 0 is noise
    assert roc_auc(two_columns, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_roc_auc_by_hand():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([1.0, 1.0, 0.0], [1, 0, 0]) == pytest.approx(0.75)  # one tied pair of two counts one half
    assert roc_auc([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0 and roc_auc([3.0, 2.0, 1.0], [0, 0, 1]) == 0.0


# --- VOC 2007 11-point mAP ---------------------------------------------------------------------------------------

def _devkit_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """VOCevalcls.m (VOC2007 branch) line by line: gt 1 positive, 0 negative, -1 difficult; the sample order among
    tied scores matters here, so compare on tie-free scores only."""
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.cumsum(gt[order] == 1), np.cumsum(gt[order] == 0)
    with np.errstate(invalid="ignore"):
        rec, prec = tp / (gt == 1).sum(), tp / (tp + fp)  # 0/0 = nan when difficult samples lead the ranking
    ap = 0.0
    for i in range(11):
        p = prec[rec >= i / 10]  # i / 10 and tp / npos round the same rational to the same double
        ap += np.nanmax(p) if p.size else 0.0
    return ap / 11


def _brute_force_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """The definition with every threshold tried: each distinct score s predicts 'positive' for scores >= s
    (difficult samples dropped); recall compared as exact fractions."""
    keep = gt >= 0
    scores, pos = scores[keep], gt[keep] == 1
    points = []
    for s in np.unique(scores):
        predicted = scores >= s
        tp = int((predicted & pos).sum())
        points.append((tp / predicted.sum(), Fraction(tp, int(pos.sum()))))
    return sum(max([p for p, r in points if r >= Fraction(i, 10)], default=0.0) for i in range(11)) / 11


def _voc_data(seed: int, n: int = 80, c: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.choice([1, 0, -1], size=(n, c), p=[0.25, 0.6, 0.15])
    targets[0] = 1  # every class has a positive
    scores = rng.normal(size=(n, c)) + (targets == 1) + 0.5 * (targets == -1)
    return scores, targets


@pytest.mark.parametrize("seed", SEEDS)
def test_voc11_map_matches_devkit_and_brute_force(seed):
    scores, targets = _voc_data(seed)
    c = scores.shape[1]
    want = np.mean([_devkit_ap(scores[:, j], targets[:, j]) for j in range(c)])
    assert voc11_map(scores, targets) == pytest.approx(want, abs=1e-12)
    tied = np.round(scores, 1)  # ties: the devkit's answer depends on file order, the brute force's does not
    assert sum(len(np.unique(tied[:, j])) < len(tied) for j in range(c)) == c
    want = np.mean([_brute_force_ap(tied[:, j], targets[:, j]) for j in range(c)])
    assert voc11_map(tied, targets) == pytest.approx(want, abs=1e-12)
    assert 0.3 < voc11_map(scores, targets) < 0.95


def test_voc11_map_by_hand():
    """Class 0 ranks + - + - -: precision 1 up to recall 1/2 (6 points), then 2/3 (5 points): 28/33. Class 1's
    difficult sample leads; without it the ranking - + + - has precision 2/3 at full recall: AP 2/3."""
    scores = np.array([[5.0, 5.0], [4.0, 4.0], [3.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    targets = np.array([[1, -1], [0, 0], [1, 1], [0, 1], [0, 0]])
    assert voc11_map(scores[:, :1], targets[:, :1]) == pytest.approx(28 / 33, abs=1e-15)
    assert voc11_map(scores[:, 1:], targets[:, 1:]) == pytest.approx(2 / 3, abs=1e-15)
    assert voc11_map(scores, targets) == pytest.approx((28 / 33 + 2 / 3) / 2, abs=1e-15)
    # not sklearn's (uninterpolated, step-wise) average precision: 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision_score(targets[:, 0], scores[:, 0]) == pytest.approx(5 / 6)
    assert abs(voc11_map(scores[:, :1], targets[:, :1]) - 5 / 6) > 0.01


def test_voc11_map_counts_recall_of_exactly_three_tenths():
    """Ranking + + + - then 7 +: precision 1 up to recall 3/10, then j/(j+1) at recall j/10. The point t = 0.3
    takes precision 1 (114/121); a float threshold 3 * 0.1 > 0.3 would give 113/121."""
    targets = np.array([1, 1, 1, 0] + [1] * 7)[:, None]
    scores = -np.arange(11.0)[:, None]
    assert voc11_map(scores, targets) == pytest.approx(114 / 121, abs=1e-15)


def test_voc11_map_perfect_ranking_and_absent_classes():
    rng = np.random.default_rng(0)
    targets = rng.choice([1, 0, -1], size=(50, 4))
    targets[0] = 1
    scores = targets + rng.random((50, 4)) * 0.5 + 5 * (targets == -1) * rng.random((50, 4))  # difficult anywhere
    assert voc11_map(scores, targets) == 1.0
    assert average_precision_score(targets[:, 0] == 1, scores[:, 0]) < 1.0  # sklearn would count difficult ones
    no_positive = np.c_[targets, np.zeros(50, int)]  # a class with no positive has no AP and is left out
    assert voc11_map(np.c_[scores, rng.random(50)], no_positive) == 1.0


# --- inputs ------------------------------------------------------------------------------------------------------

_S, _T = np.array([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]]), np.array([1, 0])


@pytest.mark.parametrize("call, match", [
    (lambda: top_k_accuracy(_S, np.array([1, 0, 2])), r"targets have shape \(3,\), scores need \(2,\)"),
    (lambda: top_k_accuracy(_S[:, 0], _T), r"scores must be 2-D, got shape \(2,\)"),
    (lambda: top_k_accuracy(np.zeros((0, 3)), np.zeros(0, int)), "scores are empty"),
    (lambda: mean_per_class_recall(np.zeros((2, 0)), _T), "scores are empty"),
    (lambda: top_k_accuracy(np.array([[np.nan, 1.0, 0.0], [0.0, 1.0, 2.0]]), _T), "1 non-finite"),
    (lambda: mean_per_class_recall(np.array([[np.inf, 1.0, 0.0], [0.0, 1.0, 2.0]]), _T), "1 non-finite"),
    (lambda: top_k_accuracy(_S, np.array([1, 3])), r"targets must lie in \[0, 2\], got 3"),
    (lambda: top_k_accuracy(_S, np.array([-1, 0])), r"targets must lie in \[0, 2\], got -1"),
    (lambda: top_k_accuracy(_S, np.array([0.5, 1.0])), "non-integral"),
    (lambda: top_k_accuracy(_S, _T, k=0), "k must be a positive integer"),
    (lambda: voc11_map(_S, np.array([[0, 1, 2], [0, 0, 1]])), r"targets must lie in \[-1, 1\], got 2"),
    (lambda: voc11_map(_S, np.array([[0, 1, 0]])), r"targets have shape \(1, 3\), scores need \(2, 3\)"),
    (lambda: voc11_map(_S, np.array([[0, -1, 0], [0, 0, 0]])), "no class has a positive"),
    (lambda: roc_auc([0.1, 0.2, 0.3], [1, 1, 1]), "needs both classes in targets, got only class 1"),
    (lambda: roc_auc([0.1, 0.2], [0, 2]), r"targets must lie in \[0, 1\], got 2"),
    (lambda: roc_auc(_S, [0, 1]), r"scores must have shape \(N,\) or \(N, 2\), got \(2, 3\)"),
    (lambda: roc_auc([], []), "scores are empty"),
    (lambda: roc_auc([0.1, np.nan], [0, 1]), "non-finite"),
    (lambda: compute("top5", _S, _T), "unknown metric 'top5'; known: accuracy, mean_per_class_recall, voc11_map"),
])
def test_bad_input_is_a_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_torch_tensors_equal_numpy():
    import torch

    scores, targets = _classification(0, c=10)
    voc_scores, voc_targets = _voc_data(0)
    rng = np.random.default_rng(0)
    binary = (rng.random(100) < 0.5).astype(int)
    cases = {name: (scores, targets) for name in ("accuracy", "mean_per_class_recall", "top1_top5_mean")}
    cases |= {"voc11_map": (voc_scores, voc_targets), "roc_auc": (rng.normal(size=(100, 2)), binary)}
    for name, (s, t) in cases.items():
        s32 = s.astype(np.float32)  # what a model emits; the tensor must score exactly as its numpy copy
        tensor = torch.from_numpy(s32).requires_grad_()  # .numpy() on a grad tensor fails without detach
        assert compute(name, tensor, torch.from_numpy(t)) == compute(name, s32, t), name
        bf16 = tensor.bfloat16()  # numpy has no bfloat16: the helper goes through float64
        assert compute(name, bf16, torch.from_numpy(t)) == compute(name, bf16.double().detach().numpy(), t), name
    assert top_k_accuracy(torch.from_numpy(scores), torch.from_numpy(targets), 5) == top_k_accuracy(scores, targets, 5)


def test_compute_dispatches_by_name():
    scores, targets = _classification(1)
    voc_scores, voc_targets = _voc_data(1)
    binary_scores, binary = scores[:, 0], (targets == targets[0]).astype(int)
    assert list(METRICS) == ["accuracy", "mean_per_class_recall", "voc11_map", "roc_auc", "top1_top5_mean"]
    assert compute("accuracy", scores, targets) == top_k_accuracy(scores, targets, 1)
    assert compute("mean_per_class_recall", scores, targets) == mean_per_class_recall(scores, targets)
    assert compute("voc11_map", voc_scores, voc_targets) == voc11_map(voc_scores, voc_targets)
    assert compute("roc_auc", binary_scores, binary) == roc_auc(binary_scores, binary)
    assert compute("top1_top5_mean", scores, targets) == kinetics_top1_top5_mean(scores, targets)
    multiclass = [compute(name, scores, targets) for name in ("accuracy", "mean_per_class_recall", "top1_top5_mean")]
    assert len(set(multiclass)) == 3 and all(type(value) is float for value in multiclass)


def test_module_does_not_import_torch():
    """Read from the source: this process has torch loaded by the test above, and a fresh interpreter costs ~1 s."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "numpy" in imported and not [name for name in imported if name.split(".")[0] == "torch"]
