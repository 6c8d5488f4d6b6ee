"""URL list -> WebDataset shards with img2dataset, then SHARDS/manifest.json.

data_tools/url_list.py reads the list and drops (and counts) the rows no download should be tried for, in bounded
memory, into SHARDS/_input/ (parquet parts, resumable); img2dataset downloads, resizes, shards and resumes: rerun
the same command after an interruption and finished shards are kept. `--slurm CLUSTER` runs the same download as a
SLURM job array (data_tools/download_array.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from data_tools import DataToolsError
from data_tools import url_list as lists
from data_tools.manifest import MANIFEST, write_json, write_manifest

# settings that shape the shards: an incremental rerun must not mix shards made with different ones
SHARD_SETTINGS = ("image_size", "resize_mode", "number_sample_per_shard", "min_image_size", "max_aspect_ratio",
                  "max_image_area")
INPUT = "_input"  # the kept rows as parquet parts, as img2dataset reads them (kept for reruns: same rows, same shards)
RECORD = "download.json"  # in INPUT, written before img2dataset starts: the record a rerun is checked against
PART_ROWS = 1_000_000  # rows per part: what img2dataset holds in memory at once

@dataclass
class Options:
    """How rows become shards (flags of `data_tools download`)."""

    image_size: int = 64
    resize_mode: str = "border"
    samples_per_shard: int = 1000
    processes: int = 2
    threads: int = 16
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    # Decompression bombs: a few-KB PNG can claim 50k x 50k pixels; larger images are refused from their header,
    # before any decoding (data_tools/img2dataset_hooks.py).
    max_image_area: float = 100e6
    honour_robots: bool = True  # skip images served with X-Robots-Tag noai/noimageai/noindex/noimageindex
    progress: bool = True
    distributor: str = "multiprocessing"  # or pyspark: img2dataset's shards as Spark tasks (spark_session)
    spark_master: str | None = None  # pyspark: spark://host:7077, yarn, ...; default local[processes]

    def img2dataset(self, input_format: str = "parquet") -> dict:
        """Exactly what img2dataset.download gets besides url_list and output_folder."""
        return dict(
            image_size=self.image_size, resize_mode=self.resize_mode, number_sample_per_shard=self.samples_per_shard,
            processes_count=self.processes, thread_count=self.threads, timeout=self.timeout, retries=self.retries,
            min_image_size=self.min_image_size, max_aspect_ratio=self.max_aspect_ratio,
            max_image_area=self.max_image_area, url_col="url", caption_col="caption", input_format=input_format,
            output_format="webdataset", encode_format="jpg", incremental_mode="incremental",
            distributor=self.distributor, enable_wandb=False,
            disallowed_header_directives=None if self.honour_robots else [])


def recorded(settings: dict) -> dict:
    """Settings as the manifest keeps them: JSON has no infinity, null means no limit."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in settings.items()}


def check_rerun(previous: dict, settings: dict, rows: int | None, kept: int | None, where: Path) -> None:
    """A previous run in the same place must have had the same list and shard settings (rows and kept: once
    known, after the list is read)."""
    old_settings = previous.get("img2dataset", {}).get("settings", {})
    before = {"rows": previous.get("rows"), "kept": previous.get("kept", kept),
              **{k: old_settings.get(k) for k in SHARD_SETTINGS}}
    now = {"rows": rows, "kept": kept, **{k: recorded(settings)[k] for k in SHARD_SETTINGS}}
    if diff := [f"{k} {before[k]} there, {now[k]} now" for k in now if now[k] is not None and before[k] != now[k]]:
        raise DataToolsError(f"{where} holds shards of another list or settings ({'; '.join(diff)}): "
                             "use a new --out or delete it")


def part_rows(options: Options) -> int:
    """Parts hold whole shards, so that img2dataset's last shard of each part (file) is full but for the list's."""
    return options.samples_per_shard * max(1, PART_ROWS // options.samples_per_shard)


def run_img2dataset(source: Path, out: Path, settings: dict, first_shard: int = 0) -> None:
    """img2dataset.download into out (incremental; data_tools/img2dataset_hooks.py: shard numbers from first_shard,
    images normalised and size-checked before OpenCV), with Ctrl-C surfacing as KeyboardInterrupt."""
    import img2dataset  # slow import (cv2, albumentations, wandb): only once the input is known to be good

    from data_tools import img2dataset_hooks

    previous = signal.getsignal(signal.SIGINT)
    try:
        with img2dataset_hooks.installed(first_shard):
            img2dataset.download(url_list=str(source), output_folder=str(out), **settings)
    except SystemExit:  # img2dataset's SIGINT handler calls sys.exit(0)
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare(spec: lists.ListSpec, out: Path, options: Options) -> tuple[lists.UrlList, dict]:
    """Read the list into out/_input/ and return it with the record every manifest of this download starts from.
    A rerun must match the previous download's record (its manifest's, or, for a download killed before it wrote
    one, the record written here before img2dataset starts); shard settings are checked before the list is read."""
    out.mkdir(parents=True, exist_ok=True)
    settings = options.img2dataset()
    previous = [r for r in (read_record(out / INPUT / RECORD), read_record(out / MANIFEST)) if r]
    for record in previous:
        check_rerun(record, settings, None, None, out)
    # img2dataset's incremental mode takes every *.json in the output folder for a `{shard}_stats.json`
    # (int(name.split("_")[0])) and crashes on any other: refuse before anything starts.
    foreign = sorted(f.name for f in out.glob("*.json") if f.name != MANIFEST and not f.name.split("_")[0].isdigit())
    if foreign:
        raise DataToolsError(f"{out / foreign[0]}: img2dataset reads every *.json in --out as a shard record; "
                             f"move {', '.join(foreign)} out of {out}")
    urls = spec.prepare(out / INPUT, part_rows(options))
    for record in previous:
        check_rerun(record, settings, urls.rows, urls.kept, out)
    info = {"rows": urls.rows, "kept": urls.kept, "captions_truncated": urls.captions_truncated,
            "img2dataset": {"version": version("img2dataset"), "settings": recorded(settings)}}
    write_json(out / INPUT / RECORD, info)
    (out / MANIFEST).unlink(missing_ok=True)  # rewritten when img2dataset ends; img2dataset must not see it
    return urls, info


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def download(spec: lists.ListSpec, out: str | Path, options: Options = Options()) -> dict:
    """Download the kept rows of a URL list into out (webdataset, incremental); write and return the manifest."""
    out = Path(out)
    urls, info = prepare(spec, out, options)
    settings = options.img2dataset()
    done_before = sum(json.loads(f.read_text())["successes"] for f in out.glob("*_stats.json"))
    start = time.perf_counter()
    spark = spark_session(options) if options.distributor == "pyspark" else contextlib.nullcontext()
    with spark, Progress(out, shards=math.ceil(urls.kept / options.samples_per_shard), enabled=options.progress):
        run_img2dataset(urls.folder, out, settings)
    elapsed = time.perf_counter() - start
    manifest = write_manifest(out, info, urls.dropped)
    # not in the manifest file: it describes the shards, this describes one (possibly resumed) run
    manifest["last_run"] = {"elapsed_s": elapsed, "new_samples": manifest["total_samples"] - done_before}
    return manifest


@contextlib.contextmanager
def spark_session(options: Options) -> Iterator[None]:
    """The SparkSession img2dataset's pyspark distributor runs on (it takes the active one): on
    options.spark_master, or local[processes]. Executors unpickle our img2dataset hooks (SafeResizer), so they get
    this project's directory on PYTHONPATH: on a cluster it must be at the same path on every node (a shared
    filesystem, as the output folder must be too)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataToolsError("--distributor pyspark: pyspark is not installed (pip install -r requirements.txt)")
    root = str(Path(__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYSPARK_PYTHON")}
    path = os.pathsep.join(filter(None, [root, saved["PYTHONPATH"]]))
    # local mode: the Python workers Spark starts inherit this environment; on a cluster, executorEnv
    os.environ.update(PYTHONPATH=path, PYSPARK_PYTHON=saved["PYSPARK_PYTHON"] or sys.executable)
    spark = (SparkSession.builder.master(options.spark_master or f"local[{options.processes}]")
             .appName("data_tools download").config("spark.executorEnv.PYTHONPATH", path)
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield
    finally:
        spark.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def missing_rows(manifest: dict) -> int:
    """Input rows neither in a shard nor counted as a failure (shards img2dataset gave up on)."""
    return manifest["rows"] - manifest["total_samples"] - sum(manifest["failures"].values())


class Progress:
    """A progress bar of finished shards and samples on stderr, from the `{shard}_stats.json` files img2dataset
    writes as each shard ends (its own output is a log line per shard)."""

    def __init__(self, *folders: Path, shards: int, enabled: bool = True, interval_s: float = 2.0):
        self.folders, self.shards, self.interval_s = folders, shards, interval_s
        self.enabled = enabled and shards > 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        from tqdm import tqdm

        seen: dict[str, int] = {}  # by name: an array task's shard is counted once, before and after it moves
        with tqdm(total=self.shards, unit="shard", desc="download", dynamic_ncols=True, mininterval=1) as bar:
            while not self._stop.wait(self.interval_s):
                for folder in self.folders:
                    for f in folder.glob("*_stats.json"):
                        if f.name not in seen:
                            with contextlib.suppress(ValueError, OSError, KeyError):
                                seen[f.name] = json.loads(f.read_text())["successes"]
                bar.n = min(len(seen), self.shards)
                bar.set_postfix(samples=sum(seen.values()), refresh=False)
                bar.refresh()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True, name="download-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()


def summary(manifest: dict, out: Path) -> str:
    run = manifest.get("last_run")
    lines = [f"{manifest['total_samples']} samples in {len(manifest['shards'])} shards "
             f"({manifest['total_bytes'] / 1e6:.1f} MB) from {manifest['rows']} rows"]
    if run:
        lines[0] += (f"; this run: {run['new_samples']} new in {run['elapsed_s']:.1f} s "
                     f"({run['new_samples'] / max(run['elapsed_s'], 1e-9):.0f} images/s)")
    if manifest["failures"]:
        lines.append("not downloaded: " + ", ".join(f"{k} {v}" for k, v in manifest["failures"].items()))
    if manifest.get("captions_truncated"):
        lines.append(f"captions cut to --max-caption-chars: {manifest['captions_truncated']}")
    if missing_rows(manifest) or manifest["incomplete_shards"]:
        lines.append(f"incomplete: {missing_rows(manifest)} rows missing, shards {manifest['incomplete_shards']}; "
                     "rerun the same command to resume")
    lines.append(f"manifest: {out / MANIFEST}")
    return "\n".join(lines)


def target_size(target: str) -> tuple[int, str]:
    """--target: the image side and resize mode the model family asks for (a training config, or a model name
    of any family: the task registry knows; data_tools names none)."""
    from pipeline.config import ConfigError
    from pipeline.tasks import input_size

    try:
        return input_size(target)
    except ConfigError as e:
        raise DataToolsError(str(e)) from None


def options_from(args: argparse.Namespace) -> Options:
    size, mode = args.image_size, args.resize_mode
    if args.target:
        target_side, target_mode = target_size(args.target)
        size, mode = size or target_side, mode or target_mode
    return Options(image_size=size or 64, resize_mode=mode or "border", samples_per_shard=args.samples_per_shard,
                   processes=args.processes, threads=args.threads, timeout=args.timeout, retries=args.retries,
                   min_image_size=args.min_image_size, max_aspect_ratio=args.max_aspect_ratio,
                   max_image_area=args.max_image_area, honour_robots=not args.ignore_robots_headers,
                   progress=not args.no_progress, distributor=args.distributor, spark_master=args.spark_master)


def list_spec(args: argparse.Namespace) -> lists.ListSpec:
    columns = lists.PRESETS[args.preset] if args.preset else lists.Columns()
    columns = lists.Columns(url=args.url_col or columns.url,
                            captions=tuple(args.caption_col.split(",")) if args.caption_col else columns.captions,
                            language=args.language_col or columns.language)
    keep = lists.RowFilter(languages=tuple(args.language.split(",")) if args.language else (),
                           dedupe=not args.keep_duplicates, min_caption_chars=args.min_caption_chars,
                           max_caption_chars=args.max_caption_chars)
    return lists.ListSpec(args.urls, args.input_format, columns, keep)


def run(args: argparse.Namespace) -> int:
    options = options_from(args)  # flags first: a bad one is refused before the list is read
    if args.spark_master and options.distributor != "pyspark":
        raise DataToolsError("--spark-master: only with --distributor pyspark")
    if args.slurm and options.distributor != "multiprocessing":
        raise DataToolsError("--slurm and --distributor pyspark: each SLURM array task downloads with its own "
                             "processes")
    spec = list_spec(args)
    spec.check()  # files, formats, columns: before anything is written
    if args.prepare_only:
        urls = spec.prepare(Path(args.out) / INPUT, part_rows(options))
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(urls.dropped.items())) or "none"
        print(f"{urls.rows} rows: {urls.kept} kept in {len(urls.parts())} part(s) under {urls.folder}; "
              f"dropped: {dropped}; captions cut: {urls.captions_truncated}")
        return 0
    if args.slurm:
        from data_tools import download_array
        return download_array.run(args, spec, options)
    manifest = download(spec, args.out, options)
    print(summary(manifest, Path(args.out)), flush=True)
    return 1 if missing_rows(manifest) or manifest["incomplete_shards"] else 0


def add_parser(subparsers) -> None:
    from launch import array

    p = subparsers.add_parser("download", help="download a URL list into WebDataset shards (img2dataset)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", metavar="URLS", nargs="+",
                   help="URL list: files (" + ", ".join(lists.FORMATS) + ") or directories of them, read as one")
    p.add_argument("--out", required=True, metavar="SHARDS", help="output directory (resumed if it exists)")
    g = p.add_argument_group("input")
    g.add_argument("--input-format", default="auto", help="auto: from the file suffix")
    g.add_argument("--preset", choices=sorted(lists.PRESETS), help="column names of a known corpus (wit: Google WIT)")
    g.add_argument("--url-col", help="default: url (or the preset's)")
    g.add_argument("--caption-col", help="column, or columns A,B,C: the first non-empty one (default: caption)")
    g.add_argument("--language", help="keep only these languages, e.g. en or en,de (needs a language column)")
    g.add_argument("--language-col", help="default: the preset's (wit: language)")
    g.add_argument("--keep-duplicates", action="store_true", help="download a URL as often as it is listed")
    g.add_argument("--min-caption-chars", type=int, default=1, help="drop shorter captions (0: keep uncaptioned rows)")
    g.add_argument("--max-caption-chars", type=int, help="cut longer captions")
    g.add_argument("--prepare-only", action="store_true",
                   help="read, filter and deduplicate the list into SHARDS/_input/, print the counts, download nothing")
    g = p.add_argument_group("images and shards")
    g.add_argument("--target", metavar="CONFIG_OR_MODEL",
                   help="image size and resize mode of this training config (a YAML file) or model name, as its "
                        "model family asks (pipeline.tasks.input_size)")
    g.add_argument("--image-size", type=int, help="default: the target's, else 64")
    g.add_argument("--resize-mode", choices=("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"),
                   help="default: the target's, else border")
    g.add_argument("--min-image-size", type=int, default=0, help="drop images whose shorter side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, default=math.inf, help="drop images longer than this x wider")
    g.add_argument("--max-image-area", type=float, default=Options.max_image_area,
                   help="drop images of more pixels, undecoded (decompression bombs)")
    g.add_argument("--samples-per-shard", type=int, default=1000)
    g = p.add_argument_group("fetching")
    g.add_argument("--processes", type=int, default=2, help="per machine (per array task with --slurm)")
    g.add_argument("--threads", type=int, default=16, help="download threads per process")
    g.add_argument("--timeout", type=int, default=10, help="seconds per connection / read")
    g.add_argument("--retries", type=int, default=0, help="extra attempts per failed URL")
    g.add_argument("--ignore-robots-headers", action="store_true",
                   help="download images whose X-Robots-Tag says noai/noimageai/noindex/noimageindex (default: skip)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--distributor", choices=("multiprocessing", "pyspark"), default="multiprocessing",
                   help="pyspark: img2dataset's shards as tasks of a Spark session (--spark-master)")
    g.add_argument("--spark-master", metavar="URL",
                   help="spark://host:7077, yarn, ... (default: local[--processes])")
    g = array.add_arguments(p, "one array task per slice of the list")
    g.add_argument("--tasks", type=int, default=16, help="array tasks (each gets whole shards)")
    p.set_defaults(func=run)
