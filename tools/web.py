"""A web page for one's own images: upload an image, type expressions, see the overlays, download the masks.

    python -m tools.web --checkpoint checkpoint/demo/best.pth [--device cpu] [--port 7860]

then open http://127.0.0.1:7860/. Standard library only (``http.server``) and one static page
(``tools/web/index.html``): nothing to install beyond the project, nothing loaded from the internet (docs/web.md
says why not Gradio).

Protocol (what the page's script does, and what ``tests/test_web.py`` drives):

- ``GET /``: the page, with the model and the limits written in.
- ``POST /predict?name=<file name>&texts=<the text box>``, body: the image file's bytes as uploaded. Answer, JSON:
  ``{"results": [{"text", "warning", "coverage", "colour", "overlay", "mask", "mask_name"}, ...], "summary"}``
  (``overlay``: PNG data URL of the image with the mask blended in, at most PREVIEW_SIDE px on its long side;
  ``mask``: PNG data URL, 0/255 at the image's own size after its EXIF orientation), or ``{"error": one line}``
  with status 400 (413 for a file over the byte limit, 408 for an upload that stopped sending for
  ``Limits.idle_seconds``). A bad upload never stops the server.

Predictions run one at a time (a lock): a burst of uploads queues instead of multiplying the memory.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.checks import ExpressionError, check_user_text
from data.image_io import ImageReadError, open_rgb

from .cli import run_cli
from .demo import Predictor, add_amp_argument
from .visualize import PALETTE, overlay_mask

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("web") / "index.html"
PREVIEW_SIDE = 1024  # overlays shown on the page are at most this long (the masks keep the image's size)
DRAIN_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; the page states them and the server refuses anything beyond with a message."""

    max_bytes: int = 20_000_000
    max_pixels: int = 12_000_000  # a 12-megapixel phone photo (4000x3000) fits
    max_expressions: int = 5
    max_text_chars: int = 2000
    # a connection that sends nothing for this long is closed (a stalled upload would hold its thread for ever);
    # per read, so a slow upload that keeps sending is never cut
    idle_seconds: float = 60.0

    def describe(self) -> str:
        return (f"Images: PNG, JPEG, WebP, BMP, TIFF ... up to {self.max_bytes / 1e6:g} MB and "
                f"{self.max_pixels / 1e6:g} megapixels (EXIF orientation applied). Up to {self.max_expressions} "
                f"expressions, {self.max_text_chars} characters in all.")  # fmt: skip


class UploadError(ValueError):
    """What is wrong with an upload, in one line for the page; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- checks of one upload
def check_bytes(count: int, name: str, limits: Limits) -> None:
    """UploadError (status 413) if a file of ``count`` bytes is over the limit."""
    if count > limits.max_bytes:
        raise UploadError(f"{name or 'the upload'!r} has {count / 1e6:.1f} MB, more than the "
                          f"{limits.max_bytes / 1e6:g} MB this page accepts", 413)  # fmt: skip


def read_upload(data: bytes, name: str, limits: Limits) -> np.ndarray:
    """An uploaded file's bytes -> [H, W, 3] uint8 RGB after its EXIF orientation.

    The size in pixels is read from the header before anything is decoded, so an oversized image costs nothing.
    Raises UploadError (one line naming the file) for an empty file, a file that is not an image, or one beyond
    ``limits``.
    """
    shown = repr(name) if name else "the upload"
    if not data:
        raise UploadError("no image: choose an image file first")
    check_bytes(len(data), name, limits)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own guard, far above any sensible max_pixels
        raise UploadError(f"{shown} is far too large: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UploadError(f"{shown} is not an image this page can read (PNG, JPEG, WebP, BMP, TIFF, ...): "
                          f"{type(e).__name__}") from e  # fmt: skip
    if width * height > limits.max_pixels:
        raise UploadError(
            f"{shown} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more "
            f"than the {limits.max_pixels / 1e6:g} megapixels this page accepts: make it smaller"
        )
    try:
        return np.asarray(open_rgb(io.BytesIO(data), exif=True))  # type: ignore[arg-type]  # PIL reads file objects
    except ImageReadError as e:  # a readable header over broken pixel data (a cut download, ...)
        reason = str(e.__cause__ or e)
        raise UploadError(f"{shown} is damaged and cannot be decoded: {reason}") from e


def read_expressions(text: str, predictor: Predictor, limits: Limits) -> tuple[list[str], list[str]]:
    """The text box -> (expressions, one per non-blank line, stripped; a warning per expression, "" if none).

    Raises UploadError for no expression, one that tokenises to nothing (``data.checks.check_user_text``), too
    many of them or too much text.
    """
    if len(text) > limits.max_text_chars:
        raise UploadError(f"the text has {len(text)} characters, more than the {limits.max_text_chars} this page "
                          "accepts")  # fmt: skip
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > limits.max_expressions:
        raise UploadError(f"{len(lines)} expressions, more than the {limits.max_expressions} this page segments "
                          "at once: one expression per line")  # fmt: skip
    try:
        if not lines:
            check_user_text(predictor.tokenizer, text, predictor.max_tokens)  # raises its "empty" message
        warnings = [check_user_text(predictor.tokenizer, line, predictor.max_tokens) for line in lines]
    except ExpressionError as e:
        raise UploadError(str(e)) from e
    return lines, warnings


# ----------------------------------------------------------------------------- the answer
def png_data_url(array: np.ndarray) -> str:
    """[H, W] or [H, W, 3] uint8 -> ``data:image/png;base64,...``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def preview(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """image [H, W, 3] uint8, mask [H, W] bool -> the overlay shown on the page, [h, w, 3] uint8: ``overlay_mask``
    at the image's size, or on the image shrunk to PREVIEW_SIDE on its long side (bilinear; the mask nearest) for
    big photos, which would make heavy pages."""
    h, w = mask.shape
    scale = PREVIEW_SIDE / max(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return overlay_mask(image, mask, colour)


def segment(predictor: Predictor, data: bytes, name: str, text: str, limits: Limits) -> dict[str, Any]:
    """One upload -> the JSON answer of ``POST /predict`` (see the module docstring); UploadError if refused."""
    texts, warnings = read_expressions(text, predictor, limits)
    image = read_upload(data, name, limits)
    masks = predictor.predict(image, texts)  # [E, H, W] bool
    results = []
    for e, (expression, warning, mask) in enumerate(zip(texts, warnings, masks)):
        colour = PALETTE[e % len(PALETTE)]
        results.append({
            "text": expression,
            "warning": warning,
            "coverage": float(mask.mean()),
            "colour": "rgb({}, {}, {})".format(*colour),
            "overlay": png_data_url(preview(image, mask, colour)),
            "mask": png_data_url(mask.astype(np.uint8) * 255),
            "mask_name": f"{Path(name).stem or 'image'}_mask_{e}.png",
        })  # fmt: skip
    h, w = image.shape[:2]
    return {"results": results, "summary": f"{len(texts)} mask(s) of {w}x{h} pixels"}


# ----------------------------------------------------------------------------- the server
class _Handler(BaseHTTPRequestHandler):
    """Serves the page and ``/predict`` for ``self.server.app`` (a ``WebApp``)."""

    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.app.limits.idle_seconds  # the socket's timeout, set by the base class's setup
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, answer: dict[str, Any]) -> None:
        self._send(status, json.dumps(answer).encode("utf-8"), "application/json")

    def _not_found(self) -> None:
        self._send(404, b"not found", "text/plain")

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        if urlsplit(self.path).path in ("/", "/index.html"):
            self._send(200, self.server.app.page, "text/html; charset=utf-8")
        else:
            self._not_found()

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._not_found()
            return
        query = parse_qs(url.query, keep_blank_values=True)
        name, text = query.get("name", [""])[0], query.get("texts", [""])[0]
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:  # (a negative length would read until the client gives up)
            self._json(400, {"error": "bad Content-Length header"})
            return
        app = self.server.app
        try:
            try:
                check_bytes(length, name, app.limits)
            except UploadError as e:
                self._drain(length)  # browsers show an answer only once their upload went through
                self._json(e.status, {"error": str(e)})
                return
            data = self.rfile.read(length)
        except TimeoutError:
            idle = app.limits.idle_seconds
            self._json(408, {"error": f"the upload stopped: {length} bytes announced, nothing more for {idle:g} s"})
            return
        try:
            self._json(200, app.segment(data, name, text))
        except UploadError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # a bug, not the user's: logged with its traceback, the server keeps serving
            logger.exception("predict failed for %r", name)
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(DRAIN_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: WebApp


class WebApp:
    """A Predictor behind the page; ``make_server()`` gives the HTTP server to ``serve_forever()`` (the command line
    in the foreground, the tests in a thread)."""

    def __init__(self, predictor: Predictor, limits: Limits = Limits(), model_name: str = "") -> None:
        self.predictor, self.limits = predictor, limits
        self._lock = threading.Lock()
        model = f"{model_name or 'LAVT'} {predictor.describe()}"
        self.page = (
            PAGE.read_text(encoding="utf-8")
            .replace("{{MODEL}}", html.escape(model))
            .replace("{{LIMITS}}", html.escape(limits.describe()))
            .encode("utf-8")
        )

    def segment(self, data: bytes, name: str, text: str) -> dict[str, Any]:
        with self._lock:
            return segment(self.predictor, data, name, text, self.limits)

    def make_server(self, host: str = "127.0.0.1", port: int = 7860) -> _Server:
        """A bound HTTP server (port 0: a free port; the chosen one is ``server.server_address[1]``).

        Raises ValueError (one line) when the address cannot be had (a port in use, an unknown host)."""
        try:
            server = _Server((host, port), _Handler)
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)"
            ) from e
        server.app = self
        return server


# ----------------------------------------------------------------------------- command line
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.web",
        description="A web page that segments what each typed expression refers to in an uploaded image.",
        epilog="--debug: the traceback of a startup error instead of its one line.",
    )
    p.add_argument("--checkpoint", required=True, help="LAVT checkpoint (this project's or an official release)")
    p.add_argument("--cfg_file", default=None, help="config for checkpoints without a stored one (official files)")
    p.add_argument("--ck_bert", default=None, help='the text encoder: a local BERT folder or "minilm-l6"')
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    add_amp_argument(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0: any free one)")
    p.add_argument(
        "--max_megabytes",
        type=float,
        default=Limits.max_bytes / 1e6,
        help="largest image file, MB (default: %(default)s)",
    )
    p.add_argument(
        "--max_megapixels",
        type=float,
        default=Limits.max_pixels / 1e6,
        help="largest image, megapixels (default: %(default)s)",
    )
    p.add_argument(
        "--max_expressions",
        type=int,
        default=Limits.max_expressions,
        help="expressions per upload (default: %(default)s)",
    )
    p.add_argument(
        "--idle_seconds",
        type=float,
        default=Limits.idle_seconds,
        help="a connection silent this long is closed, a stalled upload answered 408 (default: %(default)s)",
    )
    p.add_argument("--opts", nargs="+", default=(), metavar="KEY VALUE", help="config overrides")
    return p


def build(argv: Sequence[str] | None = None) -> _Server:
    """Parse the command line, load the model, bind the server (not yet serving)."""
    args = get_parser().parse_args(argv)
    limits = Limits(
        round(args.max_megabytes * 1e6), round(args.max_megapixels * 1e6), args.max_expressions,
        idle_seconds=args.idle_seconds,
    )  # fmt: skip
    if min(limits.max_bytes, limits.max_pixels, limits.max_expressions) < 1:
        raise ValueError(f"--max_megabytes, --max_megapixels and --max_expressions must be positive, got {limits}")
    if not limits.idle_seconds > 0:  # (0 would make every socket non-blocking, nan never times out)
        raise ValueError(f"--idle_seconds must be positive, got {args.idle_seconds}")
    opts = list(args.opts) + (["MODEL.TEXT.ENCODER", args.ck_bert] if args.ck_bert else [])
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.cfg_file, opts, args.amp or "")
    return WebApp(predictor, limits, Path(args.checkpoint).name).make_server(args.host, args.port)


def serve(argv: Sequence[str]) -> None:
    """Build the server from the command line and serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    server = build(argv)
    host, port = server.server_address[:2]
    logger.info("serving on http://%s:%d/ (Ctrl-C stops)", host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: a mistake in the flags, checkpoint, config or address ends with one line and status 2."""
    return run_cli("python -m tools.web", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
