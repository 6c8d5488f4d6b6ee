"""Reading URL lists: presets, caption fallback, language filter, dedupe, caption limits, every row counted once."""
import gzip

import pyarrow.parquet as pq
import pytest

from data_tools import DataToolsError
from data_tools.url_list import PRESETS, Columns, ListSpec, RowFilter

WIT_HEADER = ("language\tpage_url\timage_url\tpage_title\tcaption_reference_description\t"
              "caption_attribution_description\tcaption_alt_text_description\tmime_type\n")


def _wit_row(lang, url, ref="", attribution="", alt=""):
    return f"{lang}\thttps://{lang}.wikipedia.org/wiki/X\t{url}\tX\t{ref}\t{attribution}\t{alt}\timage/jpeg\n"


@pytest.fixture
def load(tmp_path):
    """ListSpec(...).prepare into a fresh folder, for lists small enough to look at whole."""
    folders = iter(range(100))

    def prepare(paths, columns=Columns(), keep=RowFilter(), **kw):
        return ListSpec(paths, columns=columns, keep=keep).prepare(tmp_path / f"list{next(folders)}", **kw)

    return prepare


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


def test_wit_preset_caption_fallback_and_dedupe(load, wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(max_caption_chars=100))
    table = urls.read().to_pylist()
    assert [r["caption"] for r in table] == ["A red house", "English: A blue boat", "alt text only", "Ein Haus",
                                             "x" * 100]
    assert urls.rows == 8 and urls.captions_truncated == 1
    assert urls.dropped == {"missing_caption": 1, "duplicate_url": 1, "unsupported_scheme": 1}
    assert urls.kept + sum(urls.dropped.values()) == urls.rows


def test_language_filter(load, wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(languages=("en", "de")))
    assert [r["url"][-5:] for r in urls.read().to_pylist()] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    assert urls.dropped["language"] == 1  # fr; the rows dropped for another reason are counted there once
    with pytest.raises(DataToolsError, match="--language needs --language-col"):
        load(wit, columns=Columns(url="image_url"), keep=RowFilter(languages=("en",)))


def test_keep_everything(load, wit):
    urls = load(wit, columns=PRESETS["wit"], keep=RowFilter(dedupe=False, min_caption_chars=0))
    assert urls.kept == 7 and urls.dropped == {"unsupported_scheme": 1}


def test_broken_encoding_is_counted_not_fatal(load, tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(b"url,caption\nhttp://a/1.jpg,fine\nhttp://a/2.jpg,caf\xe9\nhttp://a/3.jpg,\xc3\xa9t\xc3\xa9\n")
    urls = load(path)
    assert [r["caption"] for r in urls.read().to_pylist()] == ["fine", "été"]
    assert urls.dropped == {"bad_encoding": 1}


def test_several_files_and_directories_are_one_list(load, wit, tmp_path):
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
    assert [r["url"][-5:] for r in both.read().to_pylist()] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "g.jpg",
                                                                "h.jpg", "i.jpg"]
    assert both.rows == 11 and both.dropped["duplicate_url"] == 2
    assert both.kept + sum(both.dropped.values()) == both.rows
    folder = load(tmp_path, columns=PRESETS["wit"])  # sorted: extra.parquet, then the two WIT files
    assert folder.rows == 11 and [r["url"][-5:] for r in folder.read().to_pylist()][0] == "i.jpg"
    with pytest.raises(DataToolsError, match="nowhere.tsv: no such file"):
        load([wit, tmp_path / "nowhere.tsv"], columns=PRESETS["wit"])


def test_malformed_csv_lines_and_blank_padded_urls(load, tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text('url,caption\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two,extra field\n"http://a/3.jpg","three\n'
                    'lines"\nhttp://a/4.jpg\n  http://a/5.jpg ,five\n')
    urls = load(path)
    assert [(r["url"], r["caption"]) for r in urls.read().to_pylist()] == [
        ("http://a/1.jpg", "one"), ("http://a/3.jpg", "three\nlines"), ("http://a/5.jpg", "five")]
    assert urls.dropped == {"malformed_row": 2} and urls.rows == 5


def _random_list(path, n, seed=0):
    """n rows of which about a third repeat an earlier URL, some have no caption, some are not http."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, int(n * 0.7), n)
    urls = [f"http://h{i % 7}.example/{i}.jpg" if i % 13 else f"ftp://x/{i}" for i in ids]
    captions = ["" if k % 17 == 0 else f"caption {k} {'x' * (k % 40)}" for k in range(n)]
    pd.DataFrame({"url": urls, "caption": captions}).to_csv(path, index=False)
    return pd.read_csv(path, keep_default_na=False)


def test_batches_parts_and_buckets_change_nothing(load, tmp_path):
    """Tiny batches (rows straddle them) and tiny parts give what pandas gives on the whole list in memory."""
    rows = _random_list(tmp_path / "big.csv", 3000)
    rows["caption"] = rows["caption"].str.strip()
    keep = RowFilter(max_caption_chars=20)
    got = load(tmp_path / "big.csv", keep=keep, batch_rows=97, part_rows=50)
    http = rows[rows["url"].str.startswith("http") & (rows["caption"] != "")]
    expected = http.drop_duplicates("url")
    table = got.read().to_pandas()
    assert table["url"].tolist() == expected["url"].tolist()
    assert table["caption"].tolist() == [c[:20] for c in expected["caption"]]
    assert got.kept == len(expected) and got.rows == 3000 and got.captions_truncated == sum(
        len(c) > 20 for c in expected["caption"])
    assert got.dropped == {"duplicate_url": len(http) - len(expected), "missing_caption": sum(
        (rows["caption"] == "") & rows["url"].str.startswith("http")), "unsupported_scheme": sum(
        ~rows["url"].str.startswith("http"))}
    assert [p.name for p in got.parts()][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(len(pq.read_table(p)) == 50 for p in got.parts()[:-1])  # whole parts; the last one the rest


def test_a_killed_preparation_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Killed in the first pass (mid-file: its bucket records are cut back) and in the second (after a part): the
    rerun gives exactly the uninterrupted result."""
    from data_tools import url_list

    for i in range(3):
        _random_list(tmp_path / f"in{i}.csv", 400, seed=i)
    spec = ListSpec([tmp_path / f"in{i}.csv" for i in range(3)], keep=RowFilter(max_caption_chars=20))
    straight = spec.prepare(tmp_path / "straight", part_rows=64, batch_rows=50)

    def kill_at(function, n):
        real, calls = getattr(url_list, function), []

        def killed(*args):
            result = real(*args)
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt("killed")
            return result
        return killed

    # the 12th batch hashed: in the second file; the 7th record written: after the second part
    for name, function, n in (("scan", "_url_hashes", 12), ("parts", "_write_json", 7)):
        with monkeypatch.context() as m:
            m.setattr(url_list, function, kill_at(function, n))
            with pytest.raises(KeyboardInterrupt):
                spec.prepare(tmp_path / name, part_rows=64, batch_rows=50)
        resumed = spec.prepare(tmp_path / name, part_rows=64, batch_rows=50)
        assert resumed.read().equals(straight.read()), name
        assert (resumed.rows, resumed.kept, resumed.dropped, resumed.captions_truncated) == (
            straight.rows, straight.kept, straight.dropped, straight.captions_truncated), name
    assert not (tmp_path / "parts" / ".work").exists()  # work files go once the list is done
