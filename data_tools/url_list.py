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
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_tools import DataToolsError

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


@dataclass
class UrlList:
    table: pa.Table  # columns url, caption
    rows: int  # rows in the input
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    captions_truncated: int = 0


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


def read_columns(path: Path, fmt: str, columns: list[str]) -> tuple[pa.Table, int]:
    """The given columns as they are in the file (csv/tsv as binary: their encoding is checked later), and how many
    csv/tsv lines had the wrong number of fields (skipped); unknown columns or an unreadable file ->
    DataToolsError."""
    malformed = []
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
        elif fmt.startswith(("csv", "tsv")):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",", newlines_in_values=True,
                                        invalid_row_handler=lambda _: malformed.append(1) or "skip")
            names = pa_csv.open_csv(path, parse_options=parse).schema.names  # reads the first block only
        elif fmt.startswith("jsonl"):
            table = pa_json.read_json(path)
            names = table.column_names
        else:
            table = pa.Table.from_pandas(pd.read_json(path), preserve_index=False)
            names = table.column_names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataToolsError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        if fmt == "parquet":
            return pq.read_table(path, columns=columns), 0
        if fmt.startswith(("csv", "tsv")):
            convert = pa_csv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns},
                                            strings_can_be_null=True, quoted_strings_can_be_null=False)
            malformed.clear()  # open_csv above has parsed the first block already
            return pa_csv.read_csv(path, parse_options=parse, convert_options=convert), len(malformed)
        return table.select(columns), 0
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        if isinstance(e, DataToolsError):
            raise
        raise DataToolsError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None


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


def _first_occurrence(urls: pa.ChunkedArray) -> pa.Array:
    """Per row: whether no earlier row has the same URL."""
    index = pa.table({"url": urls, "i": pa.array(range(len(urls)), pa.int64())})
    first = index.group_by("url", use_threads=False).aggregate([("i", "min")]).column("i_min")
    return pc.is_in(index.column("i"), value_set=first)


def load(paths, fmt: str = "auto", columns: Columns = Columns(), keep: RowFilter = RowFilter()) -> UrlList:
    """Read a URL list (a file, several, or directories of them: one list, deduplicated across files, in order)
    and drop the rows no download should be tried for, counting each under one reason."""
    files = input_files(paths)
    formats = [detect_format(f, fmt) for f in files]  # every file checked before any is read
    if keep.languages and not columns.language:
        raise DataToolsError("--language needs --language-col (the column holding each row's language)")
    wanted = list(dict.fromkeys([columns.url, *columns.captions] + ([columns.language] if keep.languages else [])))
    parts = [read_columns(f, f_fmt, wanted) for f, f_fmt in zip(files, formats)]
    n = sum(table.num_rows for table, _ in parts)
    text, valid = {}, pa.array([True] * n, pa.bool_())
    for name in wanted:  # per file (csv columns come as bytes, parquet ones as strings), then as one column
        pieces = [_as_text(table.column(name)) for table, _ in parts]
        text[name] = pa.chunked_array([c for column, _ in pieces for c in column.chunks], pa.string())
        valid = pc.and_(valid, pa.concat_arrays([ok for _, ok in pieces]))

    caption = pa.nulls(n, pa.string())
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
    if keep.dedupe:
        candidates = pc.is_null(reason)
        first = _first_occurrence(pc.if_else(candidates, url, pa.scalar(None, pa.string())))
        reason = pc.if_else(pc.and_(candidates, pc.invert(first)), "duplicate_url", reason)

    truncated = 0
    if keep.max_caption_chars:
        long = pc.greater(n_chars, keep.max_caption_chars)
        truncated = pc.sum(pc.and_(long, pc.is_null(reason))).as_py() or 0
        caption = pc.if_else(long, pc.utf8_slice_codeunits(caption, 0, keep.max_caption_chars), caption)
    kept = pc.is_null(reason)
    table = pa.table({"url": url, "caption": caption}).filter(kept)
    dropped = Counter({k["values"]: k["counts"] for k in pc.value_counts(reason.drop_null()).to_pylist()})
    if malformed := sum(m for _, m in parts):
        dropped["malformed_row"] = malformed
    return UrlList(table=table, rows=n + malformed, dropped=dropped, captions_truncated=truncated)
