"""Training batches streamed from WebDataset shards (img2dataset layout: {key}.jpg, {key}.txt, {key}.json, {key}.cls).

Each (rank, loader worker) pair is one *stream*: a pure function of (seed, stream id) and its position, so a run
resumed from a checkpoint consumes exactly the samples an uninterrupted run would have.

A stream draws shards with replacement (resampled, as open_clip does for large corpora, so no rank runs dry when
shards do not divide evenly) — from several sources, each drawn with its weight, when data.train lists them — or,
in epoch mode (data.resampled=false), walks its own share of the shards (split by rank and worker) in a seeded
order that changes every epoch. It keeps `open_shards` of them open, each in its own seeded random order, and picks the
next sample from a random open shard: the mixing of a shuffle buffer several shards wide, with a state that is
small and exact — the RNG state plus, per open shard, its URL, permutation seed and offset. Each batch carries
its stream's state after that batch; the trainer keeps the last one consumed per worker and saves it with the
checkpoint. Restoring re-reads at most `open_shards` shards per stream.

Shards are read with webdataset's tar iterators (local paths, `pipe:` and fsspec URLs alike); JPEGs much larger
than the model's input decode at reduced size (`decode_image`). Bad shards and samples are skipped with a warning and counted (`data/skipped`); an unreadable shard
is reported once per stream with its path.
"""
from __future__ import annotations

import bisect
import io
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
STATE = "_stream_state"  # batch entry: the producing stream's state after this batch


def expand_urls(spec) -> list[str]:
    """'a/{00000..00009}.tar' or 'a/{0..3}.tar::b/{0..9}.tar' or a list of those -> list of shard paths."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    return [url for s in specs for url in braceexpand.braceexpand(str(s))]


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def sources(spec) -> list[Source]:
    """data.train as sources: a shard spec or a list of specs is one source; a list of {urls, weight} mappings is
    one source each, drawn with probability weight / sum(weights) per shard draw (so, with shards of similar
    size, that share of the samples)."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not any(hasattr(i, "keys") for i in items):
        return [Source(expand_urls(spec))]
    out = []
    for i, item in enumerate(items):
        if not hasattr(item, "keys") or set(item.keys()) - {"urls", "weight"} or "urls" not in item:
            raise ValueError(f"data.train[{i}]={item!r}: each source is {{urls: SHARDS, weight: W}}")
        weight = float(item.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.train[{i}].weight={weight}: must be > 0")
        out.append(Source(expand_urls(item["urls"]), weight))
    return out


def decode_image(data: bytes, draft: int | None = None) -> Image.Image:
    """RGB image from encoded bytes. With `draft`, a JPEG whose shorter side is at least twice that is decoded by
    libjpeg at 1/2, 1/4 or 1/8 scale (DCT scaling: an anti-aliased downsample for free), keeping the shorter side
    >= draft: the train transform resizes to that size anyway, and decoding a 1024 px photo for a 224 px crop is
    most of a loader's time."""
    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG" and min(img.size) >= 2 * draft:
        img.draft("RGB", (draft, draft))
    return img.convert("RGB")


def to_sample(raw: dict, draft: int | None = None) -> dict:
    """Decode one tar sample and normalise img2dataset / WebDataset keys into what tasks read: image, text, label."""
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')} has no image ({', '.join(IMAGE_KEYS)})")
    out = {"image": decode_image(raw[key], draft)}
    if "txt" in raw:
        out["text"] = raw["txt"].decode("utf-8")
    if "cls" in raw:
        out["label"] = int(raw["cls"])
    return out


@dataclass
class StreamState:
    """Everything that determines what a stream yields next. Plain types: saved with the checkpoint."""

    stream: int  # global id: rank * workers + worker, fixed for the life of the run
    rng: tuple | None = None  # random.Random state; None = not started (seeded from seed and stream id)
    open: list[list] = field(default_factory=list)  # [url, permutation seed, offset] per open shard
    epoch: int = 0  # epoch mode: passes over this stream's shards, and shards opened in this one
    cursor: int = 0
    batches: int = 0
    skipped: int = 0


class _Shard:
    """One open shard: its samples (raw bytes, read once), visited in a seeded random order."""

    def __init__(self, url: str, perm_seed: int, offset: int = 0):
        self.url, self.perm_seed, self.offset = url, perm_seed, offset
        errors: list[Exception] = []
        # A truncated or corrupt tar keeps the samples before the damage; the damage is reported once.
        self.samples = list(wds.tariterators.tarfile_samples([{"url": url}], handler=lambda e: errors.append(e) or True))
        self.error = errors[0] if errors else None
        random.Random(perm_seed).shuffle(self.samples)

    def done(self) -> bool:
        return self.offset >= len(self.samples)


class ShardStream(IterableDataset):
    """Infinite batches for one rank; each DataLoader worker runs one stream (see module docstring)."""

    def __init__(self, sources: list[Source], transform: Callable[[dict], dict], batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, open_shards: int = 4,
                 resampled: bool = True, decode_size: int | None = None, resume: list[dict] | None = None):
        self.sources, self.transform, self.batch_size = sources, transform, batch_size
        self.decode_size = decode_size
        self.urls = [u for s in sources for u in s.urls]
        self.seed, self.open_shards, self.resampled = seed, open_shards, resampled
        self._reported: set[str] = set()
        self.slots = max(1, num_workers)
        self.streams = world_size * self.slots
        total = sum(s.weight for s in sources)
        self._cumulative = [sum(s.weight for s in sources[:i + 1]) / total for i in range(len(sources))]
        # slot i of this rank plays stream resume[i] (the order in which the trainer will consume them)
        self.states = resume or [vars(StreamState(stream=rank * self.slots + i)) for i in range(self.slots)]

    def __iter__(self):
        info = get_worker_info()
        state = StreamState(**self.states[info.id if info else 0])
        rng = random.Random(self.seed * 1_000_003 + state.stream)
        if state.rng is not None:
            rng.setstate(_as_tuple(state.rng))
        shards = [s for s in (self._open(url, p, off, state) for url, p, off in state.open) if s is not None]
        while True:
            samples = []
            # Per-batch seeding: random augmentations replay exactly after a resume.
            torch.manual_seed(hash((self.seed, state.stream, state.batches)) & (2**63 - 1))
            while len(samples) < self.batch_size:
                failed = 0
                while len(shards) < self.open_shards and (self.resampled or not shards or state.cursor < len(
                        self.urls[state.stream::self.streams])):  # epoch mode: drain an epoch before the next
                    shard = self._open(self._next_url(rng, state), rng.getrandbits(63), 0, state)
                    if shard is not None:
                        shards.append(shard)
                    elif (failed := failed + 1) >= max(64, 4 * len(self.urls)):
                        raise RuntimeError(f"{failed} shards in a row were empty or unreadable, e.g. "
                                           f"{self.urls[0]}: is data.train right?")
                j = rng.randrange(len(shards))
                raw = shards[j].samples[shards[j].offset]
                shards[j].offset += 1
                if shards[j].done():
                    shards.pop(j)
                try:
                    samples.append(self.transform(to_sample(raw, self.decode_size)))
                except Exception as e:  # corrupt image, missing field: skip and count
                    state.skipped += 1
                    log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), repr(e)[:200])
            state.batches += 1
            state.rng, state.open = rng.getstate(), [[s.url, s.perm_seed, s.offset] for s in shards]
            batch = default_collate(samples)
            batch[STATE] = dict(vars(state))  # a snapshot: `state` moves on with the next batch
            yield batch

    def _next_url(self, rng: random.Random, state: StreamState) -> str:
        if not self.resampled:  # this stream's share of the shards, in an order seeded by the epoch
            mine = self.urls[state.stream::self.streams]
            if state.cursor == len(mine):
                state.epoch, state.cursor = state.epoch + 1, 0
            random.Random(hash((self.seed, state.stream, state.epoch)) & (2**63 - 1)).shuffle(mine)
            state.cursor += 1
            return mine[state.cursor - 1]
        source = self.sources[bisect.bisect_right(self._cumulative, rng.random())] if len(self.sources) > 1 \
            else self.sources[0]
        return source.urls[rng.randrange(len(source.urls))]

    def _open(self, url: str, perm_seed: int, offset: int, state: StreamState) -> _Shard | None:
        shard = _Shard(url, perm_seed, offset)
        if shard.error is not None:
            state.skipped += 1
            self._warn_once(url, f"shard {url} is damaged ({len(shard.samples)} samples readable): "
                                 f"{repr(shard.error)[:200]}")
        if shard.done():
            self._warn_once(url, f"skipping empty shard {url}")
            return None
        return shard

    def _warn_once(self, url: str, message: str) -> None:
        # Resampling meets a bad shard again and again; one line per shard and stream is enough.
        if url not in self._reported:
            self._reported.add(url)
            log.warning(message)


def _worker_init(_: int) -> None:
    """SLURM signals every process of a job step (scancel, `scontrol requeue`, pre-emption, the time limit). The
    trainer turns SIGTERM/USR1/USR2 into "save at the next step boundary", which needs its loader workers alive
    until then; a worker killed by the signal would end the trainer at once (torch raises when a worker dies).
    Workers still exit when the trainer shuts them down or dies (torch's watchdog), and SIGKILL ends them."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def _as_tuple(x):
    """random.Random states come back from checkpoints as nested lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainStream:
    """Iterator of training batches for this rank, with a position that `state_dict` / resume restore exactly."""

    def __init__(self, spec, transform, batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, open_shards: int = 4, resampled: bool = True, decode_size: int | None = None,
                 state: dict | None = None):
        srcs = sources(spec)
        urls = [u for s in srcs for u in s.urls]
        if not urls or not all(s.urls for s in srcs):
            raise ValueError(f"data.train={spec!r}: no shards")
        if not resampled and len(srcs) > 1:
            raise ValueError("data.train: weighted sources are drawn with replacement; use data.resampled=true")
        if not resampled and len(urls) < world_size * max(1, num_workers):
            raise ValueError(f"data.resampled=false: {len(urls)} shards for {world_size} ranks x "
                             f"{max(1, num_workers)} loader workers; every stream needs at least one shard")
        if all("://" not in u and not u.startswith("pipe:") for u in urls) and not any(map(os.path.exists, urls)):
            raise FileNotFoundError(f"data.train={spec!r}: none of its {len(urls)} shards exists (e.g. {urls[0]})")
        resume = None
        if state:
            if state["num_workers"] != num_workers:
                raise ValueError(f"data.num_workers={num_workers}, but the checkpoint's data position was saved with "
                                 f"{state['num_workers']}: resume with the same value")
            resume = state["streams"]
        dataset = ShardStream(srcs, transform, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                              seed=seed, open_shards=open_shards, resampled=resampled, decode_size=decode_size,
                              resume=resume)
        self.num_workers = num_workers
        self._states = list(dataset.states)  # in serving order: [0] is the stream whose batch comes next
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
        self._it = None

    @property
    def skipped(self) -> int:
        return sum(s["skipped"] for s in self._states)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        state = batch.pop(STATE)
        # The DataLoader serves its workers round-robin, so the stream after this one serves next.
        assert state["stream"] == self._states[0]["stream"], "DataLoader served its workers out of order"
        self._states = self._states[1:] + [state]
        return batch

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "streams": list(self._states)}
