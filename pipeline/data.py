"""Training batches streamed from WebDataset shards (img2dataset layout: {key}.jpg, {key}.txt, {key}.json, {key}.cls).

Each (rank, loader worker) pair is one *stream*: a pure function of (seed, stream id) and its position, so a run
resumed from a checkpoint consumes exactly the samples an uninterrupted run would have.

A stream draws shards with replacement (resampled, as open_clip does for large corpora, so no rank runs dry when
shards do not divide evenly) — from several sources, each drawn with its weight, when data.train lists them — or,
in epoch mode (data.resampled=false), walks its own share of the shards (split by rank and worker) in a seeded
order that changes every epoch. It keeps `open_shards` of them open, each in its own seeded random order, and picks
the next sample from a random open shard: the mixing of a shuffle buffer several shards wide, with a state that is
small and exact — the RNG state plus, per open shard, its URL, permutation seed and offset. Each batch carries
its stream's state after that batch; the trainer keeps the last one consumed per worker and saves it with the
checkpoint.

Shards are read by pipeline/shards.py: local ones by sample offset through an index of their tar headers (a stream
holds indexes, never whole shards: memory does not grow with the samples per shard), `pipe:` and URL ones in tar
order through a bounded shuffle buffer. Restoring a position re-reads only the headers of the open local shards,
and replays at most one shard per open remote one.

A run resumed on another number of ranks or loader workers (`relayout`) hands what the old streams had left — the
unread rest of every shard they had open and, in epoch mode, the shards of their share not yet opened — to the new
streams before they draw anew. In epoch mode every sample of the epoch is then read exactly once across the change.
In resampled mode what is kept is the unread rest of the open shards, the sample count and the skipped count; the
draws that follow are a fresh sequence seeded from (data.seed, the step of the change, the stream), neither a
replay of the run's first draws nor those the old layout would have made (its streams no longer exist).

JPEGs much larger than the model's input decode at reduced size (`decode_image`). Bad samples are skipped with a
warning and counted (`data/skipped`); a damaged or empty shard is counted and reported once per run: streams pass
their reports to the trainer, whose rank 0 logs each shard once (`take_reports`).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import hashlib
import io
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline import faults
from pipeline.shards import open_shard

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
STATE = "_stream_state"  # batch entry: the producing stream's state after this batch
REPORTS = "_shard_reports"  # batch entry: damaged or empty shards the stream met since its last batch
PREFETCH = 4  # batches each loader worker keeps ready (in shared memory: `launch plan` counts them)


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

    stream: int  # global id: rank * workers + worker, fixed for the life of a layout
    rng: tuple | None = None  # random.Random state; None = not started (seeded from seed, salt and stream id)
    open: list[list] = field(default_factory=list)  # [url, permutation seed, offset] per open shard
    # shards to open before drawing new ones, [url, permutation seed or None, offset]: after a relayout, this
    # stream's share of what the old streams had left
    queue: list[list] = field(default_factory=list)
    epoch: int = 0  # epoch mode: passes over this stream's shards, and shards opened in this one
    cursor: int = 0
    batches: int = 0
    skipped: int = 0
    salt: int = 0  # the step of the last relayout (0: none): seeds fresh draws that replay nothing


def _seeded(*key) -> random.Random:
    return random.Random(hash(key) & (2**63 - 1))  # hash of a tuple of ints: the same in every process


def epoch_order(urls: list[str], seed: int, stream: int, streams: int, epoch: int) -> list[str]:
    """Epoch mode: stream `stream`'s share of the shards, in the order of `epoch`."""
    mine = urls[stream::streams]
    _seeded(seed, stream, epoch).shuffle(mine)
    return mine


def fingerprint(sources: list[Source], resampled: bool) -> str:
    """Saved positions only mean something for the same shards: a run whose data.train changed starts afresh."""
    text = "\n".join(f"{s.weight}:{u}" for s in sources for u in s.urls) + f"\nresampled={resampled}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ShardStream(IterableDataset):
    """Infinite batches for one rank; each DataLoader worker runs one stream (see module docstring)."""

    def __init__(self, sources: list[Source], transform: Callable[[dict], dict], batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, open_shards: int = 4,
                 resampled: bool = True, decode_size: int | None = None, resume: list[dict] | None = None):
        self.sources, self.transform, self.batch_size, self.rank = sources, transform, batch_size, rank
        self.decode_size = decode_size
        self.urls = [u for s in sources for u in s.urls]
        self.seed, self.open_shards, self.resampled = seed, open_shards, resampled
        self.slots = max(1, num_workers)
        self.streams = world_size * self.slots
        total = sum(s.weight for s in sources)
        self._cumulative = [sum(s.weight for s in sources[:i + 1]) / total for i in range(len(sources))]
        # slot i of this rank plays stream resume[i] (the order in which the trainer will consume them)
        self.states = resume or [vars(StreamState(stream=rank * self.slots + i)) for i in range(self.slots)]

    def __iter__(self):
        info = get_worker_info()
        state = StreamState(**self.states[info.id if info else 0])
        rng = _seeded(self.seed, state.salt, state.stream)
        if state.rng is not None:
            rng.setstate(_as_tuple(state.rng))
        reports: list[tuple[str, str]] = []
        shards = [s for s in (self._open(url, p, off, state, reports) for url, p, off in state.open) if s]
        while True:
            faults.inject("loader", state.batches + 1, self.rank)
            samples = []
            # Per-batch seeding of every RNG an augmentation may draw from (torchvision: torch; timm's RandAugment:
            # python's random; others numpy): random augmentations replay exactly after a resume.
            batch_seed = hash((self.seed, state.salt, state.stream, state.batches)) & (2**63 - 1)
            torch.manual_seed(batch_seed)
            random.seed(batch_seed)
            np.random.seed(batch_seed % 2**32)
            while len(samples) < self.batch_size:
                failed = 0
                while len(shards) < self.open_shards and self._more(state, shards):
                    url, perm_seed, offset = state.queue.pop(0) if state.queue else (self._next_url(rng, state),
                                                                                     None, 0)
                    if perm_seed is None:
                        perm_seed = rng.getrandbits(63)
                    shard = self._open(url, perm_seed, offset, state, reports)
                    if shard is not None:
                        shards.append(shard)
                    elif (failed := failed + 1) >= max(64, 4 * len(self.urls)):
                        raise RuntimeError(f"{failed} shards in a row were empty or unreadable, e.g. "
                                           f"{self.urls[0]}: is data.train right?")
                j = rng.randrange(len(shards))
                raw = shards[j].next()
                if shards[j].done():
                    shards.pop(j).close()
                try:
                    samples.append(self.transform(to_sample(raw, self.decode_size)))
                except Exception as e:  # corrupt image, missing field: skip and count
                    state.skipped += 1
                    log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), repr(e)[:200])
            state.batches += 1
            state.rng, state.open = rng.getstate(), [[s.url, s.perm_seed, s.offset] for s in shards]
            batch = default_collate(samples)
            batch[STATE] = dict(vars(state), queue=list(state.queue))  # a snapshot: `state` moves on
            batch[REPORTS], reports = reports, []
            yield batch

    def _more(self, state: StreamState, shards: list) -> bool:
        """May another shard be opened? Epoch mode drains an epoch (and a relayout's queue) before the next."""
        return self.resampled or bool(state.queue) or not shards or state.cursor < len(
            self.urls[state.stream::self.streams])

    def _next_url(self, rng: random.Random, state: StreamState) -> str:
        if not self.resampled:  # this stream's share of the shards, in an order seeded by the epoch
            mine = epoch_order(self.urls, self.seed, state.stream, self.streams, state.epoch)
            if state.cursor == len(mine):
                state.epoch, state.cursor = state.epoch + 1, 0
                mine = epoch_order(self.urls, self.seed, state.stream, self.streams, state.epoch)
            state.cursor += 1
            return mine[state.cursor - 1]
        source = self.sources[bisect.bisect_right(self._cumulative, rng.random())] if len(self.sources) > 1 \
            else self.sources[0]
        return source.urls[rng.randrange(len(source.urls))]

    @staticmethod
    def _open(url: str, perm_seed: int, offset: int, state: StreamState, reports: list):
        shard = open_shard(url, perm_seed, offset)
        if shard.error is not None:
            state.skipped += 1
            readable = f"{len(shard)} samples readable" if hasattr(shard, "__len__") else "read up to the damage"
            reports.append((url, f"shard {url} is damaged ({readable}): {repr(shard.error)[:200]}"))
        if shard.done():
            if shard.error is None:
                reports.append((url, f"skipping empty shard {url}"))
            shard.close()
            return None
        return shard


def _worker_init(parent: int, _: int) -> None:
    """SLURM signals every process of a job step (scancel, `scontrol requeue`, pre-emption, the time limit). The
    trainer turns SIGTERM/USR1/USR2 into "save at the next step boundary", which needs its loader workers alive
    until then; a worker killed by the signal would end the trainer at once (torch raises when a worker dies). Yet
    a worker must never outlive or block its trainer: it dies with it (the kernel's parent-death signal, also when
    the trainer is killed -9), and takes SIGTERM from the trainer itself (torch's shutdown, multiprocessing's exit
    handler, which would otherwise join a worker that ignores it for ever) while ignoring it from anyone else."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):  # no prctl / sigwaitinfo: ignore SIGTERM, as SLURM needs
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the trainer died before prctl
        os._exit(1)
    # Blocked here, SIGTERM stays pending for sigwaitinfo, which says who sent it; threads the worker starts later
    # (queue feeders, intra-op threads) inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def sigterm_from_parent_only():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=sigterm_from_parent_only, name="sigterm-from-trainer", daemon=True).start()


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
        self.fingerprint = fingerprint(srcs, resampled)
        resume = None
        if state and state.get("shards", self.fingerprint) != self.fingerprint:
            log.warning("data.train differs from the checkpoint's: the data streams start afresh")
        elif state:
            if state["num_workers"] != num_workers:
                raise ValueError(f"data.num_workers={num_workers}, but this data position was saved with "
                                 f"{state['num_workers']}: pass it through relayout()")
            resume = state["streams"]
        dataset = ShardStream(srcs, transform, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                              seed=seed, open_shards=open_shards, resampled=resampled, decode_size=decode_size,
                              resume=resume)
        self.num_workers = num_workers
        self._states = list(dataset.states)  # in serving order: [0] is the stream whose batch comes next
        self._reports: dict[str, str] = {}
        # Its own generator: starting the loader draws a seed for the workers, which must not move the trainer's
        # global RNG (restored from the checkpoint on resume, it would then differ from an uninterrupted run's).
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 worker_init_fn=functools.partial(_worker_init, os.getpid()),
                                 generator=torch.Generator().manual_seed(seed * 1_000_003 + rank),
                                 persistent_workers=num_workers > 0, prefetch_factor=PREFETCH if num_workers else None)
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
        self._reports.update(batch.pop(REPORTS))
        # The DataLoader serves its workers round-robin, so the stream after this one serves next.
        assert state["stream"] == self._states[0]["stream"], "DataLoader served its workers out of order"
        self._states = self._states[1:] + [state]
        return batch

    def take_reports(self) -> dict[str, str]:
        """Damaged or empty shards met since the last call, {url: message}; the trainer logs each once per run."""
        reports, self._reports = self._reports, {}
        return reports

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "shards": self.fingerprint, "streams": list(self._states)}

    def close(self) -> None:
        """Stop the loader workers now (also after a failure: a run must end promptly, not at garbage collection)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def relayout(saved: list[dict], spec, *, rank: int, world_size: int, num_workers: int, seed: int = 0,
             resampled: bool = True, salt: int) -> dict:
    """Every old rank's saved data state (`TrainStream.state_dict()`, in rank order) -> this rank's state for a
    layout of `world_size` ranks x `num_workers` workers: what the old streams had left (module docstring) is dealt
    out round-robin over the new streams, which then draw anew, seeded with `salt` (the step of the change)."""
    srcs = sources(spec)
    urls = [u for s in srcs for u in s.urls]
    slots = max(1, num_workers)
    old = sorted((StreamState(**st) for r in saved for st in r["streams"]), key=lambda st: st.stream)
    streams = world_size * slots
    fresh = [vars(StreamState(stream=rank * slots + i, salt=salt)) for i in range(slots)]
    if any(r.get("shards") != fingerprint(srcs, resampled) for r in saved):
        log.warning("data.train differs from the checkpoint's: the data streams start afresh")
        return {"num_workers": num_workers, "shards": fingerprint(srcs, resampled), "streams": fresh}
    left: list[list] = []
    for st in old:
        left += [list(o) for o in st.open] + [list(q) for q in st.queue]
        if not resampled:  # the shards of its share it had not opened yet in this epoch
            mine = epoch_order(urls, seed, st.stream, len(old), st.epoch)
            left += [[u, None, 0] for u in mine[st.cursor:]]
    for state in fresh:
        sid = state["stream"]
        # Epoch mode: this epoch's share was the old streams'; the queue finishes it, then the next epoch begins.
        state.update(queue=left[sid::streams], epoch=max(st.epoch for st in old),
                     cursor=0 if resampled else len(urls[sid::streams]),
                     skipped=sum(st.skipped for st in old) if sid == 0 else 0)
    if rank == 0:
        partly = sum(q[1] is not None for q in left)
        log.info("data position: %d streams re-laid onto %d (%d ranks x %d workers): %d shards carried over "
                 "(%d partly read)", len(old), streams, world_size, slots, len(left), partly)
    return {"num_workers": num_workers, "shards": fingerprint(srcs, resampled), "streams": fresh}
