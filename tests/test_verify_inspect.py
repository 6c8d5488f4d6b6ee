"""`data_tools verify` and `data_tools inspect` on small shards written here, each defect made by hand."""
import argparse
import hashlib
import io
import json
import shutil
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from data_tools import DataToolsError
from data_tools import inspect_shards, verify
from data_tools.manifest import MANIFEST

# per shard: (image size, format, caption); 3 shards of 4 samples
SIZES = [(40, 30), (64, 64), (100, 20), (64, 64)]
FORMATS = ["JPEG", "PNG", "JPEG", "PNG"]
CAPTIONS = ["a red circle", "", "a big blue square on the left side of the picture", "x"]
SHARDS, PER_SHARD = 3, 4


def image_bytes(size, fmt) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path, first_key: int, garbage_key: int | None = None) -> None:
    with wds.TarWriter(str(path)) as w:
        for i, (size, fmt, caption) in enumerate(zip(SIZES, FORMATS, CAPTIONS)):
            key = first_key + i
            ext = "jpg" if fmt == "JPEG" else "png"
            data = b"\xff\xd8 not a jpeg at all" if key == garbage_key else image_bytes(size, fmt)
            w.write({"__key__": f"{key:09d}", ext: data, "txt": caption, "json": {"key": key}})


def entry(path) -> dict:
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        samples = len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
    return {"name": path.name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(shard_dir) -> dict:
    """The keys data_tools/manifest.py writes (its build_manifest needs img2dataset's stats files)."""
    shards = [entry(p) for p in sorted(shard_dir.glob("*.tar"))]
    manifest = {"shards": shards, "total_samples": sum(s["samples"] for s in shards),
                "total_bytes": sum(s["bytes"] for s in shards), "failures": {"http_404": 2, "timeout": 1},
                "failures_raw": {}, "rows": SHARDS * PER_SHARD + 3, "incomplete_shards": []}
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    for s in range(SHARDS):
        write_shard(out / f"{s:05d}.tar", s * PER_SHARD)
    write_manifest(out)
    return out


def cli(module, argv: list[str]) -> int:
    """The command as `python -m data_tools` runs it: its own subparser, then func(args)."""
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def member(path, suffix: str, index: int = -1) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return [m for m in tar if m.name.endswith(suffix)][index]


def test_clean_shards_verify(shards, capsys):
    assert cli(verify, ["verify", str(shards), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"{shards}: 3/3 shards ok, 12 samples, 12 images "
                                f"({sum(p.stat().st_size for p in shards.glob('*.tar')) / 1e6:.1f} MB read): all ok"]
    assert cli(verify, ["verify", str(shards), "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    assert (report["shards"], report["shards_ok"], report["samples"], report["images"], report["undecodable"]) \
        == (3, 3, 12, 12, 0)


def truncate_in_member(d):
    path = d / "00001.tar"
    m = member(path, ".png")
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + 10)


def truncate_at_member_boundary(d):
    """Cut between two samples: tarfile reads such a tar without complaint, only the missing end marker tells."""
    path = d / "00001.tar"
    with open(path, "r+b") as f:
        f.truncate(member(path, ".jpg", 1).offset)


def change_caption_byte(d):
    path = d / "00002.tar"
    m = member(path, ".txt", 0)
    data = bytearray(path.read_bytes())
    data[m.offset_data] ^= 0x20  # "a red circle" -> "A red circle": same size, other bytes
    path.write_bytes(bytes(data))


def corrupt_header(d):
    path = d / "00002.tar"
    m = member(path, ".txt", 1)
    data = bytearray(path.read_bytes())
    data[m.offset:m.offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))


def garbage_jpeg(d):
    """Shard 0's second JPEG (key 2) is not a JPEG; the manifest agrees with the bytes, only decoding fails."""
    write_shard(d / "00000.tar", 0, garbage_key=2)
    write_manifest(d)


def incomplete_shard(d):
    """A download's manifest names the tars img2dataset gave up on: not unlisted, unfinished."""
    shutil.copy(d / "00000.tar", d / "00007.tar")
    manifest = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**manifest, "incomplete_shards": ["00007.tar"]}))


def wrong_sample_count(d):
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["shards"][1]["samples"] = 5
    manifest["total_samples"] += 1
    (d / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, expected", [
    (truncate_in_member, {("00001.tar", "truncated"), ("00001.tar", "size")}),
    (truncate_at_member_boundary, {("00001.tar", "truncated"), ("00001.tar", "size")}),
    (change_caption_byte, {("00002.tar", "sha256")}),
    (corrupt_header, {("00002.tar", "corrupt"), ("00002.tar", "sha256")}),
    (lambda d: (d / "00001.tar").unlink(), {("00001.tar", "missing")}),
    (lambda d: shutil.copy(d / "00000.tar", d / "00007.tar"), {("00007.tar", "unlisted")}),
    (incomplete_shard, {("00007.tar", "incomplete")}),
    (garbage_jpeg, {("00000.tar", "undecodable")}),
    (wrong_sample_count, {("00001.tar", "samples")}),
])
def test_each_problem_is_reported(shards, capsys, damage, expected):
    damage(shards)
    assert cli(verify, ["verify", str(shards), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    report = verify.verify(shards, workers=1)
    assert {(p["shard"], p["kind"]) for p in report["problems"]} == expected
    assert not report["ok"] and report["shards_ok"] == 3 - len({s for s, k in expected if s < "00003.tar"})
    n = len(report["problems"])
    assert lines[0].endswith(f"{n} problem{'s' if n > 1 else ''} in 1 file")
    assert lines[1:] == [f"{p['shard']}: {p['kind']}: {p['detail']}" for p in report["problems"]]


def test_undecodable_names_shard_and_key(shards):
    garbage_jpeg(shards)
    report = verify.verify(shards, workers=1)
    (problem,) = report["problems"]
    assert problem["detail"].startswith("000000002: 000000002.jpg: ")
    assert (report["images"], report["undecodable"], report["samples"]) == (12, 1, 12)


def test_bad_input_is_refused(tmp_path, shards):
    (shards / MANIFEST).unlink()
    with pytest.raises(DataToolsError, match="manifest.json: no such file"):
        cli(verify, ["verify", str(shards)])
    with pytest.raises(DataToolsError, match="not a directory"):
        verify.verify(tmp_path / "nowhere")
    (shards / MANIFEST).write_text("{not json")
    with pytest.raises(DataToolsError, match="manifest.json: not a shard manifest"):
        verify.verify(shards)


def test_inspect_counts_histograms_and_grid(shards, capsys):
    assert cli(inspect_shards, ["inspect", str(shards), "--grid", "3"]) == 0
    text = capsys.readouterr().out
    report = json.loads((shards / "inspect" / "inspect.json").read_text())
    manifest = json.loads((shards / MANIFEST).read_text())
    assert (report["source"], report["shards"], report["samples"], report["bytes"]) \
        == ("manifest.json", 3, 12, manifest["total_bytes"])
    assert (report["shards_read"], report["samples_read"], report["images_read"], report["captions_read"]) \
        == (3, 12, 12, 12)
    for key in ("width", "height", "caption_chars", "caption_words"):
        assert sum(report[key]["histogram"].values()) == report[key]["count"] == 12
    assert report["width"]["histogram"]["32-63"] == 3 and report["width"]["histogram"]["64-127"] == 9
    assert report["height"]["histogram"]["0-31"] == 6 and report["height"]["histogram"]["64-127"] == 6
    assert report["width"]["most_common"][0] == [64, 6]
    assert (report["caption_chars"]["min"], report["caption_chars"]["max"]) == (0, len(CAPTIONS[2]))
    assert report["caption_words"]["histogram"]["0"] == 3 and report["caption_words"]["histogram"][">=128"] == 0
    assert report["failures"] == {"http_404": 2, "timeout": 1} and report["rows"] == 15
    with Image.open(shards / "inspect" / "grid.png") as grid:
        assert grid.size == (3 * inspect_shards.CELL, 3 * inspect_shards.CELL)
        # the first thumbnail is the red 40x30 JPEG, padded; the last cell (9 images) too is filled
        assert grid.getpixel((inspect_shards.CELL // 2,) * 2)[0] > 150
    assert report["grid"]["images"] == 9
    assert "12 samples" in text and "image width (px): median 64" in text and "not downloaded (of 15 rows)" in text


def test_inspect_without_manifest_reads_the_files(shards, tmp_path):
    (shards / MANIFEST).unlink()
    out = tmp_path / "elsewhere"
    report = inspect_shards.inspect(shards, out, grid=2)
    assert (report["source"], report["samples"], report["samples_exact"], report["failures"]) == ("files", 12, True, {})
    assert report["bytes"] == sum(p.stat().st_size for p in shards.glob("*.tar"))
    assert json.loads((out / "inspect.json").read_text())["samples"] == 12 and not (shards / "inspect").exists()
    sampled = inspect_shards.inspect(shards, out, grid=2, sample_shards=1)
    assert (sampled["shards_read"], sampled["samples_read"], sampled["samples"], sampled["samples_exact"]) \
        == (1, 4, 12, False)


def test_sample_shards_spread_evenly():
    names = [f"{i:05d}.tar" for i in range(10)]
    assert inspect_shards.spread(names, 3) == ["00000.tar", "00003.tar", "00006.tar"]
    assert inspect_shards.spread(names, 20) == names and inspect_shards.spread(names, None) == names


def test_inspect_bad_input(tmp_path):
    with pytest.raises(DataToolsError, match="no manifest.json and no .tar files"):
        inspect_shards.inspect(tmp_path)
    with pytest.raises(DataToolsError, match="not a directory"):
        inspect_shards.inspect(tmp_path / "nowhere")
