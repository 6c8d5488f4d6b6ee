"""Reading URL lists: presets, caption fallback, language filter, dedupe, caption limits, every row counted once."""
import gzip

import pytest

from data_tools import DataToolsError
from data_tools.url_list import PRESETS, Columns, RowFilter, load

WIT_HEADER = ("language\tpage_url\timage_url\tpage_title\tcaption_reference_description\t"
              "caption_attribution_description\tcaption_alt_text_description\tmime_type\n")


def _wit_row(lang, url, ref="", attribution="", alt=""):
    return f"{lang}\thttps://{lang}.wikipedia.org/wiki/X\t{url}\tX\t{ref}\t{attribution}\t{alt}\timage/jpeg\n"


@pytest.fixture
def wit(tmp_path):
    """A WIT-style .tsv.gz: the reference caption when present, else attribution, else alt text."""
    rows = [
        _wit_row("en", "https://upload.example/a.jpg", ref="A red house", attribution="by someone"),
        _wit_row("en", "https://upload.example/b.jpg", attribution="English: A blue boat"),
        _wit_row("en", "https://upload.example/c.jpg", alt="alt text only"),
        _wit_row("en", "https://upload.example/d.jpg"),  # no caption at all
        _wit_row("de", "https://upload.example/e.jpg", ref="Ein Haus"),
        _wit_row("en", "https://upload.example/a.jpg", ref="the same image again"),
        _wit_row("en", "ftp://upload.example/f.jpg", ref="not http"),
        _wit_row("fr", "https://upload.example/g.jpg", ref="x" * 500),
    ]
    path = tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(WIT_HEADER + "".join(rows))
    return path


def test_wit_preset_caption_fallback_and_dedupe(wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(max_caption_chars=100))
    table = urls.table.to_pylist()
    assert [r["caption"] for r in table] == ["A red house", "English: A blue boat", "alt text only", "Ein Haus",
                                             "x" * 100]
    assert urls.rows == 8 and urls.captions_truncated == 1
    assert urls.dropped == {"missing_caption": 1, "duplicate_url": 1, "unsupported_scheme": 1}
    assert urls.table.num_rows + sum(urls.dropped.values()) == urls.rows


def test_language_filter(wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(languages=("en", "de")))
    assert [r["url"][-5:] for r in urls.table.to_pylist()] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    assert urls.dropped["language"] == 1  # fr; the rows dropped for another reason are counted there once
    with pytest.raises(DataToolsError, match="--language needs --language-col"):
        load(wit, columns=Columns(url="image_url"), keep=RowFilter(languages=("en",)))


def test_keep_everything(wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(dedupe=False, min_caption_chars=0))
    assert urls.table.num_rows == 7 and urls.dropped == {"unsupported_scheme": 1}


def test_broken_encoding_is_counted_not_fatal(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(b"url,caption\nhttp://a/1.jpg,fine\nhttp://a/2.jpg,caf\xe9\nhttp://a/3.jpg,\xc3\xa9t\xc3\xa9\n")
    urls = load(path)
    assert [r["caption"] for r in urls.table.to_pylist()] == ["fine", "été"]
    assert urls.dropped == {"bad_encoding": 1}


def test_several_files_and_directories_are_one_list(wit, tmp_path):
    """WIT comes as 10 .tsv.gz files: read as one list, in file order, deduplicated across files; a directory
    stands for its list files, and files of other formats mix."""
    import pandas as pd

    second = wit.with_name("wit_v1.train.all-00001-of-00010.tsv.gz")
    with gzip.open(second, "wt", encoding="utf-8") as f:
        f.write(WIT_HEADER + _wit_row("en", "https://upload.example/a.jpg", ref="seen in the first file")
                + _wit_row("en", "https://upload.example/h.jpg", ref="A green tree"))
    pd.DataFrame({"image_url": ["https://upload.example/i.jpg"], "caption_reference_description": ["A cat"],
                  "caption_attribution_description": [""], "caption_alt_text_description": [""],
                  "language": ["en"]}).to_parquet(tmp_path / "extra.parquet")
    both = load([wit, second, tmp_path / "extra.parquet"], columns=PRESETS["wit"])
    assert [r["url"][-5:] for r in both.table.to_pylist()] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "g.jpg",
                                                                "h.jpg", "i.jpg"]
    assert both.rows == 11 and both.dropped["duplicate_url"] == 2
    assert both.table.num_rows + sum(both.dropped.values()) == both.rows
    folder = load(tmp_path, columns=PRESETS["wit"])  # sorted: extra.parquet, then the two WIT files
    assert folder.rows == 11 and [r["url"][-5:] for r in folder.table.to_pylist()][0] == "i.jpg"
    with pytest.raises(DataToolsError, match="nowhere.tsv: no such file"):
        load([wit, tmp_path / "nowhere.tsv"], columns=PRESETS["wit"])


def test_malformed_csv_lines_and_blank_padded_urls(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text('url,caption\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two,extra field\n"http://a/3.jpg","three\n'
                    'lines"\nhttp://a/4.jpg\n  http://a/5.jpg ,five\n')
    urls = load(path)
    assert [(r["url"], r["caption"]) for r in urls.table.to_pylist()] == [
        ("http://a/1.jpg", "one"), ("http://a/3.jpg", "three\nlines"), ("http://a/5.jpg", "five")]
    assert urls.dropped == {"malformed_row": 2} and urls.rows == 5
