import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

# img2dataset imports albumentations (update check) and wandb: both phone home unless told not to
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from data_tools import DataToolsError  # noqa: E402
from data_tools.cli import main  # noqa: E402
from data_tools.demo_corpus import make_corpus, start_server, write_url_list  # noqa: E402
from data_tools.download import download, missing_rows, read_columns, url_problems  # noqa: E402
from data_tools.manifest import build_manifest, failure_reason  # noqa: E402

N_GOOD = 60
BAD_REASONS = {"http_404", "decode_error", "truncated", "timeout", "connection_refused", "empty_url",
               "unsupported_scheme"}
SETTINGS = dict(image_size=32, samples_per_shard=20, processes=1, threads=8, timeout=2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, n_train=N_GOOD, n_val=24, seed=0, size=48)
    server, base = start_server(root)
    urls = write_url_list(root, base, bad_urls=True)
    yield root, urls
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def shards(served, tmp_path_factory):
    root, _ = served
    out = tmp_path_factory.mktemp("shards")
    manifest = download(root / "urls.csv", out, **SETTINGS)
    return out, manifest


def test_every_row_counted_once(served, shards):
    _, urls = served
    out, manifest = shards
    assert {k: v for k, v in manifest.items() if k != "last_run"} == json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["new_samples"] == N_GOOD
    assert manifest["rows"] == len(urls) == N_GOOD + len(BAD_REASONS)
    assert manifest["total_samples"] == N_GOOD
    assert manifest["failures"] == {reason: 1 for reason in BAD_REASONS}
    assert manifest["total_samples"] + sum(manifest["failures"].values()) == manifest["rows"]
    # rows dropped before img2dataset (empty, ftp) have no raw message; the others keep img2dataset's
    assert sum(manifest["failures_raw"].values()) == len(BAD_REASONS) - 2
    assert manifest["incomplete_shards"] == [] and missing_rows(manifest) == 0


def test_shards(served, shards):
    _, urls = served
    out, manifest = shards
    captions = dict(zip(urls["url"], urls["caption"]))
    # 65 rows handed over (2 dropped) in shards of 20; the last holds only failing rows and stays listed, empty
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("00000.tar", 20), ("00001.tar", 20), ("00002.tar", 20), ("00003.tar", 0)]
    assert manifest["total_bytes"] == sum((out / s["name"]).stat().st_size for s in manifest["shards"])
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        samples = defaultdict(dict)
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
        assert len(samples) == shard["samples"]
        for key, files in samples.items():
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert files["txt"].decode() == captions[meta["url"]]
            assert Image.open(io.BytesIO(files["jpg"])).size == (32, 32)


def test_rerun_resumes(served, shards):
    root, _ = served
    out, manifest = shards
    # the manifest must not break img2dataset's incremental mode, which reads every *.json as shard stats
    again = download(root / "urls.csv", out, **SETTINGS)
    assert again["shards"] == manifest["shards"] and again["failures"] == manifest["failures"]
    assert again["last_run"]["new_samples"] == 0
    with pytest.raises(DataToolsError, match="image_size 32 there, 64 now"):
        download(root / "urls.csv", out, **{**SETTINGS, "image_size": 64})


def test_input_formats(served, tmp_path):
    _, urls = served
    urls.to_csv(tmp_path / "u.tsv.gz", sep="\t", index=False)
    urls.to_json(tmp_path / "u.jsonl", orient="records", lines=True)
    urls.to_json(tmp_path / "u.json", orient="records")
    for name, fmt in (("u.tsv.gz", "tsv.gz"), ("u.jsonl", "jsonl"), ("u.json", "json")):
        table = read_columns(tmp_path / name, fmt, ["url", "caption"])
        assert table.to_pandas().fillna("").equals(urls), name


def test_url_problems():
    urls = pa.chunked_array([["http://a/x.jpg", "HTTPS://a/x", "", None, " ", "ftp://a/x", "file:///x", "http:///x"]])
    assert url_problems(urls).to_pylist() == [None, None, "empty_url", "empty_url", "empty_url",
                                             "unsupported_scheme", "unsupported_scheme", "invalid_url"]


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"), ("HTTP Error 503: Service Unavailable", "http_5xx"),
    ("timed out", "timeout"), ("<urlopen error timed out>", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("IncompleteRead(938 bytes read, 938 more expected)", "truncated"),
    ("Image decoding error", "decode_error"), ("something new", "other"),
])
def test_failure_reason(message, reason):
    assert failure_reason(message) == reason


def test_cli_errors(served, tmp_path, capsys):
    root, _ = served
    pd.DataFrame({"link": ["http://x/y.jpg"], "caption": ["c"]}).to_parquet(tmp_path / "l.parquet")
    (tmp_path / "urls.xlsx").write_bytes(b"PK")
    cases = [
        ([str(tmp_path / "missing.csv")], "missing.csv"),
        ([str(tmp_path / "l.parquet")], "'url'"),
        ([str(root / "urls.csv"), "--caption-col", "text"], "'text'"),
        ([str(root / "corpus.json"), "--input-format", "xml"], "'xml'"),
        ([str(tmp_path / "urls.xlsx")], "urls.xlsx: unsupported format"),
    ]
    for args, needle in cases:
        assert main(["download", *args, "--out", str(tmp_path / "shards")]) == 2, args
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (args, err)
    assert not (tmp_path / "shards").exists()


def test_manifest_detects_damage(shards, tmp_path):
    out, _ = shards
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "00001_stats.json").unlink()  # img2dataset gave up on this shard
    assert build_manifest(copy)["incomplete_shards"] == ["00001.tar"]
    with tarfile.open(copy / "00000.tar", "a") as tar:  # a sample the stats do not know about
        tar.add(copy / "00000_stats.json", arcname="999999999.json")
    with pytest.raises(DataToolsError, match="00000.tar: 21 samples"):
        build_manifest(copy)
