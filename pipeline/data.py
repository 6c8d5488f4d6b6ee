"""Training batches streamed from WebDataset shards (img2dataset layout: {key}.jpg, {key}.txt, {key}.json, {key}.cls).

Shards are resampled with replacement (an infinite stream, as open_clip does for large corpora), seeded per
rank and worker, so ranks see different data and no rank runs dry when shards do not divide evenly.
Bad shards and samples are skipped with a warning and counted; each batch carries its worker's count so the
trainer can report the total (`data/skipped`) without shared state between processes.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate, get_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;jpeg;png;webp"
SKIPPED = "_skipped"  # batch entry: (worker id, samples skipped so far by that worker)

_skipped = 0  # per worker process


def _skip(exn: Exception) -> bool:
    """webdataset handler: warn, count, continue."""
    global _skipped
    _skipped += 1
    log.warning("skipping bad sample: %s", repr(exn)[:300])
    return True


def expand_urls(spec) -> list[str]:
    """'a/{00000..00009}.tar' or 'a/{0..3}.tar::b/{0..9}.tar' or a list of those -> list of shard paths."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    return [url for s in specs for url in braceexpand.braceexpand(str(s))]


def _to_sample(sample: dict) -> dict:
    """Normalise img2dataset / WebDataset keys into what tasks read: image, text, label."""
    out = {"__key__": sample["__key__"]}
    image = next((sample[k] for k in IMAGE_KEYS.split(";") if k in sample), None)
    if image is None:
        raise ValueError(f"sample {sample['__key__']} has no image ({IMAGE_KEYS})")
    out["image"] = image
    if "txt" in sample:
        out["text"] = sample["txt"]
    if "cls" in sample:
        out["label"] = int(sample["cls"])
    return out


def _collate(samples: list[dict]) -> dict:
    """Stack tensors (webdataset's map() carries __key__ along: dropped) and stamp the worker's skip count."""
    batch = default_collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in samples])
    info = get_worker_info()
    batch[SKIPPED] = torch.tensor([info.id if info else 0, _skipped])
    return batch


def _worker_seed(seed: int) -> int:
    return seed * 100_003 + wds.utils.pytorch_worker_seed()


def train_pipeline(spec, transform: Callable[[dict], dict], batch_size: int, *, shuffle_buffer: int = 1000,
                   seed: int = 0) -> wds.DataPipeline:
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"data.train={spec!r}: no shards")
    return wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=functools.partial(_worker_seed, seed), deterministic=True),
        wds.tarfile_to_samples(handler=_skip),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100)),
        wds.decode("pilrgb", handler=_skip),
        wds.map(_to_sample, handler=_skip),
        wds.map(transform, handler=_skip),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )


class TrainStream:
    """Iterator of training batches (dicts of tensors) that tallies skipped samples over all workers."""

    def __init__(self, spec, transform, batch_size: int, *, num_workers: int = 2, shuffle_buffer: int = 1000,
                 seed: int = 0):
        pipeline = train_pipeline(spec, transform, batch_size, shuffle_buffer=shuffle_buffer, seed=seed)
        self.loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
        self._per_worker: dict[int, int] = {}
        self._it: Iterator | None = None

    @property
    def skipped(self) -> int:
        return sum(self._per_worker.values())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        worker, count = batch.pop(SKIPPED).tolist()
        self._per_worker[worker] = count
        return batch
