"""URL lists in: the rows img2dataset should fetch, and a count of every row dropped before it, by reason.

Formats: csv, tsv (.gz), parquet, jsonl (.gz), json; one file, several, or directories of them (Google WIT comes as
10 .tsv.gz files), read as one list; column names configurable. Every input row ends in exactly one place: kept
(handed to img2dataset, which then counts its own successes and failures) or dropped here as
  malformed_row                                  a csv/tsv line with the wrong number of fields
  empty_url / unsupported_scheme / invalid_url   img2dataset's urllib would read file:// from the local disk and
                                                 call ftp:// a connection error
  bad_encoding                                   url or caption not valid UTF-8
  missing_caption / caption_too_short            no caption in any of the caption columns, or fewer characters
                                                 than --min-caption-chars
  language                                       not one of --language (WIT's `language` column)
  duplicate_url                                  the URL already came earlier in the list (first one kept)
Captions longer than --max-caption-chars are cut there (counted in `captions_truncated`, the rows are kept).
The kept rows keep their input order; keys number them, so dropping rows renumbers keys (each sample's .json keeps
its url).

Lists of 10^9 rows: `prepare` never holds the list, only a batch of rows, and writes the kept rows into a folder of
parquet parts (img2dataset reads a folder one file at a time). The exact deduplication takes two passes:
  1. every row that could be kept is hashed by URL (xxh3, 128 bits) into one of 256 bucket files on disk, with
     its row number; each bucket, 1/256 of the list, is then sorted alone to find every URL's first row, and the
     later rows are marked in a bitmap of one bit per row (125 MB for 10^9 rows);
  2. the list is read again, rows filtered, duplicates dropped by the bitmap, the rest written as parts of
     `part_rows` rows (a multiple of the samples per shard: only the list's last shard is partial).
A killed run resumes: pass 1 after its last finished input file (the bucket files are cut back to that point),
pass 2 after its last finished part (each records where in the input it ends and the counts so far). Memory:
a batch of rows, one bucket, the bitmap. A plain .json array (not jsonl) is read whole: use jsonl for big lists.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import xxhash

from data_tools import DataToolsError

BATCH_ROWS = 1 << 18  # rows filtered at a time
# Arrow's streaming csv/json readers read some 32 blocks ahead of the consumer: small blocks bound that
# (16 MB blocks held 540 MB of a 700 MB list), and are gathered into BATCH_ROWS batches to be filtered.
READ_BLOCK = 1 << 20
BUCKETS = 256
_HASH = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<u8")])  # one spilled row: URL hash and row number
LIST = "list.json"  # in the parts folder: what was read how, and the result once finished


FORMATS = {  # file suffix -> img2dataset input_format
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv.gz", ".tsv": "tsv", ".tsv.gz": "tsv.gz",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".json": "json", ".json.gz": "json.gz",
}


@dataclass
class Columns:
    """Which input columns mean what; presets name a known corpus's columns."""

    url: str = "url"
    captions: tuple[str, ...] = ("caption",)  # the first non-empty one is the caption
    language: Optional[str] = None  # needed by `languages`


PRESETS = {
    # Google's WIT (Wikipedia-based Image Text), its *.tsv.gz files: the reference description is the best caption
    # when present, then the attribution and the alt text (WIT paper, section 3).
    "wit": Columns(url="image_url", language="language", captions=(
        "caption_reference_description", "caption_attribution_description", "caption_alt_text_description")),
}


@dataclass
class RowFilter:
    languages: tuple[str, ...] = ()  # empty: every language
    dedupe: bool = True
    min_caption_chars: int = 1  # 0: rows without a caption are kept (caption "")
    max_caption_chars: Optional[int] = None


def detect_format(path: Path, given: str = "auto") -> str:
    if given != "auto":
        if given not in FORMATS.values():
            raise DataToolsError(f"unsupported --input-format {given!r} (one of {', '.join(FORMATS.values())})")
        return given
    fmt = next((f for suffix, f in FORMATS.items() if path.name.lower().endswith(suffix)), None)
    if fmt is None:
        raise DataToolsError(f"{path}: unsupported format (suffixes: {', '.join(FORMATS)}); see --input-format")
    return fmt


def input_files(paths) -> list[Path]:
    """The list's files: those given, and the files with a known suffix in the directories given (sorted)."""
    files = []
    for path in map(Path, paths if isinstance(paths, (list, tuple)) else [paths]):
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(tuple(FORMATS)))
            if not found:
                raise DataToolsError(f"{path}: no URL list files in it ({', '.join(FORMATS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataToolsError(f"{path}: no such file")
    return files


def _as_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.Array]:
    """A column as strings, and per row whether its bytes were valid UTF-8 (invalid rows become null)."""
    if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
        column = column.cast(pa.string()) if not pa.types.is_string(column.type) else column
        return column, pa.array([True] * len(column), pa.bool_())
    chunks, valid = [], []
    for chunk in column.chunks:
        try:
            chunks.append(chunk.cast(pa.string()))
            valid.append(pa.array([True] * len(chunk), pa.bool_()))
        except pa.ArrowInvalid:  # rare: decode this chunk row by row
            texts = []
            for b in chunk.to_pylist():
                try:
                    texts.append(None if b is None else b.decode("utf-8"))
                except UnicodeDecodeError:
                    texts.append(False)
            valid.append(pa.array([t is not False for t in texts], pa.bool_()))
            chunks.append(pa.array([None if t is False else t for t in texts], pa.string()))
    return pa.chunked_array(chunks, pa.string()), pa.concat_arrays(valid) if valid else pa.array([], pa.bool_())


def url_problems(urls: pa.ChunkedArray) -> pa.Array:
    """Per row: null for a usable http(s) URL (surrounding blanks ignored), else empty_url / unsupported_scheme /
    invalid_url."""
    urls = pc.utf8_trim_whitespace(urls.cast(pa.string()))
    empty = pc.fill_null(pc.equal(pc.utf8_length(urls), 0), True)
    http = pc.fill_null(pc.match_substring_regex(urls, r"^https?://", ignore_case=True), False)
    ok = pc.fill_null(pc.match_substring_regex(urls, r"^https?://[^/?#\s]", ignore_case=True), False)
    return pc.if_else(ok, pa.scalar(None, pa.string()), pc.if_else(
        empty, "empty_url", pc.if_else(http, "invalid_url", "unsupported_scheme")))


@dataclass
class UrlList:
    """A prepared list: the kept rows as parquet parts (columns url, caption, in input order) in `folder`."""

    folder: Path
    rows: int  # rows in the input
    kept: int
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    captions_truncated: int = 0

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def read(self) -> pa.Table:
        """All kept rows at once: for small lists (tests, inspection)."""
        parts = self.parts()
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table(
            {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})


def _open_source(path: Path, fmt: str, columns: list[str], batch_rows: int) -> tuple[Iterator[pa.Table], list]:
    """The given columns of a file, a batch at a time, as they are in the file (csv/tsv as binary: their encoding
    is checked later), and a list that counts csv/tsv lines with the wrong number of fields (skipped) as the batches
    are read. Unknown columns or an unreadable file -> DataToolsError."""
    malformed: list = []
    try:
        if fmt == "parquet":
            source = pq.ParquetFile(path)
            _check_columns(path, source.schema_arrow.names, columns)
            batches = (pa.Table.from_batches([b]) for b in source.iter_batches(batch_rows, columns=columns))
        elif fmt.startswith(("csv", "tsv")):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",", newlines_in_values=True,
                                        invalid_row_handler=lambda _: malformed.append(1) or "skip")
            _check_columns(path, pa_csv.open_csv(path, parse_options=parse).schema.names, columns)
            malformed.clear()  # the peek above parsed the first block
            convert = pa_csv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns},
                                            strings_can_be_null=True, quoted_strings_can_be_null=False)
            reader = pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=READ_BLOCK), parse_options=parse,
                                     convert_options=convert)
            batches = (pa.Table.from_batches([b]) for b in reader)
        elif fmt.startswith("jsonl"):
            reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=READ_BLOCK))
            _check_columns(path, reader.schema.names, columns)
            batches = (pa.Table.from_batches([b]).select(columns) for b in reader)
        else:  # a JSON array: no streaming reader exists
            table = pa.Table.from_pandas(pd.read_json(path), preserve_index=False)
            _check_columns(path, table.column_names, columns)
            batches = (pa.Table.from_batches([b]) for b in table.select(columns).to_batches(batch_rows))
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        if isinstance(e, DataToolsError):
            raise
        raise DataToolsError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    return _rebatched(batches, path, fmt, batch_rows), malformed


def _rebatched(batches: Iterator[pa.Table], path: Path, fmt: str, batch_rows: int) -> Iterator[pa.Table]:
    """Batches of batch_rows rows (the last one shorter) from the readers' blocks; read errors as DataToolsError."""
    pending: list[pa.Table] = []
    rows = 0
    try:
        for table in batches:
            pending.append(table)
            rows += table.num_rows
            while rows >= batch_rows:
                whole = pa.concat_tables(pending)
                yield whole.slice(0, batch_rows)
                pending, rows = [whole.slice(batch_rows)], rows - batch_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise DataToolsError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    if rows:
        yield pa.concat_tables(pending)


def _check_columns(path: Path, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataToolsError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")


def _filter(batch: pa.Table, columns: Columns, keep: RowFilter) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """One batch -> (url, caption, reason to drop or null, caption longer than --max-caption-chars), before
    deduplication. url and caption are trimmed, the caption is the first non-empty caption column, not cut yet."""
    text, valid = {}, pa.array(np.ones(batch.num_rows, bool))
    for name in dict.fromkeys([columns.url, *columns.captions] + ([columns.language] if keep.languages else [])):
        column, ok = _as_text(batch.column(name))
        text[name], valid = column, pc.and_(valid, ok)
    caption = pa.nulls(batch.num_rows, pa.string())
    for name in reversed(columns.captions):  # the first non-empty column wins
        value = pc.utf8_trim_whitespace(text[name])
        caption = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(value), 0), False), value, caption)
    caption = pc.fill_null(caption, "")
    reason = pc.if_else(valid, url_problems(pc.fill_null(text[columns.url], "")), "bad_encoding")
    n_chars = pc.utf8_length(caption)
    if keep.min_caption_chars > 0:
        short = pc.less(n_chars, keep.min_caption_chars)
        reason = pc.if_else(pc.and_(pc.is_null(reason), short),
                            pc.if_else(pc.equal(n_chars, 0), "missing_caption", "caption_too_short"), reason)
    if keep.languages:
        lang = pc.is_in(pc.fill_null(text[columns.language], ""), value_set=pa.array(keep.languages, pa.string()))
        reason = pc.if_else(pc.and_(pc.is_null(reason), pc.invert(lang)), "language", reason)
    url = pc.utf8_trim_whitespace(pc.fill_null(text[columns.url], ""))
    long = pc.greater(n_chars, keep.max_caption_chars) if keep.max_caption_chars else pa.array(
        np.zeros(batch.num_rows, bool))
    return _flat(url), _flat(caption), _flat(reason), _flat(long)


def _flat(x) -> pa.Array:
    return x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x


def _url_hashes(urls: pa.Array) -> np.ndarray:
    """xxh3-128 of each URL, as (hi, lo) uint64 pairs."""
    digests = b"".join(map(xxhash.xxh3_128_digest, urls.cast(pa.binary()).to_pylist()))
    pairs = np.frombuffer(digests, dtype=">u8").reshape(-1, 2)  # xxhash's canonical digest is big-endian
    return pairs


class _Input:
    """The list's files read in order, a batch at a time, with the row number of each batch's first row."""

    def __init__(self, files: list[Path], formats: list[str], wanted: list[str], batch_rows: int):
        self.files, self.formats, self.wanted, self.batch_rows = files, formats, wanted, batch_rows

    def batches(self, start_file: int = 0, start_row: int = 0, skip: int = 0):
        """(file index, number of the file's first row, number of the batch's first row, batch, the file's
        malformed-line counter), from file `start_file`, whose first row is number `start_row`, skipping its first
        `skip` rows; after each file's last batch, its end: batch None, the counter final, the next row's number."""
        row = start_row
        for i in range(start_file, len(self.files)):
            source, malformed = _open_source(self.files[i], self.formats[i], self.wanted, self.batch_rows)
            file_start = row
            for batch in source:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    row += batch.num_rows
                    continue
                if skip:
                    batch, row, skip = batch.slice(skip), row + skip, 0
                yield i, file_start, row, batch, malformed
                row += batch.num_rows
            yield i, file_start, row, None, malformed


@dataclass
class ListSpec:
    """A URL list to read: files or directories of them (one list, in order), their format, which columns mean
    what and which rows to keep."""

    paths: object  # a path or a list of paths
    fmt: str = "auto"
    columns: Columns = field(default_factory=Columns)
    keep: RowFilter = field(default_factory=RowFilter)

    def sources(self) -> tuple[list[Path], list[str], list[str]]:
        """(files, their formats, the columns to read); every file checked before any is read."""
        files = input_files(self.paths)
        formats = [detect_format(f, self.fmt) for f in files]
        if self.keep.languages and not self.columns.language:
            raise DataToolsError("--language needs --language-col (the column holding each row's language)")
        c = self.columns
        wanted = list(dict.fromkeys([c.url, *c.captions] + ([c.language] if self.keep.languages else [])))
        return files, formats, wanted

    def check(self) -> None:
        """Refuse a missing file, an unknown format or column now, before anything is written or submitted."""
        files, formats, wanted = self.sources()
        for f, f_fmt in zip(files, formats):
            _open_source(f, f_fmt, wanted, 1)

    def prepare(self, folder: str | Path, part_rows: int = 1_000_000, batch_rows: int = BATCH_ROWS) -> UrlList:
        """Drop the rows no download should be tried for, counting each under one reason, and write the rest into
        `folder` as part-NNNNN.parquet of `part_rows` rows. Resumes a killed run on the same list and settings; a
        finished one is returned as it is; another list or other settings start afresh."""
        files, formats, wanted = self.sources()
        folder = Path(folder)
        job = json.loads(json.dumps({
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "formats": formats, "columns": asdict(self.columns), "keep": asdict(self.keep), "part_rows": part_rows}))
        record = _read_json(folder / LIST)
        if record and record.get("job") == job:
            if "result" in record:
                return _result(folder, record["result"])
        else:
            shutil.rmtree(folder, ignore_errors=True)
        work = folder / ".work"
        work.mkdir(parents=True, exist_ok=True)
        _write_json(folder / LIST, {"job": job})
        source = _Input(files, formats, wanted, batch_rows)
        scan = _scan(source, self.columns, self.keep, work) if self.keep.dedupe else None
        result = _write_parts(source, self.columns, self.keep, folder, work, part_rows, scan)
        _write_json(folder / LIST, {"job": job, "result": result})
        shutil.rmtree(work, ignore_errors=True)
        return _result(folder, result)


def _result(folder: Path, result: dict) -> UrlList:
    return UrlList(folder, rows=result["rows"], kept=result["kept"], dropped=Counter(result["dropped"]),
                   captions_truncated=result["captions_truncated"])


def _scan(source: _Input, columns: Columns, keep: RowFilter, work: Path) -> dict:
    """Pass 1: every row that could be kept, hashed by URL into the bucket files; then the duplicates' bitmap.
    Returns {"rows": rows read, "malformed": per file}; resumes after the last finished file."""
    progress = _read_json(work / "scan.json") or {"files": 0, "rows": 0, "malformed": [], "sizes": [0] * BUCKETS}
    if progress.get("done"):
        return progress
    buckets = [open(work / f"bucket-{b:03d}.bin", "ab") for b in range(BUCKETS)]
    try:
        for f, size in zip(buckets, progress["sizes"]):
            f.truncate(size)  # back to the last finished file: a killed run's half-file is dropped
            f.seek(size)
        for i, _, row, batch, malformed in source.batches(progress["files"], progress["rows"]):
            if batch is None:
                for f in buckets:
                    f.flush()
                    os.fsync(f.fileno())
                progress.update(files=i + 1, rows=row, malformed=progress["malformed"] + [len(malformed)],
                                sizes=[f.tell() for f in buckets])
                _write_json(work / "scan.json", progress)
                continue
            url, _, reason, _ = _filter(batch, columns, keep)
            candidates = pc.is_null(reason)
            rows = np.flatnonzero(candidates.to_numpy(zero_copy_only=False)).astype(np.uint64) + np.uint64(row)
            if not len(rows):
                continue
            hashes = _url_hashes(url.filter(candidates))
            records = np.empty(len(rows), _HASH)
            records["hi"], records["lo"], records["row"] = hashes[:, 0], hashes[:, 1], rows
            which = (records["hi"] >> np.uint64(56)).astype(np.int64)  # the hash's top byte picks the bucket
            order = np.argsort(which, kind="stable")
            for b, chunk in zip(*_groups(which[order], records[order])):
                buckets[b].write(chunk.tobytes())
    finally:
        for f in buckets:
            f.close()
    duplicates = np.zeros(math.ceil(progress["rows"] / 8) or 1, np.uint8)
    for b in range(BUCKETS):
        records = np.fromfile(work / f"bucket-{b:03d}.bin", _HASH)
        if len(records) < 2:
            continue
        records = records[np.lexsort((records["row"], records["lo"], records["hi"]))]
        later = (records["hi"][1:] == records["hi"][:-1]) & (records["lo"][1:] == records["lo"][:-1])
        rows = records["row"][1:][later]  # sorted by row within a URL: all but its first row
        np.bitwise_or.at(duplicates, (rows >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (rows & np.uint64(7)).astype(np.uint8)))
    np.save(work / "duplicates.npy", duplicates)
    progress["done"] = True
    _write_json(work / "scan.json", progress)
    return progress


def _groups(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Sorted keys -> (distinct keys, the runs of values that share each)."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts].tolist(), np.split(values, starts[1:])


def _write_parts(source: _Input, columns: Columns, keep: RowFilter, folder: Path, work: Path, part_rows: int,
                 scan: dict | None) -> dict:
    """Pass 2: filter again, drop the duplicates, write the kept rows as parts. Resumes after the last finished part:
    its .work/part-NNNNN.json says where in the input it ends and what had been counted up to there."""
    duplicates = np.load(work / "duplicates.npy") if scan else None
    finished = sorted(work.glob("part-*.json"))
    state = _read_json(finished[-1]) if finished else {
        "file": 0, "file_start": 0, "skip": 0, "parts": 0, "kept": 0, "dropped": {}, "captions_truncated": 0,
        "malformed": []}
    for stale in folder.glob("part-*.parquet*"):  # a part without its .json was cut short by a kill
        if int(stale.name[5:10]) >= state["parts"]:
            stale.unlink()
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    out = _Parts(folder, work, schema, part_rows, state)
    rows = state["file_start"] + state["skip"]
    for i, file_start, row, batch, bad in source.batches(state["file"], state["file_start"], state["skip"]):
        if batch is None:
            out.malformed.append(len(bad))
            rows = row
            continue
        url, caption, reason, long = _filter(batch, columns, keep)
        if duplicates is not None:
            numbers = np.arange(row, row + batch.num_rows, dtype=np.int64)
            dup = ((duplicates[numbers >> 3] >> (numbers & 7).astype(np.uint8)) & 1).astype(bool)
            reason = pc.if_else(pc.and_(pc.is_null(reason), pa.array(dup)), "duplicate_url", reason)
        if keep.max_caption_chars:
            caption = pc.if_else(long, pc.utf8_slice_codeunits(caption, 0, keep.max_caption_chars), caption)
        kept = pc.is_null(reason)
        cumulative = np.cumsum(kept.to_numpy(zero_copy_only=False))
        start = 0
        while start < batch.num_rows:  # in segments that end where a part fills, so that counts resume exactly
            before = int(cumulative[start - 1]) if start else 0
            fills = int(np.searchsorted(cumulative, before + out.room(), side="left"))
            end = min(batch.num_rows, fills + 1)
            segment = slice(start, end)
            out.count(reason[segment], pc.and_(long[segment], kept[segment]))
            out.write(pa.table({"url": url[segment], "caption": caption[segment]}, schema=schema).filter(kept[segment]))
            if out.full():
                out.close(file=i, file_start=file_start, skip=row - file_start + end)
            start = end
        rows = row + batch.num_rows
    out.close(file=len(source.files), file_start=rows, skip=0, last=True)
    malformed = sum(out.malformed)
    dropped = Counter(out.dropped)
    if malformed:
        dropped["malformed_row"] = malformed
    return {"rows": rows + malformed, "kept": out.kept, "dropped": dict(dropped),
            "captions_truncated": out.truncated, "parts": out.part}


class _Parts:
    """Pass 2's output: parquet parts of `part_rows` rows, each closed atomically with the counts at its end."""

    def __init__(self, folder: Path, work: Path, schema: pa.Schema, part_rows: int, state: dict):
        self.folder, self.work, self.schema, self.part_rows = folder, work, schema, part_rows
        self.part, self.kept, self.truncated = state["parts"], state["kept"], state["captions_truncated"]
        self.dropped, self.malformed = Counter(state["dropped"]), list(state["malformed"])
        self.writer, self.rows = None, 0

    def room(self) -> int:
        return self.part_rows - self.rows

    def full(self) -> bool:
        return self.rows == self.part_rows

    def count(self, reason: pa.Array, truncated: pa.Array) -> None:
        self.dropped.update({k["values"]: k["counts"] for k in pc.value_counts(reason.drop_null()).to_pylist()})
        self.truncated += pc.sum(truncated).as_py() or 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self._path(".tmp"), self.schema)
            self.writer.write_table(table)
            self.rows += table.num_rows
            self.kept += table.num_rows

    def close(self, file: int, file_start: int, skip: int, last: bool = False) -> None:
        if self.writer is None and not (last and self.part == 0):
            return  # nothing written since the last part (an empty list still gets one, empty part)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._path(".tmp"), self.schema)
        self.writer.close()
        os.replace(self._path(".tmp"), self._path())
        self.part += 1
        _write_json(self.work / f"part-{self.part - 1:05d}.json", {
            "file": file, "file_start": file_start, "skip": skip, "parts": self.part, "kept": self.kept,
            "dropped": dict(self.dropped), "captions_truncated": self.truncated, "malformed": self.malformed})
        self.writer, self.rows = None, 0

    def _path(self, suffix: str = "") -> Path:
        return self.folder / f"part-{self.part:05d}.parquet{suffix}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    """Atomically (write, fsync, rename): a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
