"""The training stream: brace-expanded shards, decode, transform, batches; bad samples skipped and counted."""
import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import TrainStream, expand_urls


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


def test_loader_workers_outlive_slurm_signals(shards):
    """SLURM signals every process of a job; the trainer saves at its next step, so its workers must survive."""
    import os
    import signal

    stream = TrainStream(shards, transform, batch_size=4, num_workers=2)
    before = [next(stream)["text"] for _ in range(2)]
    workers = stream._it._workers
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(w.pid, sig)
    after = [next(stream)["text"] for _ in range(6)]
    assert len(before) + len(after) == 8 and all(w.is_alive() for w in workers)


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
    texts = [t for _ in range(100) for t in next(stream)["text"]]
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
