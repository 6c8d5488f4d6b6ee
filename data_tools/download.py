"""URL list -> WebDataset shards with img2dataset, then SHARDS/manifest.json.

img2dataset does the downloading, resizing, sharding and incremental resume (rerun the same command after an
interruption: finished shards are kept). Rows without an http(s) URL are dropped beforehand and counted under
empty_url / unsupported_scheme / invalid_url: img2dataset's urllib would read file:// URLs from the local disk
and report ftp:// ones as connection errors. Dropping them renumbers the keys (keys number the rows handed to
img2dataset); each sample's .json keeps its url.
"""
from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_tools import DataToolsError
from data_tools.manifest import MANIFEST, write_manifest

FORMATS = {  # file suffix -> img2dataset input_format
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv.gz", ".tsv": "tsv", ".tsv.gz": "tsv.gz",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".json": "json", ".json.gz": "json.gz",
}
# settings that shape the shards: an incremental rerun must not mix shards made with different ones
SHARD_SETTINGS = ("image_size", "resize_mode", "number_sample_per_shard", "url_col", "caption_col")


def detect_format(path: Path, given: str = "auto") -> str:
    if given != "auto":
        if given not in FORMATS.values():
            raise DataToolsError(f"unsupported --input-format {given!r} (one of {', '.join(FORMATS.values())})")
        return given
    fmt = next((f for suffix, f in FORMATS.items() if path.name.lower().endswith(suffix)), None)
    if fmt is None:
        raise DataToolsError(f"{path}: unsupported format (suffixes: {', '.join(FORMATS)}); see --input-format")
    return fmt


def read_columns(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    """The given columns, parsed as img2dataset's reader parses the file; unknown columns -> DataToolsError."""
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
        elif fmt.startswith(("csv", "tsv")):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",")
            names = pa_csv.open_csv(path, parse_options=parse).schema.names  # reads the first block only
        elif fmt.startswith("jsonl"):
            table = pa_json.read_json(path)
            names = table.column_names
        else:
            table = pa.Table.from_pandas(pd.read_json(path), preserve_index=False)
            names = table.column_names
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise DataToolsError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataToolsError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    if fmt == "parquet":
        return pq.read_table(path, columns=columns)
    if fmt.startswith(("csv", "tsv")):
        convert = pa_csv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
        return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    return table.select(columns)


def url_problems(urls: pa.ChunkedArray) -> pa.Array:
    """Per row: null for a usable http(s) URL, else empty_url / unsupported_scheme / invalid_url."""
    urls = urls.cast(pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(urls)), 0), True)
    http = pc.fill_null(pc.match_substring_regex(urls, r"^https?://", ignore_case=True), False)
    ok = pc.fill_null(pc.match_substring_regex(urls, r"^https?://[^/?#\s]", ignore_case=True), False)
    return pc.if_else(ok, pa.scalar(None, pa.string()), pc.if_else(
        empty, "empty_url", pc.if_else(http, "invalid_url", "unsupported_scheme")))


def _check_rerun(out: Path, settings: dict, rows: int) -> None:
    """A previous manifest must describe the same list and shard settings; then it is moved out of the way."""
    path = out / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    old_settings = old.get("img2dataset", {}).get("settings", {})
    before = {"rows": old.get("rows"), **{k: old_settings.get(k) for k in SHARD_SETTINGS}}
    now = {"rows": rows, **{k: settings[k] for k in SHARD_SETTINGS}}
    if diff := [f"{k} {before[k]} there, {now[k]} now" for k in now if before[k] != now[k]]:
        raise DataToolsError(f"{out} holds shards of another list or settings ({'; '.join(diff)}): "
                             "use a new --out or delete it")
    # img2dataset takes every *.json in the output folder for a `{shard}_stats.json` and crashes on ours
    path.unlink()


def download(url_list: str | Path, out: str | Path, *, image_size: int = 64, resize_mode: str = "border",
             samples_per_shard: int = 1000, processes: int = 2, threads: int = 16, timeout: int = 10,
             retries: int = 0, url_col: str = "url", caption_col: str = "caption",
             input_format: str = "auto") -> dict:
    """Run img2dataset on url_list into out (webdataset, incremental); write and return the manifest."""
    url_list, out = Path(url_list), Path(out)
    if not url_list.is_file():
        raise DataToolsError(f"{url_list}: no such file")
    fmt = detect_format(url_list, input_format)
    table = read_columns(url_list, fmt, list(dict.fromkeys([url_col, caption_col])))
    problems = url_problems(table.column(url_col))
    skipped = {k["values"]: k["counts"] for k in pc.value_counts(problems.drop_null()).to_pylist()}
    settings = dict(  # exactly what img2dataset gets
        image_size=image_size, resize_mode=resize_mode, number_sample_per_shard=samples_per_shard,
        processes_count=processes, thread_count=threads, timeout=timeout, retries=retries, url_col=url_col,
        caption_col=caption_col, input_format="parquet" if skipped else fmt, output_format="webdataset",
        encode_format="jpg", incremental_mode="incremental", distributor="multiprocessing", enable_wandb=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    _check_rerun(out, settings, table.num_rows)

    import img2dataset  # slow import (cv2, albumentations, wandb): only once the input is known to be good

    done_before = sum(json.loads(f.read_text())["successes"] for f in out.glob("*_stats.json"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out, prefix="_input") as tmp:
        source = url_list
        if skipped:
            source = Path(tmp) / "urls.parquet"
            pq.write_table(table.filter(pc.is_null(problems)), source)
        previous = signal.getsignal(signal.SIGINT)
        try:
            img2dataset.download(url_list=str(source), output_folder=str(out), **settings)
        except SystemExit:  # img2dataset's SIGINT handler calls sys.exit(0)
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGINT, previous)
    elapsed = time.perf_counter() - start
    manifest = write_manifest(out, {
        "rows": table.num_rows,  # from the input itself: rows of shards img2dataset gave up on count as missing
        "url_list": str(url_list),
        "img2dataset": {"version": version("img2dataset"), "settings": settings},
    }, skipped)
    # not in the manifest file: it describes the shards, this describes one (possibly resumed) run
    manifest["last_run"] = {"elapsed_s": elapsed, "new_samples": manifest["total_samples"] - done_before}
    return manifest


def missing_rows(manifest: dict) -> int:
    """Input rows neither in a shard nor counted as a failure (shards img2dataset gave up on)."""
    return manifest["rows"] - manifest["total_samples"] - sum(manifest["failures"].values())


def summary(manifest: dict, out: Path) -> str:
    run = manifest["last_run"]
    lines = [f"{manifest['total_samples']} samples in {len(manifest['shards'])} shards "
             f"({manifest['total_bytes'] / 1e6:.1f} MB) from {manifest['rows']} rows; this run: "
             f"{run['new_samples']} new in {run['elapsed_s']:.1f} s "
             f"({run['new_samples'] / max(run['elapsed_s'], 1e-9):.0f} images/s)"]
    if manifest["failures"]:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in manifest["failures"].items()))
    if missing_rows(manifest) or manifest["incomplete_shards"]:
        lines.append(f"incomplete: {missing_rows(manifest)} rows missing, shards {manifest['incomplete_shards']}; "
                     "rerun the same command to resume")
    lines.append(f"manifest: {out / MANIFEST}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    manifest = download(args.urls, args.out, image_size=args.image_size, resize_mode=args.resize_mode,
                        samples_per_shard=args.samples_per_shard, processes=args.processes, threads=args.threads,
                        timeout=args.timeout, retries=args.retries, url_col=args.url_col,
                        caption_col=args.caption_col, input_format=args.input_format)
    print(summary(manifest, Path(args.out)), flush=True)
    return 1 if missing_rows(manifest) or manifest["incomplete_shards"] else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("download", help="download a URL list into WebDataset shards (img2dataset)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", metavar="URLS", help="URL list: " + ", ".join(FORMATS))
    p.add_argument("--out", required=True, metavar="SHARDS", help="output directory (resumed if it exists)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize-mode", default="border",
                   choices=("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"))
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16, help="download threads per process")
    p.add_argument("--timeout", type=int, default=10, help="seconds per connection / read")
    p.add_argument("--retries", type=int, default=0, help="extra attempts per failed URL")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--input-format", default="auto", help="auto: from the file suffix")
    p.set_defaults(func=run)
