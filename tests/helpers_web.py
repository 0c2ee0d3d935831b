"""tools.web served in a thread of the test process, and HTTP answers read off a raw socket."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from tools import web


def serving(predictor: Any, limits: web.Limits | None = None) -> tuple[Any, tuple[str, int]]:
    """A server for ``predictor`` on a free port, serving in a thread: (server, its address)."""
    server = web.WebApp(predictor, limits or web.Limits()).make_server(port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, ("127.0.0.1", server.server_address[1])


def until_closed(sock: socket.socket) -> bytes:
    """Every byte the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any], float]:
    """One HTTP answer, read until the server closes: its status, JSON body and the seconds it took."""
    start = time.monotonic()
    head, _, body = until_closed(sock).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), time.monotonic() - start
