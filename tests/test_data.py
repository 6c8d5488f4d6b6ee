"""The training stream: brace-expanded shards, decode, transform, batches; bad samples skipped and counted."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import TrainStream, expand_urls

ROOT = Path(__file__).resolve().parent.parent


def _jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as w:
            for i in range(20):
                w.write({"__key__": f"{s}{i:04d}", "jpg": _jpeg((10 * i, 0, 0)), "txt": f"caption {i}"})
            w.write({"__key__": f"{s}bad1", "jpg": b"\xff\xd8 this is not a jpeg", "txt": "corrupt"})
            w.write({"__key__": f"{s}bad2", "txt": "no image at all"})
    return str(tmp_path / "{00000..00001}.tar")


def transform(sample):
    return {"image": torch.from_numpy(__import__("numpy").asarray(sample["image"])).float(),
            "text": torch.tensor(len(sample["text"]))}


def test_expand_urls():
    assert expand_urls("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_urls(["x/{0..1}.tar", "y.tar"]) == ["x/0.tar", "x/1.tar", "y.tar"]
    assert expand_urls("a/{0..1}.tar::b/{5..6}.tar") == ["a/0.tar", "a/1.tar", "b/5.tar", "b/6.tar"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_and_counts_skipped_samples(shards, workers):
    stream = TrainStream(shards, transform, batch_size=8, num_workers=workers, open_shards=2)
    batches = [next(stream) for _ in range(12)]  # ~96 samples: every shard read more than once
    assert set(batches[0]) == {"image", "text"}
    assert batches[0]["image"].shape == (8, 16, 16, 3)
    assert {int(t) for b in batches for t in b["text"]} <= {len("caption 0"), len("caption 10")}  # bad ones never reach a batch
    assert stream.skipped >= 2  # both bad members of at least one shard were met, counted over all workers


def augment(sample):
    """A random augmentation (torch RNG, like torchvision's) so the test also covers its replay."""
    return {"image": torch.rand(2), "text": torch.tensor(len(sample["text"])), "key": torch.tensor(hash(sample["text"]) % 1000)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_yields_exactly_what_an_uninterrupted_one_would(shards, workers):
    kwargs = dict(batch_size=4, num_workers=workers, seed=3, open_shards=2, rank=1)
    reference = TrainStream(shards, augment, **kwargs)
    expected = [next(reference) for _ in range(15)]
    first = TrainStream(shards, augment, **kwargs)
    consumed = [next(first) for _ in range(7)]
    state = first.state_dict()
    resumed = TrainStream(shards, augment, state=state, **kwargs)
    got = consumed + [next(resumed) for _ in range(8)]
    for a, b in zip(expected, got):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["key"], b["key"])
    other_rank = TrainStream(shards, augment, **{**kwargs, "rank": 0})
    assert not torch.equal(next(other_rank)["image"], expected[0]["image"])  # ranks read different streams
    with pytest.raises(ValueError, match="data.num_workers"):
        TrainStream(shards, augment, state=state, **{**kwargs, "num_workers": workers + 1})


def test_missing_or_empty_shards_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="none of its 3 shards exists"):
        TrainStream(str(tmp_path / "{0..2}.tar"), transform, batch_size=2, num_workers=0)
    for i in range(2):
        with wds.TarWriter(str(tmp_path / f"empty{i}.tar")):
            pass
    stream = TrainStream(str(tmp_path / "empty{0..1}.tar"), transform, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="shards in a row were empty or unreadable"):
        next(stream)


def test_loader_workers_outlive_slurm_signals_but_not_their_trainer(shards, tmp_path):
    """SLURM signals every process of a job (slurmstepd sends them); the trainer saves at its next step, so its
    workers must survive those. SIGTERM from the trainer itself (torch's shutdown, multiprocessing's exit) ends
    them, and so does the trainer's death."""
    import os
    import signal
    import subprocess
    import time

    stream = TrainStream(shards, transform, batch_size=4, num_workers=2)
    before = [next(stream)["text"] for _ in range(2)]
    workers = stream._it._workers
    for w in workers:  # from another process, as slurmstepd's are
        subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
        subprocess.run(["kill", "-USR1", str(w.pid)], check=True)
        subprocess.run(["kill", "-USR2", str(w.pid)], check=True)
    after = [next(stream)["text"] for _ in range(6)]
    assert len(before) + len(after) == 8 and all(w.is_alive() for w in workers)
    os.kill(workers[0].pid, signal.SIGTERM)  # from the trainer: obeyed
    workers[0].join(timeout=10)
    assert workers[0].exitcode == 0
    stream.close()
    assert not any(w.is_alive() for w in workers)

    # A trainer killed -9 takes its workers with it (the kernel's parent-death signal).
    script = tmp_path / "trainer.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.test_data import transform
from pipeline.data import TrainStream
stream = TrainStream({shards!r}, transform, batch_size=4, num_workers=2)
next(stream)
print(*[w.pid for w in stream._it._workers], flush=True)
time.sleep(600)
""")
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in trainer.stdout.readline().split()]
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_script_that_iterates_and_exits_does_not_hang(shards, tmp_path):
    """Interpreter exit with live workers: multiprocessing terminates (SIGTERM from the parent) and joins them."""
    script = tmp_path / "script.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_data import transform
from pipeline.data import TrainStream
stream = TrainStream({shards!r}, transform, batch_size=4, num_workers=2)
for _ in range(3):
    next(stream)
print("done", flush=True)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


def _captioned_shards(root, name, n_shards, per_shard):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{s:03d}{i:04d}", "jpg": _jpeg((i, 0, 0)), "txt": f"{name} {s}-{i}"})
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


def text_only(sample):
    return {"text": sample["text"]}


def test_weighted_sources_mix_by_weight(tmp_path):
    spec = [{"urls": _captioned_shards(tmp_path / "a", "a", 6, 8), "weight": 0.8},
            {"urls": _captioned_shards(tmp_path / "b", "b", 6, 8), "weight": 0.2}]
    stream = TrainStream(spec, text_only, batch_size=16, num_workers=0, open_shards=2)
    texts = [t for _ in range(400) for t in next(stream)["text"]]  # ~800 shard draws: 0.8 +- 0.014
    share_a = sum(t.startswith("a ") for t in texts) / len(texts)
    assert 0.74 < share_a < 0.86, share_a
    with pytest.raises(ValueError, match=r"data.train\[1\].weight=0.0"):
        TrainStream([spec[0], {**spec[1], "weight": 0}], text_only, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="use data.resampled=true"):
        TrainStream(spec, text_only, batch_size=4, num_workers=0, resampled=False)


def test_epoch_mode_reads_every_sample_once_per_epoch(tmp_path):
    """resampled=false: 2 ranks, each stream its own half of the shards; an epoch is every sample exactly once."""
    spec = _captioned_shards(tmp_path / "c", "c", 4, 10)
    everything = {f"c {s}-{i}" for s in range(4) for i in range(10)}
    ranks = [TrainStream(spec, text_only, batch_size=5, rank=r, world_size=2, num_workers=0, open_shards=4,
                         resampled=False) for r in range(2)]
    epochs = []
    for _ in range(2):
        seen = [t for stream in ranks for _ in range(4) for t in next(stream)["text"]]
        assert sorted(seen) == sorted(everything)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch
    with pytest.raises(ValueError, match="4 shards for 2 ranks x 3 loader workers"):
        TrainStream(spec, text_only, batch_size=5, world_size=2, num_workers=3, resampled=False)


def test_draft_decode_matches_full_decode_after_resize():
    """A JPEG 4x the target decodes at reduced size; after the resize the model sees, it matches the full decode."""
    import numpy as np

    from pipeline.data import decode_image

    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    big = Image.fromarray(smooth).resize((1024, 768), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    drafted, full = decode_image(buf.getvalue(), draft=224), decode_image(buf.getvalue())
    assert full.size == (1024, 768) and min(drafted.size) >= 224 and drafted.size[0] < 1024
    a, b = (np.asarray(im.resize((298, 224), Image.BICUBIC), dtype=float) for im in (drafted, full))
    assert np.abs(a - b).mean() < 2.0
    small = io.BytesIO()
    big.resize((300, 225)).save(small, "JPEG")
    assert decode_image(small.getvalue(), draft=224).size == (300, 225)  # under 2x the target: full decode


def _keys_read(stream, epoch: int | None = None, limit: int = 10_000) -> list[str]:
    """Texts of batches of one sample: `limit` of them, or (`epoch`) those each stream read in that epoch, until
    all the rank's streams have left it (its loader workers take turns, each one a stream)."""
    out, left = [], set()
    while len(out) < limit:
        text = next(stream)["text"][0]
        state = stream.state_dict()["streams"][-1]  # the state of the stream that produced this batch
        if epoch is None or state["epoch"] == epoch:
            out.append(text)
        else:
            left.add(state["stream"])
            if len(left) == len(stream.state_dict()["streams"]):
                break
    return out


def test_epoch_mode_resumed_on_other_ranks_and_workers_reads_every_sample_once(tmp_path):
    """2 ranks without loader workers read part of an epoch; the run resumes on 3 ranks x 2 workers: across the
    change every sample of the epoch is read exactly once, none twice, none skipped."""
    from pipeline.data import relayout

    spec = _captioned_shards(tmp_path / "e", "e", 6, 10)
    everything = sorted(f"e {s}-{i}" for s in range(6) for i in range(10))
    kw = dict(batch_size=1, seed=5, open_shards=2, resampled=False)
    old = [TrainStream(spec, text_only, rank=r, world_size=2, num_workers=0, **kw) for r in range(2)]
    before = [t for s in old for t in _keys_read(s, limit=7)]  # some shards read in part, some not opened
    saved = [s.state_dict() for s in old]
    new = [TrainStream(spec, text_only, rank=r, world_size=3, num_workers=2, **kw,
                       state=relayout(saved, spec, rank=r, world_size=3, num_workers=2, seed=5, resampled=False,
                                      salt=7)) for r in range(3)]
    after = [t for s in new for t in _keys_read(s, epoch=0)]
    for s in new:
        s.close()
    assert len(before) == 14 and sorted(before + after) == everything


def test_resampled_resume_on_other_ranks_finishes_open_shards_then_draws_afresh(tmp_path):
    from pipeline.data import relayout

    spec = _captioned_shards(tmp_path / "r", "r", 4, 10)
    kw = dict(batch_size=1, seed=1, open_shards=1, num_workers=0)
    old = TrainStream(spec, text_only, **kw)
    first = _keys_read(old, limit=3)  # one shard open, 3 of its 10 samples read
    saved = old.state_dict()
    (url, _, offset), = saved["streams"][0]["open"]
    assert offset == 3
    states = [relayout([saved], spec, rank=r, world_size=2, num_workers=0, seed=1, salt=9) for r in range(2)]
    assert states[0]["streams"][0]["queue"] == saved["streams"][0]["open"] and not states[1]["streams"][0]["queue"]
    resumed = TrainStream(spec, text_only, **kw, state=states[0])
    rest = _keys_read(resumed, limit=7)
    shard = {t.rsplit("-", 1)[0] for t in first}
    assert {t.rsplit("-", 1)[0] for t in rest} == shard and sorted(first + rest) == sorted(
        f"{next(iter(shard))}-{i}" for i in range(10))  # the open shard's unread rest, exactly
    fresh_from_start = _keys_read(TrainStream(spec, text_only, rank=1, world_size=2, **kw), limit=20)
    assert _keys_read(TrainStream(spec, text_only, rank=1, world_size=2, **kw, state=states[1]), limit=20) \
        != fresh_from_start  # salted: not a replay of the run's first draws


def test_a_changed_data_train_starts_the_streams_afresh(tmp_path, caplog):
    spec = _captioned_shards(tmp_path / "a", "a", 2, 5)
    stream = TrainStream(spec, text_only, batch_size=2, num_workers=0)
    next(stream)
    other = _captioned_shards(tmp_path / "b", "b", 2, 5)
    with caplog.at_level("WARNING"):
        TrainStream(other, text_only, batch_size=2, num_workers=0, state=stream.state_dict())
    assert "data.train differs from the checkpoint's" in caplog.text


def test_damaged_and_empty_shards_are_reported_once_with_their_path(tmp_path):
    spec = _captioned_shards(tmp_path / "d", "d", 2, 6)
    data = (tmp_path / "d/00001.tar").read_bytes()
    (tmp_path / "d/00001.tar").write_bytes(data[:len(data) // 2])  # cut short: the first samples stay readable
    with wds.TarWriter(str(tmp_path / "d/00002.tar")):
        pass
    stream = TrainStream(str(tmp_path / "d/{00000..00002}.tar"), text_only, batch_size=4, num_workers=2,
                         open_shards=3)
    for _ in range(12):
        next(stream)
    reports = stream.take_reports()
    assert set(reports) == {str(tmp_path / "d/00001.tar"), str(tmp_path / "d/00002.tar")}  # one per shard
    assert "is damaged (" in reports[str(tmp_path / "d/00001.tar")]
    assert "skipping empty shard" in reports[str(tmp_path / "d/00002.tar")]
    stream.close()
