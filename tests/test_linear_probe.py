"""Linear probes (pipeline/eval/linear_probe.py) on sklearn's digits (1797 8x8 images, 10 classes, shipped with
sklearn) and on synthetic features whose best probe is known."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.eval.linear_probe import ProbeResult, draw_layer_curve, probe, probe_layers, write_report


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """These problems are tiny: on a busy 2-core box, 2 BLAS threads contend and each fit is ~50x slower."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.33, stratify=y, random_state=0)  # train_x, test_x, train_y, test_y


@pytest.fixture(scope="module")
def layers(digits):
    """Two "layers": pure noise first, the real pixels second (not alphabetical: the dict's order must be kept)."""
    train_x, test_x, train_y, test_y = digits
    rng = np.random.default_rng(0)
    train = {"noise": rng.normal(size=train_x.shape), "embedding": train_x}
    test = {"noise": rng.normal(size=test_x.shape), "embedding": test_x}
    return probe_layers(train, train_y, test, test_y)


def _noisy(seed: int = 0, n: int = 200, d: int = 160, shift: float = 0.15):
    """Two Gaussian classes, means +-shift in every one of d dimensions, with d close to the number of fitted
    samples: a weakly regularised fit interpolates the noise, and the shrunken (class-mean-difference) one wins."""
    rng = np.random.default_rng(seed)
    y = np.arange(n + 400) % 2
    x = rng.normal(size=(n + 400, d)) + shift * (2 * y[:, None] - 1)
    return x[:n], y[:n], x[n:], y[n:]


def test_digits_pixels(digits):
    train_x, test_x, train_y, test_y = digits
    r = probe(train_x, train_y, test_x, test_y)
    assert r.accuracy > 0.9 and r.val_accuracy > 0.9
    assert (r.n_train, r.n_test, r.classes) == (len(train_y), len(test_y), 10)
    # the score is that of the chosen C refit on the whole training set, validation split included
    refit = make_pipeline(StandardScaler(), LogisticRegression(C=r.C, max_iter=1000)).fit(train_x, train_y)
    assert r.accuracy == refit.score(test_x, test_y)
    assert json.loads(json.dumps(r.record())) == r.record() == {
        "accuracy": r.accuracy, "C": r.C, "val_accuracy": r.val_accuracy, "n_train": len(train_y),
        "n_test": len(test_y), "classes": 10}


def test_layers_pick_the_real_features(layers):
    assert list(layers) == ["noise", "embedding"]
    assert layers["embedding"].accuracy > 0.9
    assert layers["noise"].accuracy < 0.2  # chance is 0.1
    assert max(layers, key=lambda k: layers[k].accuracy) == "embedding"


def test_C_is_chosen_on_validation(digits):
    """Clean, plentiful digits want weak regularisation; the tiny noisy problem wants strong regularisation: a
    probe that always took one end of the grid (or a fixed C) fails one of the two."""
    train_x, test_x, train_y, test_y = digits
    clean = probe(train_x, train_y, test_x, test_y)
    noisy = probe(*_noisy())
    assert noisy.C <= 0.01 < 1.0 <= clean.C


def test_test_set_does_not_choose_C():
    """Shuffling the test labels changes the test accuracy but neither the chosen C nor the validation score."""
    train_x, train_y, test_x, test_y = _noisy()
    a = probe(train_x, train_y, test_x, test_y)
    b = probe(train_x, train_y, test_x, np.random.default_rng(1).permutation(test_y))
    assert (a.C, a.val_accuracy) == (b.C, b.val_accuracy)
    assert a.accuracy > 0.8 and b.accuracy < 0.65


def test_features_are_standardised(digits):
    """Rescaling each feature by up to 1e+-3 leaves the probe unchanged: C means the same on every feature set."""
    train_x, test_x, train_y, test_y = digits
    scale = 10.0 ** np.random.default_rng(0).uniform(-3, 3, size=train_x.shape[1])
    a = probe(train_x, train_y, test_x, test_y)
    b = probe(train_x * scale, train_y, test_x * scale, test_y)
    assert a.C == b.C and abs(a.accuracy - b.accuracy) < 0.01


def test_deterministic_for_a_seed():
    data = _noisy(seed=3, n=120, d=40, shift=0.2)
    assert probe(*data, seed=5) == probe(*data, seed=5)
    # and the seed does reach the split: other seeds hold out other samples
    assert len({probe(*data, seed=s).val_accuracy for s in range(6)}) > 1


def test_torch_tensors_as_inputs():
    torch = pytest.importorskip("torch")
    train_x, train_y, test_x, test_y = _noisy(n=120, d=40, shift=0.2)
    expected = probe(train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y)
    got = probe(torch.from_numpy(train_x).float(), torch.from_numpy(train_y), torch.from_numpy(test_x).float(),
                torch.from_numpy(test_y))
    assert got == expected


def test_module_does_not_import_torch():
    code = "import sys, pipeline.eval.linear_probe; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input():
    x, y, tx, ty = _noisy(n=40, d=5)
    with pytest.raises(ValueError, match="train_x has 40 rows but train_y has 39 labels"):
        probe(x, y[:-1], tx, ty)
    with pytest.raises(ValueError, match="test_x has 400 rows but test_y has 10 labels"):
        probe(x, y, tx, ty[:10])
    with pytest.raises(ValueError, match="at least 2"):
        probe(x, np.zeros_like(y), tx, ty)
    with pytest.raises(ValueError, match="train set is empty"):
        probe(x[:0], y[:0], tx, ty)
    bad = x.copy()
    bad[[1, 5, 7], 2] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="train_x has 3 of 40 rows with non-finite"):
        probe(bad, y, tx, ty)
    with pytest.raises(ValueError, match="5 features but test_x has 4"):
        probe(x, y, tx[:, :4], ty)
    with pytest.raises(ValueError, match="val_fraction") as err:
        probe(x, y, tx, ty, val_fraction=1.0)
    assert "\n" not in str(err.value)


def test_write_report(layers, tmp_path):
    json_path, png_path = write_report(layers, tmp_path / "out", model="igpt-s", step=1000)
    assert (json_path, png_path) == (tmp_path / "out" / "linear_probe.json", tmp_path / "out" / "linear_probe.png")
    report = json.loads(json_path.read_text())
    assert report["best_layer"] == "embedding"
    assert report["best_accuracy"] == layers["embedding"].accuracy
    assert list(report["layers"]) == ["noise", "embedding"]
    assert report["layers"]["noise"] == layers["noise"].record()
    assert (report["model"], report["step"]) == ("igpt-s", 1000)
    with Image.open(png_path) as image:
        assert (image.size, image.mode) == ((640, 400), "RGB")
        pixels = np.asarray(image)
    assert ((pixels == (214, 39, 40)).all(axis=-1)).any()  # the best layer's marker and label
    assert ((pixels == (31, 119, 180)).all(axis=-1)).sum() > 50  # the curve
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["linear_probe.json", "linear_probe.png"]


def test_curve_edge_cases():
    """One layer; 48 layers (labels thinned) all at 1.0 accuracy: still drawn, at the requested size."""
    one = {"layer_1": ProbeResult(0.5, 1.0, 0.5, 10, 10, 2)}
    many = {f"layer_{i}": ProbeResult(1.0, 1.0, 1.0, 10, 10, 2) for i in range(48)}
    assert draw_layer_curve(one).size == (640, 400)
    assert draw_layer_curve(many, size=(800, 300)).size == (800, 300)


def test_torch_lbfgs_reaches_sklearns_accuracy(digits):
    """The torch backend (full-batch L-BFGS, the GPU path for ImageNet-size sets) minimises the same objective:
    on the same features it chooses a C and scores as scikit-learn does, within a test image or two."""
    train_x, test_x, train_y, test_y = digits
    reference = probe(train_x, train_y, test_x, test_y, max_iter=300)
    ours = probe(train_x, train_y, test_x, test_y, max_iter=300, backend="torch", device="cpu")
    assert ours.accuracy >= reference.accuracy - 2 / len(test_y), (ours, reference)
    assert ours.scores.shape == (len(test_y), 10) and np.allclose(ours.scores.sum(1), 1)
    assert list(ours.labels) == list(range(10))


def test_torch_lbfgs_optimum_matches_sklearns_coefficients(digits):
    """One C, one fit: the same minimiser (sklearn's objective C * sum CE + |W|^2 / 2), so the same probabilities."""
    from pipeline.eval.linear_probe import TorchLogistic

    train_x, test_x, train_y, _ = digits
    scaler = StandardScaler().fit(train_x)
    x, t = scaler.transform(train_x), scaler.transform(test_x)
    sk = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(x, train_y)
    th = TorchLogistic(C=0.1, max_iter=5000, device="cpu", tol=1e-9).fit(x, train_y)
    assert np.abs(th.predict_proba(t) - sk.predict_proba(t)).max() < 1e-3


def test_probe_scores_give_any_metric_later(digits):
    from pipeline.eval import metrics

    train_x, test_x, train_y, test_y = digits
    r = probe(train_x, train_y, test_x, test_y, max_iter=300)
    assert metrics.top_k_accuracy(r.scores, test_y) == pytest.approx(r.accuracy)
    assert "scores" not in r.record() and "labels" not in r.record()
