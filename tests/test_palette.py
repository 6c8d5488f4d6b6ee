"""data_tools/palette.py: the ImageGPT palette from shards, and pixels <-> palette tokens."""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools import DataToolsError, cli
from data_tools.palette import fit, fit_palette, shard_urls
from pipeline.models.palette import dequantize, load_palette, palette_colours, quantize

# Four flat colours away from 0 and 255, so that the noise added to them is not clipped (which would move means).
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 60]], np.uint8)
SIZE, STORED = 16, 48  # model side; stored side, 3x: each half of an image shrinks to whole model pixels
SETTINGS = dict(k=4, pixels=3000, image_size=SIZE, seed=0, batch_size=256)


def image(rng) -> bytes:
    """Two halves of two random palette colours plus Gaussian noise (sigma 4), as PNG (lossless)."""
    a, b = COLOURS[rng.choice(len(COLOURS), 2, replace=False)]
    pixels = np.empty((STORED, STORED, 3), np.float64)
    pixels[:, :STORED // 2], pixels[:, STORED // 2:] = a, b
    pixels += rng.normal(0, 4, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 8 images; shard 1 also holds a corrupt image and a sample without one; a 4th 'tar' is noise."""
    out = tmp_path_factory.mktemp("palette_shards")
    rng = np.random.default_rng(0)
    for s in range(3):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i in range(8):
                w.write({"__key__": f"{s}_{i:03d}", "png": image(rng), "txt": "flat colours"})
            if s == 1:
                w.write({"__key__": "1_bad", "jpg": b"\xff\xd8 not a jpeg at all", "txt": "corrupt"})
                w.write({"__key__": "1_text", "txt": "no image here"})
    (out / "00003.tar").write_bytes(rng.bytes(3000))
    return out


@pytest.fixture(scope="module")
def fitted(shards):
    return fit(shards, **SETTINGS)


def test_centres_recover_the_flat_colours(fitted):
    centres = fitted.centres
    assert centres.shape == (4, 3) and centres.dtype == np.float32 and np.abs(centres).max() <= 1
    expected = COLOURS / 127.5 - 1
    matched = centres[[np.abs(centres - c).sum(1).argmin() for c in expected]]
    assert len({tuple(c) for c in matched}) == 4  # one centre per colour
    assert np.abs(matched - expected).max() < 0.02  # 2.5 levels of 255: noise averages out over ~750 pixels each


def test_skipped_samples_and_shards_are_counted(fitted, shards):
    s = fitted.sample
    assert (s.images, s.corrupt, s.no_image) == (24, 1, 1)
    assert len(s.pixels) == 3000 and s.pixels.dtype == np.uint8
    assert any("00001.tar#1_bad" in e for e in s.examples) and any("1_text" in e for e in s.examples)
    assert [d["url"] for d in s.damaged] == [str(shards / "00003.tar")]


def test_same_seed_bit_identical_whatever_the_workers(fitted, shards):
    again = fit_palette(shards, **SETTINGS, workers=2)
    assert again.tobytes() == fitted.centres.tobytes()
    # the sample too: same pixels in the same order
    assert fit(shards, **SETTINGS, workers=2).sample.pixels.tobytes() == fitted.sample.pixels.tobytes()
    other = fit(shards, **{**SETTINGS, "seed": 1})
    assert other.sample.pixels.tobytes() != fitted.sample.pixels.tobytes()


def test_pixel_budget_larger_than_the_corpus_uses_every_pixel(shards):
    result = fit(shards, **{**SETTINGS, "pixels": 10**6})
    assert len(result.sample.pixels) == 24 * SIZE * SIZE


def test_quantize_dequantize_round_trip(fitted):
    centres = fitted.centres
    ids = np.arange(len(centres))
    colours = dequantize(ids, centres)
    assert colours.dtype == np.uint8 and np.array_equal(colours, palette_colours(centres))
    assert np.array_equal(quantize(colours, centres), ids)
    assert np.array_equal(quantize(colours / 127.5 - 1, centres), ids)  # float input: already in [-1, 1]
    # images (..., 3) -> ids (...); torch in, torch out, same ids
    grid = colours[np.random.default_rng(0).integers(0, len(centres), (2, 5, 7))]
    tokens = quantize(grid, centres)
    assert tokens.shape == (2, 5, 7) and tokens.dtype == np.int64
    assert np.array_equal(dequantize(tokens, centres), grid)
    t = quantize(torch.from_numpy(grid), centres)
    assert t.dtype == torch.int64 and np.array_equal(t.numpy(), tokens)
    assert np.array_equal(dequantize(t, centres).numpy(), grid)


def test_quantize_is_the_nearest_centre_chunk_by_chunk(monkeypatch):
    from pipeline.models import palette

    monkeypatch.setattr(palette, "CHUNK_ELEMENTS", 1000)  # 1000 // 64 = 15 pixels a chunk: many chunks
    rng = np.random.default_rng(1)
    centres = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    unit = pixels.astype(np.float64) / 127.5 - 1
    brute = ((unit[..., None, :] - centres.astype(np.float64)) ** 2).sum(-1).argmin(-1)
    assert np.array_equal(quantize(pixels, centres), brute)
    assert np.array_equal(quantize(torch.from_numpy(pixels), torch.from_numpy(centres)).numpy(), brute)


def test_quantize_noisy_image_gives_its_colours(fitted):
    rng = np.random.default_rng(5)
    img = np.asarray(Image.open(io.BytesIO(image(rng))))
    tokens = quantize(img, fitted.centres)
    assert len(np.unique(tokens[:, :STORED // 2])) == 1 and len(np.unique(tokens[:, STORED // 2:])) == 1
    restored = dequantize(tokens, fitted.centres).astype(int)
    assert np.abs(restored - img).mean() < 5  # what is left is the noise


def test_no_readable_pixel_is_an_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"garbage" * 100)
    with wds.TarWriter(str(tmp_path / "b.tar")) as w:
        w.write({"__key__": "x", "png": b"not a png"})
    with pytest.raises(DataToolsError, match="no readable pixel"):
        fit_palette(tmp_path, k=4, pixels=100, image_size=8)


def test_bad_input_is_refused_naming_the_file(tmp_path):
    with pytest.raises(DataToolsError, match="no .tar shards|no \\*.tar shards"):
        shard_urls(tmp_path)
    with pytest.raises(DataToolsError, match="missing"):
        shard_urls(str(tmp_path / "missing/{0..3}.tar"))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="bad.npy"):
        load_palette(bad)
    np.save(bad, np.full((4, 3), 200, np.float32))
    with pytest.raises(ValueError, match="outside"):
        load_palette(bad)


@pytest.fixture
def main():
    return cli.main


def test_cli_writes_palette_and_record(main, shards, fitted, capsys):
    pattern = f"{shards}/{{00000..00003}}.tar"
    assert main(["palette", pattern, "--k", "4", "--pixels", "3e3", "--image-size", str(SIZE),
                 "--batch-size", "256", "--workers", "2", "--no-progress"]) == 0
    out = shards / "palette" / "k4.npy"
    assert load_palette(out).tobytes() == fitted.centres.tobytes()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["k"] == 4 and record["seed"] == 0 and record["pixels_used"] == 3000
    assert record["images_read"] == 24 and record["corrupt_images"] == 1 and record["samples_without_image"] == 1
    assert len(record["shards"]) == 4 and len(record["damaged_shards"]) == 1
    assert record["inertia"] == pytest.approx(fitted.inertia) and record["sklearn_version"]
    assert not list(shards.glob("*.tmp"))
    printed = capsys.readouterr().out
    assert "4 colours from 3000 pixels of 24 images" in printed and "1 corrupt images" in printed
    assert "00003.tar" in printed


def test_cli_refuses_bad_input(main, tmp_path, capsys):
    assert main(["palette", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["palette", str(tmp_path), "--k", "8", "--pixels", "4"]) == 2
    assert "--pixels" in capsys.readouterr().err
