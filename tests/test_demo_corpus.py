import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.demo_corpus import CLASSES, COLOURS, SHAPES, make_corpus, start_server, write_url_list

ROOT = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, n_train=96, n_val=50, seed=1, size=64)
    return out


def test_deterministic_and_reused(corpus, tmp_path):
    assert make_corpus(tmp_path / "a", 96, 50, seed=1, size=64)["generated"]
    assert _digest(tmp_path / "a") == _digest(corpus)
    assert not make_corpus(tmp_path / "a", 96, 50, seed=1, size=64)["generated"]  # same parameters: reused
    make_corpus(tmp_path / "b", 96, 50, seed=2, size=64)
    assert _digest(tmp_path / "b") != _digest(corpus)


def test_balanced(corpus):
    train = pd.read_parquet(corpus / "train.parquet")
    assert sorted(set(train["label"])) == CLASSES and set(Counter(train["label"]).values()) == {4}
    assert len(list((corpus / "images").glob("*.jpg"))) == 96
    per_class = {d.name: len(list(d.glob("*.jpg"))) for d in (corpus / "val").iterdir() if d.is_dir()}
    assert sorted(per_class) == CLASSES and sum(per_class.values()) == 50
    assert max(per_class.values()) - min(per_class.values()) <= 1
    names = (corpus / "val/classnames.txt").read_text().splitlines()
    assert names == [c.replace("_", " ") for c in sorted(per_class)]
    templates = (corpus / "val/zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{c}" in t for t in templates)


def _extent(path: Path) -> tuple[float, float, float]:
    """Width and centre of the coloured shape, as fractions of the image side."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    ys, xs = np.nonzero(rgb.max(-1) - rgb.min(-1) > 60)  # the background is grey
    side = rgb.shape[0]
    return (xs.max() - xs.min() + 1) / side, (xs.min() + xs.max()) / 2 / side, (ys.min() + ys.max()) / 2 / side


def test_captions_match_images(corpus):
    train = pd.read_parquet(corpus / "train.parquet")
    assert train["caption"].nunique() > 30  # varied phrasing
    for image, cap, label in train.itertuples(index=False):
        colour, shape = label.split("_")
        words = cap.split()
        assert colour in words and shape in words, cap
        assert sum(w in words for w in COLOURS) == 1 and sum(w in words for w in SHAPES) == 1, cap
        width, cx, cy = _extent(corpus / image)
        tol = 3 / 64  # anti-aliasing and JPEG chroma subsampling blur the edges
        if "small" in words:
            assert width < 0.36 + tol, cap
        if "large" in words:
            assert width > 0.50 - tol, cap
        if "left" in words:
            assert cx < 0.5, cap
        if "right" in words:
            assert cx > 0.5, cap
        if "top" in words:
            assert cy < 0.5, cap
        if "bottom" in words:
            assert cy > 0.5, cap


def test_url_list(corpus):
    urls = write_url_list(corpus, "http://127.0.0.1:8000", bad_urls=True)
    from data_tools.demo_corpus import ODD_IMAGES, bad_url_rows

    assert list(urls.columns) == ["url", "caption"]
    assert len(urls) == 96 + len(bad_url_rows("http://x")) + len(ODD_IMAGES)
    assert urls["url"][0] == "http://127.0.0.1:8000/images/000000.jpg"
    assert pd.read_parquet(corpus / "urls.parquet").equals(urls)
    assert pd.read_csv(corpus / "urls.csv", keep_default_na=False).equals(urls)


def _get(url: str, timeout: float = 5) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], b""


def test_server_endpoints(corpus):
    server, base = start_server(corpus)
    try:
        status, ctype, body = _get(f"{base}/images/000000.jpg")
        assert (status, ctype, body) == (200, "image/jpeg", (corpus / "images/000000.jpg").read_bytes())
        assert _get(f"{base}/bad/missing.jpg")[0] == 404
        assert _get(f"{base}/bad/notimage.jpg")[:2] == (200, "text/html")
        with pytest.raises(http.client.IncompleteRead):
            _get(f"{base}/bad/truncated.jpg")
        for never in ("slow", "never"):
            with pytest.raises(TimeoutError):
                _get(f"{base}/bad/{never}.jpg", timeout=0.5)
        assert _get(f"{base}/bad/error.jpg")[0] == 500
        with pytest.raises(urllib.error.HTTPError, match="infinite loop"):
            urllib.request.urlopen(f"{base}/bad/loop.jpg", timeout=5)
        assert _get(f"{base}/images/000001.jpg")[0] == 200  # a hanging request does not block others
    finally:
        server.shutdown()
        server.server_close()


def test_cli_serves_until_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", "demo-corpus", str(tmp_path), "--train", "24",
                             "--val", "24"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        proc.stdout.readline()  # corpus summary
        line = proc.stdout.readline()
        info = json.loads((tmp_path / "server.json").read_text())
        assert line.strip() == f"serving {tmp_path} on {info['url']} (Ctrl-C to stop)" and info["pid"] == proc.pid
        first = pd.read_parquet(tmp_path / "urls.parquet")["url"][0]
        assert first.startswith(info["url"]) and _get(first)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert not (tmp_path / "server.json").exists()


def test_cli_errors(tmp_path, capsys):
    assert main(["demo-corpus", str(tmp_path), "--no-serve"]) == 2
    assert main(["demo-corpus", str(tmp_path), "--val", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "--port" in err[0] and "--val" in err[1]
