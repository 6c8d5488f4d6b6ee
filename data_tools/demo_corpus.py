"""Synthetic image-caption corpus served over loopback HTTP, so the demo exercises the real download path.

Each image is one coloured shape on a noisy grey background; captions always name colour and shape and often
size and position. A tiny CLIP learns it in minutes on CPU. Layout of OUT:
  images/NNNNNN.jpg           training images (reached only through the URL list)
  train.parquet               image, caption, label of every training image (ground truth, for debugging)
  val/<colour>_<shape>/*.jpg  held-out zero-shot split, ImageFolder tree + classnames.txt and
                              zeroshot_classification_templates.txt (clip_benchmark's file names)
  urls.parquet, urls.csv      url, caption: the input of `data_tools download`
  corpus.json                 generation parameters (a rerun with the same ones reuses the images)
  server.json                 {"url", "pid"} while `demo-corpus` serves
"""
from __future__ import annotations

import argparse
import collections
import functools
import io
import json
import os
import shutil
import signal
import socket
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from data_tools import DataToolsError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (240, 215, 40), "purple": (140, 60, 185), "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)  # ImageFolder's sorted-folder order
TEMPLATES = ("a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an image of a {c}.")
CAPTION_FORMS = (
    "{thing}", "a photo of {thing}", "an image of {thing}", "a drawing of {thing}",
    "a picture showing {thing}", "there is {thing}", "{noun}",
)
VERSION = 2  # bump when rendering, captions or the files written change, so old corpora are regenerated
SUPERSAMPLE = 4  # draw large then box-downsample: anti-aliased edges


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position(cx: float, cy: float, rng: np.random.Generator) -> str:
    h = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    v = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if h and v:
        return "in the corner" if rng.random() < 0.3 else f"in the {v} {h} corner"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return str(rng.choice(["in the center", "in the middle"]))


def caption(colour: str, shape: str, frac: float, cx: float, cy: float, rng: np.random.Generator) -> str:
    """Colour and shape always; size (from the real extent) and position (centre, in thirds) often."""
    size = "small" if frac < 0.36 else "large" if frac > 0.50 else ""
    noun = f"{size} {colour} {shape}" if size and rng.random() < 0.6 else f"{colour} {shape}"
    thing = f"{_article(noun)} {noun}"
    if rng.random() < 0.5:
        thing += " " + _position(cx, cy, rng)
    return str(rng.choice(CAPTION_FORMS)).format(thing=thing, noun=noun)


def render(colour: str, shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One shape of 25-60% of the image side at a random position; returns the image and its geometry."""
    frac = rng.uniform(0.25, 0.60)
    cx, cy = rng.uniform(frac / 2, 1 - frac / 2, size=2)
    s = size * SUPERSAMPLE
    bg = int(rng.integers(70, 190))
    img = Image.new("RGB", (s, s), (bg, bg, bg))
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
    half, x, y = frac * s / 2, cx * s, cy * s
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    else:  # cross
        arm = half / 3
        draw.rectangle((x - half, y - arm, x + half, y + arm), fill=fill)
        draw.rectangle((x - arm, y - half, x + arm, y + half), fill=fill)
    pixels = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32)
    # grey sensor-like noise: the background is never a flat colour a model could key on
    pixels += rng.normal(0, 6, (size, size, 1))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img, {"frac": float(frac), "cx": float(cx), "cy": float(cy)}


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    # balanced: class counts differ by at most one
    return rng.permutation(np.resize(np.arange(len(CLASSES)), n))


def make_corpus(out: str | Path, n_train: int = 4000, n_val: int = 640, seed: int = 0, size: int = 64) -> dict:
    """Write the training images + train.parquet and the val ImageFolder tree; reuse them if already there."""
    if n_train < 1 or n_val < len(CLASSES) or size < 16:
        raise DataToolsError(f"need --train >= 1, --val >= {len(CLASSES)} (one per class), --size >= 16")
    out = Path(out)
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val, "seed": seed, "size": size}
    info = {"params": params, "classes": CLASSES, "out": str(out)}
    meta_file = out / "corpus.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) == params and (out / "train.parquet").is_file():
        return {**info, "generated": False}
    meta_file.unlink(missing_ok=True)  # written last: its presence means a complete corpus
    for d in ("images", "val"):
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        # one stream per split: the val set does not change with --train
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        rows = []
        for i, label in enumerate(_labels(n, rng)):
            colour, shape = CLASSES[label].split("_")
            img, geo = render(colour, shape, size, rng)
            if split == "train":
                name = f"images/{i:06d}.jpg"
                rows.append({"image": name, "caption": caption(colour, shape, **geo, rng=rng), "label": CLASSES[label]})
            else:
                name = f"val/{CLASSES[label]}/{i:05d}.jpg"
                (out / name).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / name, quality=90)
        if split == "train":
            pd.DataFrame(rows).to_parquet(out / "train.parquet", index=False)
            # the same images with their class: `data_tools from-folder CORPUS --csv CORPUS/labels.csv` (ViT)
            pd.DataFrame(rows)[["image", "label"]].rename(columns={"image": "path"}).to_csv(out / "labels.csv",
                                                                                          index=False)
    (out / "val/classnames.txt").write_text("".join(c.replace("_", " ") + "\n" for c in CLASSES))
    (out / "val/zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    meta_file.write_text(json.dumps(params, indent=1))
    return {**info, "generated": True}


def _closed_port() -> int:
    # bound then released without listen(): connecting to it is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_url_rows(base_url: str) -> list[dict]:
    """Rows that must not become samples, one per outcome (two time out); the caption names the reason
    `data_tools download` reports, except for the row without a caption."""
    rows = [
        (f"{base_url}/bad/missing.jpg", "http_404"),
        (f"{base_url}/bad/error.jpg", "http_5xx"),
        (f"{base_url}/bad/loop.jpg", "redirect_loop"),  # redirects to itself
        (f"{base_url}/bad/notimage.jpg", "decode_error"),  # 200 text/html
        (f"{base_url}/bad/truncated.jpg", "truncated"),  # body shorter than Content-Length
        (f"{base_url}/bad/cut.jpg", "image_truncated"),  # the first half of a JPEG, served whole: OpenCV takes it
        (f"{base_url}/bad/noai.jpg", "disallowed"),  # a good image served with X-Robots-Tag: noai
        (f"{base_url}/bad/slow.jpg", "timeout"),  # answers after 30 s
        (f"{base_url}/bad/never.jpg", "timeout"),  # reads the request, never answers
        (f"{base_url}/bad/bomb.png", "image_too_large"),  # a 400 KB PNG of 20k x 20k pixels
        (f"http://127.0.0.1:{_closed_port()}/images/000000.jpg", "connection_refused"),
        ("", "empty_url"),
        ("ftp://127.0.0.1/images/000000.jpg", "unsupported_scheme"),
        (f"{base_url}/images/000000.jpg", "duplicate_url"),  # the first training image again
    ]
    return [{"url": url, "caption": f"bad url: {reason}"} for url, reason in rows] + [
        {"url": f"{base_url}/odd/cmyk.jpg?uncaptioned", "caption": ""}]  # missing_caption


# Images OpenCV alone would get wrong; each must come out as an upright 8-bit RGB red-over-blue image
# (data_tools/img2dataset_hooks.py). Name -> (format, PIL save arguments) of the served file.
ODD_IMAGES = ("cmyk.jpg", "gray16.png", "rgb16.png", "palette.png", "rotated.jpg")


def odd_image_rows(base_url: str) -> list[dict]:
    return [{"url": f"{base_url}/odd/{name}", "caption": f"odd image: {name}"} for name in ODD_IMAGES]


def reference_image(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """The upright picture every odd image encodes: red top half, blue bottom half, wider than high."""
    img = Image.new("RGB", size, (40, 60, 220))
    img.paste((220, 40, 40), (0, 0, size[0], size[1] // 2))
    return img


@functools.cache
def odd_image(name: str) -> bytes:
    ref, buf = reference_image(), io.BytesIO()
    if name == "cmyk.jpg":
        ref.convert("CMYK").save(buf, "JPEG", quality=95)  # Adobe-style CMYK JPEG
    elif name == "gray16.png":  # a grey ramp: the top half light, the bottom dark, 16 bits per pixel
        grey = np.where(np.arange(ref.height)[:, None] < ref.height // 2, 50000, 10000) * np.ones((1, ref.width))
        Image.fromarray(grey.astype(np.uint16)).save(buf, "PNG")
    elif name == "rgb16.png":
        import cv2  # PIL cannot write 16-bit RGB; cv2 (an img2dataset dependency) can, in BGR order
        _, png = cv2.imencode(".png", np.asarray(ref)[..., ::-1].astype(np.uint16) * 257)
        buf.write(png.tobytes())
    elif name == "palette.png":
        ref.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(buf, "PNG")
    elif name == "rotated.jpg":  # stored on its side, with EXIF orientation 6 (rotate 90 clockwise to view)
        exif = Image.Exif()
        exif[0x0112] = 6
        ref.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    else:
        raise KeyError(name)
    return buf.getvalue()


@functools.cache
def _bomb_png() -> bytes:
    """A valid PNG of 20000 x 20000 black pixels, compressed to ~400 KB: 1.2 GB once decoded as RGB."""
    import struct
    import zlib

    side = 20000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x00" * side  # filter byte + one grey byte per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_url_list(out: str | Path, base_url: str, bad_urls: bool = False) -> pd.DataFrame:
    """OUT/urls.parquet and OUT/urls.csv (url, caption), one row per training image; with bad_urls, then the rows
    that must fail and the odd images that must succeed."""
    out = Path(out)
    train = pd.read_parquet(out / "train.parquet")
    base_url = base_url.rstrip("/")
    urls = pd.DataFrame({"url": base_url + "/" + train["image"], "caption": train["caption"]})
    if bad_urls:
        urls = pd.concat([urls, pd.DataFrame(bad_url_rows(base_url) + odd_image_rows(base_url))], ignore_index=True)
    urls.to_parquet(out / "urls.parquet", index=False)
    urls.to_csv(out / "urls.csv", index=False)
    return urls


@functools.cache
def _sample_jpeg() -> bytes:
    img, _ = render("red", "circle", 64, np.random.default_rng(0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Handler(SimpleHTTPRequestHandler):
    """Static files under the root, plus /bad/* endpoints that fail in specific ways (/bad/missing.jpg: 404)."""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def _send(self, body: bytes, content_type: str, length: int | None = None, **headers: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.requests[self.path] += 1  # type: ignore[attr-defined]
        if "delay=" in self.path:  # ?delay=S: a slow server (tests interrupt downloads in flight)
            self.server.stopping.wait(float(self.path.split("delay=")[1].split("&")[0]))  # type: ignore[attr-defined]
        if self.path == "/bad/notimage.jpg":
            self._send(b"<html><body>not an image</body></html>", "text/html")
        elif self.path == "/bad/truncated.jpg":
            jpeg = _sample_jpeg()
            self._send(jpeg[: len(jpeg) // 2], "image/jpeg", length=len(jpeg))  # the connection closes early
        elif self.path == "/bad/cut.jpg":
            jpeg = _sample_jpeg()
            self._send(jpeg[: len(jpeg) // 2], "image/jpeg")
        elif self.path == "/bad/noai.jpg":
            self._send(_sample_jpeg(), "image/jpeg", X_Robots_Tag="noai, noimageai")
        elif self.path == "/bad/slow.jpg":
            self.server.stopping.wait(30)  # type: ignore[attr-defined]
            self._send(_sample_jpeg(), "image/jpeg")
        elif self.path == "/bad/never.jpg":
            self.server.stopping.wait(600)  # type: ignore[attr-defined]
        elif self.path == "/bad/error.jpg":
            self.send_error(500)
        elif self.path == "/bad/loop.jpg":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/bad/bomb.png":
            self._send(_bomb_png(), "image/png")
        elif self.path.startswith("/odd/"):
            name = self.path[len("/odd/"):].split("?")[0]
            if name not in ODD_IMAGES:
                self.send_error(404)
                return
            self._send(odd_image(name), "image/png" if name.endswith(".png") else "image/jpeg")
        else:
            super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # img2dataset opens processes x threads connections at once; the default backlog of 5 drops SYNs (1 s stalls)
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], root: Path):
        self.stopping = threading.Event()
        self.requests: collections.Counter = collections.Counter()  # path -> GETs, for tests
        self.lock = threading.Lock()
        super().__init__(address, functools.partial(_Handler, directory=str(root)))

    def handle_error(self, request, client_address) -> None:
        # clients giving up (timeouts, the truncated body) are part of the demo, not errors
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def shutdown(self) -> None:
        self.stopping.set()  # release /bad/slow.jpg handlers
        super().shutdown()


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) threading HTTP server for root; call serve_forever() or use start_server()."""
    # the bomb takes a second to compress: have it ready before a client with a short timeout asks
    threading.Thread(target=_bomb_png, daemon=True, name="demo-corpus-bomb").start()
    try:
        return _Server((host, port), Path(root))
    except OSError as e:
        raise DataToolsError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def start_server(root: str | Path, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve root from a background thread; stop with server.shutdown(); server.server_close()."""
    server = serve(root, port=port)
    threading.Thread(target=server.serve_forever, daemon=True, name="demo-corpus-http").start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.no_serve and not args.port:
        raise DataToolsError("--no-serve needs --port: the port the URL list points at")
    info = make_corpus(out, args.train, args.val, args.seed, args.size)
    print(f"corpus {out}: {args.train} train images, {args.val} val images in {len(CLASSES)} classes "
          f"({'generated' if info['generated'] else 'already there'})", flush=True)
    if args.no_serve:
        write_url_list(out, f"http://127.0.0.1:{args.port}", args.bad_urls)
        return 0
    server = serve(out, port=args.port)  # bind first: the URLs carry the port
    base_url = "http://%s:%d" % server.server_address[:2]
    write_url_list(out, base_url, args.bad_urls)
    (out / "server.json").write_text(json.dumps({"url": base_url, "pid": os.getpid()}))
    print(f"serving {out} on {base_url} (Ctrl-C to stop)", flush=True)
    # SIGTERM stops cleanly like Ctrl-C; SIGINT is re-armed because shells start background jobs with it ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stopping.set()
        server.server_close()
        (out / "server.json").unlink(missing_ok=True)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo-corpus", help="generate the synthetic shapes corpus and serve it on loopback",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--train", type=int, default=4000, help="training images (in the URL list)")
    p.add_argument("--val", type=int, default=640, help="held-out images, balanced over the 24 classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--bad-urls", action="store_true", help="append rows that fail, one per failure reason")
    p.add_argument("--no-serve", action="store_true", help="write the URL list for --port and exit")
    p.set_defaults(func=run)
