"""The two places where we change what img2dataset does, both by subclassing its classes for one download.

- Shard numbering: img2dataset numbers shards (file names and keys) from 0 in every output folder. A SLURM array
  task downloads one slice of the list, whose shards must keep the numbers one download of the whole list gives.
- Images OpenCV decodes wrongly or dangerously: img2dataset decodes with `cv2.imdecode(IMREAD_UNCHANGED)`, which
  ignores EXIF orientation (phone photos come out on their side), reads Adobe CMYK JPEGs with inverted colours,
  keeps 16-bit PNGs 16-bit (then fails to encode them as JPEG), and decodes any size before checking the area (a
  few-KB PNG claiming 50k x 50k pixels takes 7.5 GB), and takes a JPEG cut short for a whole one (the missing
  rows come out grey). PIL reads the header first (microseconds, no pixels decoded): oversized images are refused
  there; a JPEG that does not end with its end-of-image marker is decoded at 1/8 scale by PIL and refused if cut
  short; the few images in need are decoded by PIL, turned upright and to 8-bit RGB, and handed on as lossless PNG;
  everything else goes to img2dataset untouched.
"""
from __future__ import annotations

import contextlib
import importlib
import io
from typing import Iterator

import numpy as np
from img2dataset.resizer import Resizer
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # EXIF tag
_NEEDS_PIL = {"CMYK", "I;16", "I;16B", "I;16L", "I", "F", "LAB", "YCbCr"}


class SafeResizer(Resizer):
    """img2dataset's Resizer behind a PIL header check (pickled to img2dataset's worker processes, so it lives at
    module level)."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            img_stream.seek(0)
            with Image.open(img_stream) as img:
                width, height = img.size
                if width * height > self.max_image_area:
                    return None, None, None, None, None, "image area too large"
                if img.format == "JPEG" and _cut_short(img_stream):
                    return None, None, None, None, None, "image truncated: JPEG cut short"
                orientation = img.getexif().get(_ORIENTATION, 1) if img.format in ("JPEG", "TIFF", "WEBP") else 1
                sixteen_bit = img.format == "PNG" and bool(img.tile) and "16" in str(img.tile[0].args)
                if orientation != 1 or sixteen_bit or img.mode in _NEEDS_PIL:
                    img_stream = _normalized(img)
        except Image.DecompressionBombError:  # PIL's own limit, 2x Image.MAX_IMAGE_PIXELS
            return None, None, None, None, None, "image area too large"
        except Exception:  # not an image PIL knows, or a broken one: img2dataset decides and reports as before
            pass
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


def _cut_short(stream: io.BytesIO) -> bool:
    """Whether a JPEG's data ends before its last scan does. Ending with the EOI marker (FF D9, which cannot occur in
    entropy-coded data) proves it whole at no cost; the rest (cut, or with a trailer after EOI as some cameras
    write) are decoded at 1/8 scale, which still reads every byte of the scans."""
    with stream.getbuffer() as data:
        if data[-2:] == b"\xff\xd9":
            return False
    try:
        with Image.open(io.BytesIO(stream.getvalue())) as img:  # its own stream: the caller's image reads this one
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return False
    except OSError:  # "image file is truncated"
        return True


def _normalized(img: Image.Image) -> io.BytesIO:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits (PIL would clip)
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8), "L")
    out = io.BytesIO()
    img.convert("RGB").save(out, format="PNG", compress_level=1)
    out.seek(0)
    return out


@contextlib.contextmanager
def installed(first_shard: int = 0) -> Iterator[None]:
    """img2dataset.download, within this block, uses SafeResizer and numbers shards from first_shard."""
    # the module, not the `main` function img2dataset's __init__ exports under the same name
    main = importlib.import_module("img2dataset.main")
    reader, resizer = main.Reader, main.Resizer

    class OffsetReader(reader):  # iterated in this process only: it need not pickle
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start_shard_id = first_shard

    main.Reader, main.Resizer = OffsetReader, SafeResizer
    try:
        yield
    finally:
        main.Reader, main.Resizer = reader, resizer
