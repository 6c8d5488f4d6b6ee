import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

# img2dataset imports albumentations (update check) and wandb: both phone home unless told not to
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from data_tools import DataToolsError  # noqa: E402
from data_tools.cli import main  # noqa: E402
from data_tools.demo_corpus import ODD_IMAGES, make_corpus, start_server, write_url_list  # noqa: E402
from data_tools.download import Options, download, missing_rows  # noqa: E402
from data_tools.url_list import ListSpec, url_problems  # noqa: E402
from data_tools.manifest import build_manifest, failure_reason  # noqa: E402

N_GOOD = 60
ODD = 5  # odd images that must come out right: CMYK, 16-bit grey and RGB, palette, EXIF-rotated
OPTIONS = Options(image_size=32, samples_per_shard=20, processes=1, threads=8, timeout=2, progress=False)


def expected_failures(urls: pd.DataFrame) -> Counter:
    """Each bad row's caption names its outcome; one row has no caption; the CSV has one line of broken UTF-8."""
    reasons = urls["caption"].str.extract(r"^bad url: (\w+)$")[0].dropna()
    return Counter(reasons) + Counter(missing_caption=1, bad_encoding=1)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """The corpus's HTTP server: (root, server, base URL)."""
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, n_train=N_GOOD, n_val=24, seed=0, size=48)
    server, base = start_server(root)
    yield root, server, base
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(http):
    root, _, base = http
    urls = write_url_list(root, base, bad_urls=True)
    with open(root / "urls.csv", "ab") as f:  # a row in Latin-1, in a UTF-8 file
        f.write(f"{base}/images/000001.jpg?latin1,caf".encode() + b"\xe9 au lait\n")
    return root, urls


@pytest.fixture(scope="module")
def shards(served, tmp_path_factory):
    root, _ = served
    out = tmp_path_factory.mktemp("shards")
    manifest = download(ListSpec(root / "urls.csv"), out, OPTIONS)
    return out, manifest


def test_every_row_counted_once(served, shards):
    _, urls = served
    out, manifest = shards
    assert {k: v for k, v in manifest.items() if k != "last_run"} == json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["new_samples"] == N_GOOD + ODD
    assert manifest["rows"] == len(urls) + 1
    assert manifest["total_samples"] == N_GOOD + ODD
    assert manifest["failures"] == expected_failures(urls)
    assert manifest["total_samples"] + sum(manifest["failures"].values()) == manifest["rows"]
    # rows dropped before img2dataset have no raw message; the others keep img2dataset's
    dropped = {"empty_url", "unsupported_scheme", "duplicate_url", "missing_caption", "bad_encoding"}
    assert sum(manifest["failures_raw"].values()) == sum(
        n for reason, n in manifest["failures"].items() if reason not in dropped)
    assert manifest["incomplete_shards"] == [] and missing_rows(manifest) == 0


def test_odd_images_come_out_upright_8bit_rgb(served, shards):
    """CMYK, 16-bit, palette and EXIF-rotated images (data_tools/img2dataset_hooks.py) decode to the reference."""
    out, manifest = shards
    found = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in files.items():
            if name.endswith(".txt") and data.startswith(b"odd image: "):
                found[data.decode()[len("odd image: "):]] = files[name.replace(".txt", ".jpg")]
    assert set(found) == set(ODD_IMAGES)
    for name, jpg in found.items():
        img = Image.open(io.BytesIO(jpg))
        assert img.mode == "RGB" and img.size == (32, 32), name
        # border mode: the 48x32 picture scaled to 32x21, centred on a black square (rows 5-26)
        top, bottom = (np.asarray(img)[y, 16].astype(int) for y in (9, 22))
        if name == "gray16.png":
            assert abs(top - 195).max() < 12 and abs(bottom - 39).max() < 12, (name, top, bottom)
        else:
            assert abs(top - (220, 40, 40)).max() < 16 and abs(bottom - (40, 60, 220)).max() < 16, (name, top, bottom)


def test_shards(served, shards):
    _, urls = served
    out, manifest = shards
    first = urls.drop_duplicates("url")
    captions = dict(zip(first["url"], first["caption"]))
    # 74 rows handed over in shards of 20; the last holds the failing rows and the odd images
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("00000.tar", 20), ("00001.tar", 20), ("00002.tar", 20), ("00003.tar", ODD)]
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
    again = download(ListSpec(root / "urls.csv"), out, OPTIONS)
    assert again["shards"] == manifest["shards"] and again["failures"] == manifest["failures"]
    assert again["last_run"]["new_samples"] == 0
    with pytest.raises(DataToolsError, match="image_size 32 there, 64 now"):
        download(ListSpec(root / "urls.csv"), out, dataclasses.replace(OPTIONS, image_size=64))
    # any other *.json beside the shards would crash img2dataset's resume: refused, with its name, nothing lost
    (out / "palette_k4.json").write_text("{}")
    try:
        with pytest.raises(DataToolsError, match=r"palette_k4.json: img2dataset reads every \*.json"):
            download(ListSpec(root / "urls.csv"), out, OPTIONS)
        assert len(list(out.glob("*.tar"))) == len(manifest["shards"])
    finally:
        (out / "palette_k4.json").unlink()


def test_input_formats(served, tmp_path):
    _, urls = served
    urls.to_csv(tmp_path / "u.tsv.gz", sep="\t", index=False)
    urls.to_json(tmp_path / "u.jsonl", orient="records", lines=True)
    urls.to_json(tmp_path / "u.json", orient="records")
    urls.to_parquet(tmp_path / "u.parquet")
    expected = ListSpec(tmp_path / "u.parquet").prepare(tmp_path / "parquet")
    assert expected.kept == len(urls) - 4 and expected.rows == len(urls)  # empty, ftp, dup, uncaptioned
    for name in ("u.tsv.gz", "u.jsonl", "u.json"):
        got = ListSpec(tmp_path / name).prepare(tmp_path / name.replace(".", "_"))
        assert got.read().equals(expected.read()) and got.dropped == expected.dropped, name


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
        ([str(root / "urls.csv"), "--language", "en"], "--language needs --language-col"),
        ([str(root / "urls.csv"), "--preset", "wit"], "no column 'image_url'"),
        ([str(root / "urls.csv"), "--target", "ViT-Q-99"], "--target ViT-Q-99: neither a config file nor a model"),
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


def _members(tar_path, suffix):
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(suffix)]


def _keys(tar_path):
    with tarfile.open(tar_path) as tar:
        return sorted(m.name for m in tar if m.isfile())


def test_array_slices_give_the_shards_of_one_download(served, shards, tmp_path):
    """What `download --slurm` runs in its array tasks and merge job, run here in turn: the same shard names,
    keys and counts as one download of the whole list."""
    from data_tools import download_array

    root, _ = served
    out, manifest = shards
    plan = download_array.split(ListSpec(root / "urls.csv"), tmp_path, OPTIONS, tasks=3)
    assert (plan["shards"], plan["shards_per_task"], plan["tasks"]) == (4, 2, 2)  # whole shards per task
    assert download_array.DownloadTask(str(tmp_path))(1) == {"task": 1, "shards_published": 2}
    partial = download_array.MergeTask(str(tmp_path))()  # task 0 failed or never ran
    assert [s["name"] for s in partial["shards"]] == ["00002.tar", "00003.tar"] and missing_rows(partial) == 40
    download_array.DownloadTask(str(tmp_path))(0)
    merged = download_array.MergeTask(str(tmp_path))()
    assert [(s["name"], s["samples"]) for s in merged["shards"]] == [(s["name"], s["samples"]) for s in manifest["shards"]]
    assert merged["failures"] == manifest["failures"] and merged["rows"] == manifest["rows"]
    assert missing_rows(merged) == 0 and merged["incomplete_shards"] == []
    for s in manifest["shards"]:
        assert _keys(tmp_path / s["name"]) == _keys(out / s["name"])
    # a rerun with other settings is refused before anything is submitted
    with pytest.raises(DataToolsError, match="image_size 32 there, 64 now"):
        download_array.split(ListSpec(root / "urls.csv"), tmp_path, dataclasses.replace(OPTIONS, image_size=64), tasks=3)


@pytest.mark.slow
def test_killed_download_resumes_without_refetching(http, served, tmp_path):
    """kill -9 of the whole download mid-way; the rerun fetches only the rows of shards that had not finished."""
    import signal
    import subprocess
    import sys
    import time

    root, urls = served
    good = urls.iloc[:N_GOOD].assign(url=lambda d: d["url"] + "?delay=0.15")
    good.to_parquet(tmp_path / "slow.parquet")
    out = tmp_path / "shards"
    args = ["download", str(tmp_path / "slow.parquet"), "--out", str(out), "--image-size", "32",
            "--samples-per-shard", "10", "--processes", "1", "--threads", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *args], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name[:5] for p in out.glob("*_stats.json"))
    assert 1 <= len(done) < 6, done
    assert not (out / "manifest.json").exists()  # killed before any manifest: the input's record still checks
    assert main([{"32": "48"}.get(a, a) for a in args]) == 2  # another --image-size: refused
    server = http[1]
    before = dict(server.requests)
    assert main(args) == 0
    again = Counter({path: n - before.get(path, 0) for path, n in server.requests.items()})
    finished_urls = set()
    for shard in done:
        finished_urls |= {json.loads(m)["url"] for m in _members(out / f"{shard}.tar", ".json")}
    refetched = {u for u in finished_urls if again[u[u.index("/images"):]]}
    assert not refetched, f"rerun fetched {len(refetched)} images of finished shards {done}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == N_GOOD and missing_rows(manifest) == 0


def _members_by_name(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.mark.slow
def test_pyspark_distributor_gives_the_same_shards(served, shards, tmp_path):
    """img2dataset's pyspark distributor on a real local Spark session (a JVM, Python workers): the same shards,
    images and outcomes as the multiprocessing download, our img2dataset hooks (SafeResizer) included."""
    root, _ = served
    expected_dir, expected = shards
    out = tmp_path / "spark"
    assert main(["download", str(root / "urls.csv"), "--out", str(out), "--image-size", "32", "--samples-per-shard",
                 "20", "--processes", "2", "--threads", "8", "--timeout", "2", "--no-progress",
                 "--distributor", "pyspark"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["img2dataset"]["settings"]["distributor"] == "pyspark"
    assert manifest["failures"] == expected["failures"] and manifest["total_samples"] == expected["total_samples"]
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [(s["name"], s["samples"]) for s in expected["shards"]]
    for shard in expected["shards"]:
        ours, theirs = _members_by_name(out / shard["name"]), _members_by_name(expected_dir / shard["name"])
        assert ours.keys() == theirs.keys()
        assert all(ours[n] == theirs[n] for n in ours if not n.endswith(".json")), shard["name"]


def test_pyspark_flags_refused_where_they_cannot_work(served, capsys):
    root, _ = served
    assert main(["download", str(root / "urls.csv"), "--out", "x", "--spark-master", "local[2]"]) == 2
    assert "--spark-master: only with --distributor pyspark" in capsys.readouterr().err
    assert main(["download", str(root / "urls.csv"), "--out", "x", "--distributor", "pyspark", "--slurm", "cpu"]) == 2
    assert "--slurm and --distributor pyspark" in capsys.readouterr().err


def test_cut_short_jpegs_told_from_whole_ones():
    """A JPEG cut short is refused before OpenCV (which would fill the missing rows with grey); one with a trailer
    after its end-of-image marker, as some cameras write, is whole."""
    from data_tools.img2dataset_hooks import _cut_short

    buf = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert not _cut_short(io.BytesIO(jpeg))
    assert not _cut_short(io.BytesIO(jpeg + b"SEFH trailer written by a phone"))
    assert _cut_short(io.BytesIO(jpeg[: len(jpeg) * 2 // 3]))


@pytest.mark.parametrize("flags, size, mode", [
    (["--target", "ViT-L-14-336"], 336, "keep_ratio"), (["--target", "RN50x64"], 448, "keep_ratio"),
    (["--target", "vit_huge_patch14_224"], 224, "keep_ratio"), (["--target", "configs/vit/tiny_cpu.yaml"], 32, "keep_ratio"),
    (["--target", "ViT-B-32", "--image-size", "80", "--resize-mode", "center_crop"], 80, "center_crop"),
    ([], 64, "border")])
def test_target_presets_and_limits_reach_img2dataset(flags, size, mode):
    """--target asks the task registry (pipeline/tasks): a model name of any family or a training config."""
    from data_tools.cli import build_parser
    from data_tools.download import options_from

    args = build_parser("download").parse_args(["download", "u.csv", "--out", "o", "--min-image-size", "100",
                                                "--max-aspect-ratio", "3", *flags])
    settings = options_from(args).img2dataset()
    assert (settings["image_size"], settings["resize_mode"]) == (size, mode)
    assert settings["min_image_size"] == 100 and settings["max_aspect_ratio"] == 3
    assert settings["disallowed_header_directives"] is None  # img2dataset's own list: noai, noindex, ...
    ignore = build_parser("download").parse_args(["download", "u.csv", "--out", "o", "--ignore-robots-headers"])
    assert options_from(ignore).img2dataset()["disallowed_header_directives"] == []


def test_progress_bar_counts_finished_shards(tmp_path, capsys):
    """The bar follows the `{shard}_stats.json` files img2dataset writes as each shard ends."""
    import time

    from data_tools.download import Progress

    with Progress(tmp_path, shards=4, interval_s=0.05):
        for shard, successes in enumerate((10, 7)):
            (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": successes}))
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "download:" in err and "2/4" in err and "samples=17" in err, err[-500:]
