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
  ``Limits.idle_seconds``, 411 for a chunked one, 503 for one cut short or not yet predicted when the server
  stops). A bad upload never stops the server; an error answer closes its connection.

Predictions run one at a time (a lock): a burst of uploads queues instead of multiplying the memory. What one
upload is checked for and answered is ``tools/web_upload.py``; this file is the HTTP server and its command line.
Ctrl-C answers the prediction in progress before the command ends (``_Server.server_close``), refuses the
uploads queued behind it (503), and a second Ctrl-C ends the command at once without answering it.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from args import refuse_set_twice
from engine.preemption import EXIT_INTERRUPTED

from .cli import cli_parser, run_cli
from .demo import Predictor, add_amp_argument
from .web_upload import Limits, UploadError, check_bytes, segment, shown

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("web") / "index.html"
DRAIN_CHUNK = 1 << 20
DEFAULT_PORT = 7860  # the page's address in the README: http://127.0.0.1:7860/


# ----------------------------------------------------------------------------- the server
class _Handler(BaseHTTPRequestHandler):
    """Serves the page and ``/predict`` for ``self.server.app`` (a ``WebApp``)."""

    server: _Server
    # HTTP/1.1: connections kept alive, and an upload sent with `Expect: 100-continue` invited at once (curl waits
    # 1 s for that before sending more than 1 MB). Every error answer closes its connection (``_send``).
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.app.limits.idle_seconds  # the socket's timeout, set by the base class's setup
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        if not format.startswith("Request timed out"):  # a kept-alive connection closing after idle_seconds
            self.log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status >= 400:  # its request's body may be unread: the connection cannot carry another request
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, answer: dict[str, Any]) -> None:
        self._send(status, json.dumps(answer).encode("utf-8"), "application/json")

    def _refuse(self, error: UploadError) -> None:
        self._json(error.status, {"error": str(error)})

    def _not_found(self) -> None:
        self._send(404, b"not found", "text/plain")

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        if urlsplit(self.path).path in ("/", "/index.html"):
            self._send(200, self.server.app.page, "text/html; charset=utf-8")
        else:
            self._not_found()

    def _announced(self) -> tuple[str, str, int, UploadError | None] | None:
        """A POST's file name, text and announced length, and its refusal by size (413, else None); None once a
        request that cannot be read (another path, a chunked upload, a bad length) has been answered."""
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._not_found()
            return None
        query = parse_qs(url.query, keep_blank_values=True)
        name, text = query.get("name", [""])[0], query.get("texts", [""])[0]
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._json(411, {"error": "send the image with a Content-Length header (a chunked upload is not read)"})
            return None
        # digits only, and one value (int() would take "+5" or "1_0"; two lengths are ambiguous, RFC 9112)
        lengths = self.headers.get_all("Content-Length") or ["0"]
        length = int(lengths[0]) if len(set(lengths)) == 1 and re.fullmatch(r"[0-9]+", lengths[0]) else -1
        if length < 0:
            self._json(400, {"error": "bad Content-Length header"})
            return None
        try:
            check_bytes(length, name, self.server.app.limits)
        except UploadError as e:
            return name, text, length, e
        return name, text, length, None

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: the body is invited only if it will be read; an upload refused by its headers
        alone (over the size limit included) is answered at once and never sent."""
        if self.command == "POST":
            announced = self._announced()
            if announced is None:
                return False
            *_, too_big = announced
            if too_big is not None:
                self._refuse(too_big)
                return False
        return super().handle_expect_100()

    def do_POST(self) -> None:  # noqa: N802
        announced = self._announced()
        if announced is None:
            return
        name, text, length, too_big = announced
        app = self.server.app
        try:
            if too_big is not None:
                self._drain(length)  # browsers show an answer only once their upload went through
                self._refuse(too_big)
                return
            data = self.rfile.read(length)
        except TimeoutError:
            idle = app.limits.idle_seconds
            self._json(408, {"error": f"the upload stopped: {length} bytes announced, nothing more for {idle:g} s"})
            return
        if len(data) < length and self.server.closing:
            self._json(503, {"error": f"the server stopped during the upload ({len(data)} of {length} bytes read)"})
            return
        try:
            status, answer = 200, app.segment(data, name, text, stopping=lambda: self.server.closing)
        except UploadError as e:
            status, answer = e.status, {"error": str(e)}
        except Exception as e:  # a bug, not the user's: logged with its traceback, the server keeps serving
            logger.exception("predict failed for %s", shown(name))
            status, answer = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        self._json(status, answer)  # (outside: a client gone meanwhile is not a failed prediction)

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(DRAIN_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)


def _is_ipv6(host: str) -> bool:
    return ":" in host  # an IPv6 address has colons; a host name or an IPv4 address never has one


def authority(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:7860``), as URLs write it."""
    return f"[{host}]:{port}" if _is_ipv6(host) else f"{host}:{port}"


class _Server(ThreadingHTTPServer):
    """One thread per connection, none of them a daemon: ``server_close()`` ends the connections that wait for a
    request or an upload and waits for the others, so that a prediction in progress is answered before the command
    ends. A daemon thread still running while the interpreter finalizes (Ctrl-C just after an answer) can free the
    model's last tensors there; taking the GIL back then ends the thread inside torch's C++ code, which aborts the
    process ("terminate called without an active exception", docs/web.md)."""

    daemon_threads = False
    app: WebApp

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if _is_ipv6(address[0]):  # "::1", or "::" (every interface), needs an IPv6 socket
            self.address_family = socket.AF_INET6
        self.closing = False
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)  # (which calls server_close when it cannot bind)

    @property
    def url(self) -> str:
        """The page's address, as a browser takes it."""
        return f"http://{authority(*self.server_address[:2])}/"

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening; reading ends on every open connection (an idle one closes, an upload is cut short and
        answered 503); wait for the rest, which are predicting and will answer."""
        self.closing = True
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):  # closed meanwhile
                connection.shutdown(socket.SHUT_RD)
        if connections:
            app = getattr(self, "app", None)  # (none when binding failed)
            queued = app.queued if app is not None else 0
            logger.info("stopping: waiting for %d open connection(s); a prediction in progress is answered first%s",
                        len(connections), f", {queued} queued refused" if queued else "")  # fmt: skip
        super(ThreadingMixIn, self).server_close()  # the listening socket; ThreadingMixIn's would also join:
        # the kernel may hand a Ctrl-C to any thread (a connection's, OpenMP's), and then only the main thread's next
        # bytecode raises it: joined in steps of 0.1 s, a second Ctrl-C ends the command at once (_exit_now)
        for thread in list(vars(self).get("_threads", ())):  # (set by the first connection; none before it)
            while thread.is_alive():
                thread.join(0.1)

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        with self._open_lock:
            return len(self._open)

    def handle_error(self, request: socket.socket, client_address: Any) -> None:
        """A client that went away (a closed tab, a reload) or stopped reading its answer for ``idle_seconds`` is one
        line; anything else is a bug, with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.info("%s went away before its answer (%s)", client_address[0], type(error).__name__)
        else:
            super().handle_error(request, client_address)


class WebApp:
    """A Predictor behind the page; ``make_server()`` gives the HTTP server to ``serve_forever()`` (the command line
    in the foreground, the tests in a thread)."""

    def __init__(self, predictor: Predictor, limits: Limits = Limits(), model_name: str = "") -> None:
        self.predictor, self.limits = predictor, limits
        self._lock = threading.Lock()
        self.queued = 0  # uploads read and waiting for the prediction in progress (under _count_lock)
        self._count_lock = threading.Lock()
        model = f"{model_name or 'LAVT'} {predictor.describe()}"
        self.page = (
            PAGE.read_text(encoding="utf-8")
            .replace("{{MODEL}}", html.escape(model))
            .replace("{{LIMITS}}", html.escape(limits.describe()))
            .encode("utf-8")
        )

    def segment(
        self, data: bytes, name: str, text: str, stopping: Callable[[], bool] = lambda: False
    ) -> dict[str, Any]:
        """The answer to one upload, predicted after those before it; UploadError 503 instead if ``stopping()``
        says, once its turn comes, that the server is stopping: Ctrl-C waits for one prediction, not a queue."""
        with self._count_lock:
            self.queued += 1
        with self._lock:
            with self._count_lock:
                self.queued -= 1
            if stopping():
                raise UploadError("the server stopped before this upload's turn (not predicted)", status=503)
            return segment(self.predictor, data, name, text, self.limits)

    def make_server(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> _Server:
        """A bound HTTP server (port 0: a free port; the chosen one is ``server.server_address[1]``).

        Raises ValueError (one line) when the address cannot be had (a port in use, an unknown host)."""
        try:
            server = _Server((host, port), _Handler)
        except (OSError, OverflowError) as e:  # (OverflowError: a port outside 0-65535)
            raise ValueError(
                f"cannot listen on {authority(host, port)}: {getattr(e, 'strerror', None) or e} "
                "(choose another --port or --host)"
            ) from e
        server.app = self
        return server


# ----------------------------------------------------------------------------- command line
def get_parser() -> argparse.ArgumentParser:
    p = cli_parser(
        "python -m tools.web", "A web page that segments what each typed expression refers to in an uploaded image."
    )
    p.add_argument("--checkpoint", required=True, help="LAVT checkpoint (this project's or an official release)")
    p.add_argument("--cfg_file", help="config for checkpoints without a stored one (official files)")
    p.add_argument("--ck_bert", help='the text encoder: a local BERT folder or "minilm-l6"')
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    add_amp_argument(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0: every interface; IPv6 too: ::1, ::)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0: any free one)")
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
    for flag, millions in (("--max_megabytes", args.max_megabytes), ("--max_megapixels", args.max_megapixels)):
        if not (math.isfinite(millions) and round(millions * 1e6) >= 1):  # (nan and inf cannot be rounded)
            raise ValueError(f"{flag} must be a finite number > 0, got {millions}")
    if args.max_expressions < 1:
        raise ValueError(f"--max_expressions must be >= 1, got {args.max_expressions}")
    if not args.idle_seconds > 0:  # (0 would make every socket non-blocking, nan never times out)
        raise ValueError(f"--idle_seconds must be positive, got {args.idle_seconds}")
    if not 0 <= args.port <= 65535:  # (the socket's OverflowError would be a traceback)
        raise ValueError(f"--port must be 0-65535 (0: any free one), got {args.port}")
    limits = Limits(
        round(args.max_megabytes * 1e6), round(args.max_megapixels * 1e6), args.max_expressions,
        idle_seconds=args.idle_seconds,
    )  # fmt: skip
    refuse_set_twice({"MODEL.TEXT.ENCODER": "--ck_bert"} if args.ck_bert else {}, args.opts)
    opts = list(args.opts) + (["MODEL.TEXT.ENCODER", args.ck_bert] if args.ck_bert else [])
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.cfg_file, opts, args.amp or "")
    return WebApp(predictor, limits, Path(args.checkpoint).name).make_server(args.host, args.port)


def serve(argv: Sequence[str]) -> None:
    """Build the server from the command line and serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    server = build(argv)
    logger.info("serving on %s (Ctrl-C stops)", server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            server.server_close()
        except KeyboardInterrupt:  # a second Ctrl-C while a prediction finishes: end now, without answering it
            _exit_now("python -m tools.web: interrupted (Ctrl-C) again: stopped without answering the prediction "
                      "in progress")  # fmt: skip


def _exit_now(line: str) -> NoReturn:
    """``line`` on stderr and status 130 at once: a thread still predicting cannot be stopped, and one still
    running while the interpreter finalizes can abort it (``_Server``), so the process ends without finalizing."""
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: a mistake in the flags, checkpoint, config or address ends with one line and status 2."""
    return run_cli("python -m tools.web", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
