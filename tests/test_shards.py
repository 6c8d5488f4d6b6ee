"""Shard readers: an indexed local shard and a streamed remote one give exactly webdataset's samples, resume at a
saved position, and keep what is readable of a damaged tar."""
import io
import os

import pytest
import webdataset as wds

from pipeline.shards import BUFFER, IndexedShard, StreamedShard, open_shard


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(40):
            # a long key (past tar's 100-character names: a PAX header before the member) every 7th sample
            key = f"{i:04d}" if i % 7 else "k" * 120 + f"{i:04d}"
            w.write({"__key__": key, "jpg": os.urandom(700 + i), "txt": f"caption é {i}", "json": b"{}"})
    return path


def _all(reader) -> list[dict]:
    out = []
    while not reader.done():
        out.append(reader.next())
    return out


def _webdataset(path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.tariterators.tarfile_samples([{"url": str(path)}])}


def test_indexed_shard_reads_webdatasets_samples_in_a_seeded_order(shard):
    reference = _webdataset(shard)
    a, b = _all(IndexedShard(str(shard), perm_seed=3)), _all(IndexedShard(str(shard), perm_seed=3))
    assert {s["__key__"]: s for s in a} == reference and len(a) == 40
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]  # the same seed, the same order
    assert [s["__key__"] for s in a] != [s["__key__"] for s in _all(IndexedShard(str(shard), perm_seed=4))]
    reader = IndexedShard(str(shard), perm_seed=3, offset=25)  # a saved position
    assert [s["__key__"] for s in _all(reader)] == [s["__key__"] for s in a[25:]]
    assert reader.starts.nbytes + reader.ends.nbytes == 16 * 40  # the index: 16 bytes a sample


def test_streamed_shard_through_a_pipe_resumes_exactly(shard):
    url = f"pipe:cat {shard}"
    assert open_shard(url, 0).__class__ is StreamedShard and open_shard(str(shard), 0).__class__ is IndexedShard
    whole = _all(StreamedShard(url, perm_seed=5))
    assert {s["__key__"]: s for s in whole} == {k: {**v, "__url__": url} for k, v in _webdataset(shard).items()}
    rest = _all(StreamedShard(url, perm_seed=5, offset=13))  # replays the first 13, then goes on
    assert [s["__key__"] for s in rest] == [s["__key__"] for s in whole[13:]]
    assert BUFFER < 1000  # memory: a bounded buffer, whatever the shard's size


def test_damaged_shards_keep_their_readable_samples(shard, tmp_path):
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2])
    reader = IndexedShard(str(cut), perm_seed=0)
    samples = _all(reader)
    assert reader.error is not None and 10 < len(samples) < 40
    reference = _webdataset(shard)
    assert all(s == reference[s["__key__"]] | {"__url__": str(cut)} for s in samples)  # whole samples only
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    assert IndexedShard(str(garbage), 0).done() and IndexedShard(str(garbage), 0).error is not None
    missing = IndexedShard(str(tmp_path / "missing.tar"), 0)
    assert missing.done() and isinstance(missing.error, FileNotFoundError)


def test_meta_members_and_extension_case_follow_webdataset(tmp_path):
    import tarfile

    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:
        for name, payload in (("__meta__", b"x"), ("a.JPG", b"1"), ("a.txt", b"t"), ("dir/b.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    got = {s["__key__"]: s for s in _all(IndexedShard(str(path), 0))}
    assert got == _webdataset(path)
    assert set(got) == {"a", "dir/b"} and got["a"]["jpg"] == b"1"
