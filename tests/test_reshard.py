"""`data_tools reshard` and `data_tools from-folder`: shards we write ourselves, and their manifest."""
import hashlib
import io
import json
import os
import tarfile
from collections import Counter

import pytest
from PIL import Image

from data_tools import DataToolsError, cli
from data_tools.from_folder import from_folder
from data_tools.reshard import expand_shards, reshard


def jpeg(i: int, size=(8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (i * 37 % 256, i * 11 % 256, 90)).save(out, format="JPEG")
    return out.getvalue()


def png(i: int, mode="RGBA", size=(10, 20)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (i % 256, 20, 30, 255) if mode == "RGBA" else i % 256).save(out, format="PNG")
    return out.getvalue()


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, in the order of the tar."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_out(out) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {k: v for s in manifest["shards"] for k, v in read_tar(out / s["name"]).items()}


def make_shards(folder, shards=3, per_shard=7) -> dict[str, dict[str, bytes]]:
    """shards x per_shard captioned samples (jpg, txt, json, cls); returns them all, key -> members, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    everything = {}
    for s in range(shards):
        samples = {f"{s:02d}{i:03d}": {"jpg": jpeg(s * 100 + i), "txt": f"caption {s} {i}".encode(),
                                       "json": json.dumps({"s": s, "i": i}).encode(), "cls": str(i % 3).encode()}
                   for i in range(per_shard)}
        write_tar(folder / f"{s:05d}.tar", samples)
        everything.update(samples)
    return everything


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_merge_keeps_every_sample_and_byte(tmp_path, capsys):
    source = make_shards(tmp_path / "in")
    out = tmp_path / "out"
    assert run_cli("reshard", tmp_path / "in", "--out", out, "--samples-per-shard", 5) == 0
    assert "21 samples from 3 shards into 5 shards" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("00000.tar", 5), ("00001.tar", 5), ("00002.tar", 5), ("00003.tar", 5), ("00004.tar", 1)]
    assert sorted(p.name for p in out.iterdir()) == [f"0000{i}.tar" for i in range(5)] + ["manifest.json"]
    for s in manifest["shards"]:
        path = out / s["name"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and s["bytes"] == path.stat().st_size
    assert manifest["total_samples"] == manifest["rows"] == 21
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
    assert manifest["failures"] == {} and manifest["failures_raw"] == {} and manifest["incomplete_shards"] == []
    assert manifest["samples_per_shard"] == 5 and manifest["shuffle"] is None and manifest["damaged_inputs"] == []
    assert manifest["source"] == str(tmp_path / "in") and manifest["input_shards"] == 3
    got = read_out(out)
    assert list(got) == list(source)  # no shuffle: the input order
    assert got == source  # every member of every sample, byte for byte


def test_split_and_brace_pattern(tmp_path):
    source = make_shards(tmp_path / "in", shards=2)
    pattern = f"{tmp_path}/in/{{00000..00001}}.tar"
    assert expand_shards(pattern) == [tmp_path / "in" / "00000.tar", tmp_path / "in" / "00001.tar"]
    manifest = reshard(expand_shards(pattern), tmp_path / "out", samples_per_shard=3)
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 3, 2]
    assert read_out(tmp_path / "out") == source
    manifest = reshard(expand_shards(f"{tmp_path}/in/00001.tar"), tmp_path / "one", samples_per_shard=1)
    assert [s["samples"] for s in manifest["shards"]] == [1] * 7
    with pytest.raises(DataToolsError, match="1 of 3 shards do not exist, e.g. .*00002.tar"):
        expand_shards(f"{tmp_path}/in/{{00000..00002}}.tar")


def test_shuffle_is_seeded(tmp_path):
    source = make_shards(tmp_path / "in", shards=4)
    inputs = expand_shards(str(tmp_path / "in"))

    def shuffled(name, seed, buffer=10):
        manifest = reshard(inputs, tmp_path / name, samples_per_shard=6, seed=seed, buffer=buffer)
        assert [s["samples"] for s in manifest["shards"]] == [6, 6, 6, 6, 4]
        assert manifest["shuffle"] == {"seed": seed, "buffer": buffer}
        return list(read_out(tmp_path / name).items()), [s["sha256"] for s in manifest["shards"]]

    a, a_sha = shuffled("a", seed=1)
    b, b_sha = shuffled("b", seed=1)
    c, _ = shuffled("c", seed=2)
    assert a == b and a_sha == b_sha  # same seed: same samples in the same order, byte-identical shards
    assert [k for k, _ in a] != [k for k, _ in c] != list(source)
    assert dict(a) == dict(c) == source  # the same samples, members untouched
    # samples of different input shards end up next to each other
    assert len({k[:2] for k, _ in a[:6]}) > 1
    d, _ = shuffled("d", seed=1, buffer=100_000)  # a buffer larger than the corpus: one global shuffle
    assert dict(d) == source and [k for k, _ in d] != [k for k, _ in a]


def test_corrupt_members_and_imageless_samples_dropped(tmp_path):
    source = make_shards(tmp_path / "in", shards=1)
    samples = dict(source)
    samples["00001"] = {**samples["00001"], "jpg": b"<html>not an image</html>"}  # its only image: sample dropped
    samples["00002"] = {**samples["00002"], "extra.png": png(2)[:40]}  # a second, cut image: member dropped
    samples["00003"] = {"txt": b"no image", "json": b"{}"}
    samples["00004"] = {**samples["00004"], "seg.PNG": png(4)}  # a second, good image (upper case) kept
    noisy = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(noisy, format="JPEG")
    assert Image.open(io.BytesIO(noisy.getvalue()[:-500])).verify() is None  # verify() alone would keep it
    samples["00005"] = {**samples["00005"], "jpg": noisy.getvalue()[:-500]}  # a JPEG cut short: dropped
    write_tar(tmp_path / "in" / "00000.tar", samples)
    manifest = reshard(expand_shards(str(tmp_path / "in")), tmp_path / "out", samples_per_shard=100)
    assert manifest["failures"] == {"decode_error": 2, "no_image": 1}
    assert manifest["dropped_members"] == {"corrupt_image": 3}
    assert manifest["total_samples"] == 4 and manifest["rows"] == 7
    got = read_out(tmp_path / "out")
    assert list(got) == ["00000", "00002", "00004", "00006"]
    assert got["00002"] == source["00002"] and got["00004"] == samples["00004"]


@pytest.mark.parametrize("cut", ["in_member", "at_member_boundary"])
def test_damaged_input_shard_reported_rest_resharded(tmp_path, capsys, cut):
    source = make_shards(tmp_path / "in")
    damaged = tmp_path / "in" / "00001.tar"
    with tarfile.open(damaged) as tar:
        members = tar.getmembers()
    # cut inside the jpg of its 4th sample, or right after its 3rd sample's last member
    end = members[12].offset_data + 10 if cut == "in_member" else members[12].offset
    os.truncate(damaged, end)
    assert run_cli("reshard", tmp_path / "in", "--out", tmp_path / "out", "--samples-per-shard", 4) == 1
    err = capsys.readouterr().err
    assert err.count(str(damaged)) == 1 and "damaged shard" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [d["path"] for d in manifest["damaged_inputs"]] == [str(damaged)]
    # shard 1 keeps its samples before the damage but the last, which may lack members
    kept = [k for k in source if not k.startswith("01") or k in ("01000", "01001")]
    assert list(read_out(tmp_path / "out")) == kept
    assert read_out(tmp_path / "out") == {k: source[k] for k in kept}
    assert manifest["failures"] == {"damaged_shard": 1} and manifest["total_samples"] == len(kept) == 16


def test_refusals(tmp_path, capsys):
    make_shards(tmp_path / "in", shards=1)
    inputs = expand_shards(str(tmp_path / "in"))
    assert run_cli("reshard", tmp_path / "in", "--out", tmp_path / "in", "--samples-per-shard", 5) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'in'} holds the input shards")
    with pytest.raises(DataToolsError, match="--samples-per-shard must be >= 1"):
        reshard(inputs, tmp_path / "out", samples_per_shard=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataToolsError, match="empty: no \\*.tar shards"):
        expand_shards(str(tmp_path / "empty"))
    assert run_cli("reshard", tmp_path / "in", "--out", tmp_path / "o", "--samples-per-shard", 5,
                   "--seed", 3) == 2
    assert "--seed and --buffer need --shuffle" in capsys.readouterr().err
    reshard(inputs, tmp_path / "out", samples_per_shard=2)
    with pytest.raises(DataToolsError, match="already holds 4 shards: use --force"):
        reshard(inputs, tmp_path / "out", samples_per_shard=5)
    manifest = reshard(inputs, tmp_path / "out", samples_per_shard=5, force=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]  # no stale shard
    assert manifest["total_samples"] == 7


@pytest.fixture
def image_folder(tmp_path):
    """ROOT/<class>/...: 3 classes created out of order, JPEG, PNG, a nested folder, one broken image, one text file."""
    root = tmp_path / "folder"
    files = {
        "zebra/z1.jpg": jpeg(1), "zebra/z0.PNG": png(2, "L"),
        "ant/a0.jpg": jpeg(3, size=(40, 20)), "ant/sub/a1.png": png(4), "ant/broken.jpg": b"GIF89a garbage",
        "bee/b0.jpeg": jpeg(5), "bee/notes.txt": b"not an image, not listed",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root, files


def test_from_folder(image_folder, tmp_path):
    root, files = image_folder
    out = tmp_path / "shards"
    assert run_cli("from-folder", root, "--out", out, "--samples-per-shard", 4) == 0
    assert (out / "classnames.txt").read_text() == "ant\nbee\nzebra\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["ant", "bee", "zebra"] and manifest["empty_classes"] == []
    assert manifest["failures"] == {"decode_error": 1} and manifest["rows"] == 6
    assert [s["samples"] for s in manifest["shards"]] == [4, 1]
    samples = read_out(out)
    # keys: positions in torchvision ImageFolder's listing (the broken image is number 1)
    order = ["ant/a0.jpg", "ant/broken.jpg", "ant/sub/a1.png", "bee/b0.jpeg", "zebra/z0.PNG", "zebra/z1.jpg"]
    assert list(samples) == ["000000000", "000000002", "000000003", "000000004", "000000005"]
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert meta["path"] == order[int(key)] and s["txt"].decode() == meta["class"] == meta["path"].split("/")[0]
        assert int(s["cls"]) == meta["label"] == ["ant", "bee", "zebra"].index(meta["class"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode in ("RGB", "L")
    for key in ("000000000", "000000003", "000000005"):  # a JPEG is kept as it is
        assert samples[key]["jpg"] == files[order[int(key)]]
    for key in ("000000002", "000000004"):  # RGBA and grey PNGs: RGB JPEGs
        assert Image.open(io.BytesIO(samples[key]["jpg"])).mode == "RGB"
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.datasets.ImageFolder(str(root))
    assert [(os.path.relpath(p, root), c) for p, c in tv.samples] == [(p, tv.class_to_idx[p.split("/")[0]])
                                                                      for p in order]
    # the training loader reads them: image and integer label
    from pipeline.data import to_sample
    import webdataset as wds
    raw = next(iter(wds.tariterators.tarfile_samples([{"url": str(out / "00000.tar")}])))
    sample = to_sample(raw)
    assert sample["label"] == 0 and sample["image"].size == (40, 20)

    manifest = from_folder(root, tmp_path / "small", image_size=8, seed=0)
    samples = read_out(tmp_path / "small")
    assert set(samples) == {"000000000", "000000002", "000000003", "000000004", "000000005"}
    assert Image.open(io.BytesIO(samples["000000000"]["jpg"])).size == (16, 8)  # shorter side 8
    assert Image.open(io.BytesIO(samples["000000002"]["jpg"])).size == (8, 16)
    assert Image.open(io.BytesIO(samples["000000003"]["jpg"])).size == (11, 8)  # 8x6 upscaled: 10.67 rounded
    with pytest.raises(DataToolsError, match="is inside ROOT"):
        from_folder(root, root / "shards")


def test_from_csv(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg(1))
    (images / "b.png").write_bytes(png(2))
    (images / "c.jpg").write_bytes(jpeg(3))
    (images / "bad.jpg").write_bytes(b"\xff\xd8 cut")
    (tmp_path / "data" / "labels.csv").write_text(
        "file,species,other\nimages/a.jpg,zebra,x\nimages/b.png,ant,y\nimages/missing.jpg,ant,z\n"
        "images/c.jpg,zebra,\nimages/bad.jpg,bee,\nimages/a.jpg,,w\n")
    out = tmp_path / "out"
    assert run_cli("from-folder", "--csv", tmp_path / "data" / "labels.csv", "--path-col", "file",
                   "--label-col", "species", "--out", out) == 0
    assert (out / "classnames.txt").read_text() == "ant\nbee\nzebra\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failures"] == {"decode_error": 1, "missing_field": 1, "missing_file": 1}
    assert manifest["total_samples"] == 3 and manifest["rows"] == 6
    samples = read_out(out)
    assert {k: (s["cls"], s["txt"]) for k, s in samples.items()} == {
        "000000000": (b"2", b"zebra"), "000000001": (b"0", b"ant"), "000000003": (b"2", b"zebra")}
    assert json.loads(samples["000000001"]["json"]) == {"path": "images/b.png", "label": 0, "class": "ant"}
    assert Counter(manifest["classes"]) == Counter(["ant", "bee", "zebra"])
    with pytest.raises(DataToolsError, match="no column 'label' \\(--label-col\\)"):
        from_folder(None, tmp_path / "o2", csv_path=str(tmp_path / "data" / "labels.csv"), path_col="file")


def test_shuffle_buffer_streams():
    """Memory holds the buffer, not the corpus: an endless input streams, no sample moves more than B earlier."""
    from itertools import count, islice
    from random import Random

    from data_tools.reshard import shuffled

    got = [s["i"] for s in islice(shuffled(({"i": i} for i in count()), 5, Random(0)), 200)]
    assert len(set(got)) == 200 and all(i <= p + 5 for p, i in enumerate(got)) and got != sorted(got)
