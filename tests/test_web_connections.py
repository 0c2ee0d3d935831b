"""tools.web's connections, without a browser: HTTP/1.1 as clients use it (kept alive, ``Expect: 100-continue``,
an error closing its connection), and how a connection and the server end: Ctrl-C on the real command,
``server_close`` while a prediction runs, an upload comes in and a connection waits, and a client that goes away
before its answer. Each ends in one line, with nothing cut short that was already being predicted."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers_process import terminal_job
from tests.helpers_train import wait_for
from tests.helpers_web import read_answer, serving, until_closed
from tests.test_demo import first_image, make_tiny_run, one_thread  # noqa: F401 (an autouse fixture)
from tests.test_web import decode_data_url
from tools import demo, web

ROOT = Path(__file__).resolve().parents[1]
PREDICT = "POST /predict?name=photo.png&texts=the%20red%20circle HTTP/1.1\r\n"
HEAD = PREDICT + "Content-Length: {}\r\nConnection: close\r\n\r\n"  # answered, then closed


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """The tiny checkpoint, its model loaded (``predictor``) and a photo to upload (``photo``: PNG bytes)."""
    run = make_tiny_run(tmp_path_factory.mktemp("web_stop_run"))
    buffer = io.BytesIO()
    Image.fromarray(first_image(run["cfg"])).save(buffer, "PNG")
    return {**run, "predictor": demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu"),
            "photo": buffer.getvalue()}  # fmt: skip


class Gated:
    """A predictor whose ``predict`` says that it started (``entered``) and waits for ``release``: the test chooses
    what happens while a prediction is in progress."""

    def __init__(self, inner: demo.Predictor) -> None:
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict(self, image: np.ndarray, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60)
        return self.inner.predict(image, texts)


def test_one_connection_carries_requests_until_an_error_closes_it(run):
    """Kept alive: the page, then two predictions on one connection, the second sent as curl sends a large file
    (``Expect: 100-continue``: the server invites the body at once instead of leaving curl to wait 1 s). An error
    answer closes the connection, whose request body may be unread (a chunked upload: 411, nothing read)."""
    photo = run["photo"]
    server, address = serving(run["predictor"])
    try:
        connection = http.client.HTTPConnection(*address, timeout=60)
        connection.request("GET", "/")
        assert connection.getresponse().read().startswith(b"<!doctype html>")
        sock = connection.sock
        connection.request("POST", "/predict?name=photo.png&texts=a", body=photo)
        first = connection.getresponse()
        assert first.status == 200 and json.load(first)["results"][0]["text"] == "a"
        assert connection.sock is sock  # the same connection
        sock.sendall(f"{PREDICT}Content-Length: {len(photo)}\r\nExpect: 100-continue\r\n\r\n".encode())
        sock.settimeout(10)  # (an HTTP/1.0 server never sends it: curl waits 1 s, then sends the body anyway)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.settimeout(60)
        sock.sendall(photo)
        second = http.client.HTTPResponse(sock)
        second.begin()
        assert second.status == 200 and json.load(second)["results"][0]["text"] == "the red circle"

        sock.sendall(f"{PREDICT}Transfer-Encoding: chunked\r\n\r\n5\r\nnever\r\n0\r\n\r\n".encode())
        refused = http.client.HTTPResponse(sock)
        refused.begin()
        error = "send the image with a Content-Length header (a chunked upload is not read)"
        assert (refused.status, refused.getheader("Connection"), json.load(refused)) == (411, "close", {"error": error})
        assert sock.recv(1) == b""  # closed by the server
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


def test_an_upload_refused_by_its_headers_is_answered_before_it_is_sent(run):
    """With ``Expect: 100-continue`` (curl, for files over 1 MB) a file announced over the byte limit, or chunked,
    is answered at once, once, without inviting its body: nothing of the 30 MB is sent."""
    server, address = serving(run["predictor"])
    over = "'photo.png' has 30.0 MB, more than the 20 MB this page accepts"
    chunked = "send the image with a Content-Length header (a chunked upload is not read)"
    try:
        for header, status, error in [("Content-Length: 30000000", 413, over),
                                      ("Transfer-Encoding: chunked", 411, chunked)]:  # fmt: skip
            with socket.create_connection(address, timeout=10) as sock:  # (a 100 would leave it waiting: 10 s)
                sock.sendall(f"{PREDICT}{header}\r\nExpect: 100-continue\r\n\r\n".encode())
                received = until_closed(sock)
            assert received.startswith(f"HTTP/1.1 {status} ".encode()) and received.count(b"HTTP/1.1 ") == 1
            assert b"\r\nConnection: close\r\n" in received
            assert json.loads(received.partition(b"\r\n\r\n")[2]) == {"error": error}
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_kept_alive_closes_quietly_when_idle(run, caplog):
    """A browser keeps its connection after an answer; silent for ``idle_seconds``, it is closed without a line in
    the log (it is no error)."""
    caplog.set_level(logging.INFO, logger="tools.web")
    server, address = serving(run["predictor"], web.Limits(idle_seconds=0.3))
    try:
        connection = http.client.HTTPConnection(*address, timeout=60)
        connection.request("GET", "/")
        assert connection.getresponse().read().startswith(b"<!doctype html>")
        start = time.monotonic()
        assert connection.sock.recv(1) == b"" and 0.2 < time.monotonic() - start < 10
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [r.getMessage()[:30] for r in caplog.records] == ['127.0.0.1 "GET / HTTP/1.1" 200']


def test_a_malformed_request_is_answered_400_and_logged_with_its_reason(run, caplog):
    """http.server's own refusals (here a request line that is no HTTP) go through the server's log: the client's
    address, the code and http.server's reason, then the request line as every request's."""
    caplog.set_level(logging.INFO, logger="tools.web")
    server, address = serving(run["predictor"])
    try:
        with socket.create_connection(address, timeout=60) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            received = until_closed(sock)
    finally:
        server.shutdown()
        server.server_close()
    assert b"<p>Error code: 400</p>" in received  # (a request line without a version gets no status line back)
    assert [r.getMessage() for r in caplog.records] == [
        "127.0.0.1 code 400, message Bad request syntax ('NONSENSE')", '127.0.0.1 "NONSENSE" 400 -'
    ]


def test_close_answers_the_prediction_in_progress_and_ends_the_rest(run):
    """``server_close`` (what Ctrl-C runs): a connection without a request is closed at once, an upload still
    coming in is answered 503, and the call returns only once the prediction in progress has been answered."""
    predictor, photo = run["predictor"], run["photo"]
    gated = Gated(predictor)
    server, address = serving(gated)
    results: dict[str, Any] = {}
    sockets = [socket.create_connection(address, timeout=60) for _ in range(3)]
    predicting, idle, uploading = sockets
    try:
        predicting.sendall(HEAD.format(len(photo)).encode() + photo)
        reader = threading.Thread(target=lambda: results.setdefault("predicting", read_answer(predicting)[:2]))
        reader.start()
        assert gated.entered.wait(60)
        uploading.sendall(HEAD.format(len(photo)).encode() + photo[:100])
        wait_for(lambda: server.open_connections == 3, "the server to accept the three connections", timeout=60)

        server.shutdown()
        closing = threading.Thread(target=server.server_close)
        closing.start()
        assert idle.recv(1) == b""
        cut = f"the server stopped during the upload (100 of {len(photo)} bytes read)"
        assert read_answer(uploading)[:2] == (503, {"error": cut})
        closing.join(0.5)
        assert closing.is_alive() and reader.is_alive()  # still predicting
        gated.release.set()
        closing.join(60)
        reader.join(60)
        status, body = results["predicting"]
        expected = predictor.predict(np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")), ["the red circle"])
        assert status == 200 and np.array_equal(decode_data_url(body["results"][0]["mask"]) > 0, expected[0])
        assert not closing.is_alive() and server.open_connections == 0
    finally:
        gated.release.set()  # a failure above must not leave the server's thread waiting
        for sock in sockets:
            sock.close()


def test_close_refuses_the_uploads_queued_behind_the_prediction_in_progress(run, caplog):
    """Predictions run one at a time: an upload that arrives during one waits for it (``queued``). Once Ctrl-C has
    begun to stop the server, such an upload is answered 503 when its turn comes, without predicting, so that
    Ctrl-C waits for one prediction and not for a whole queue; the one in progress is still answered."""
    caplog.set_level(logging.INFO, logger="tools.web")
    predictor, photo = run["predictor"], run["photo"]
    gated = Gated(predictor)
    server, address = serving(gated)
    results: dict[str, Any] = {}
    sockets = [socket.create_connection(address, timeout=60) for _ in range(2)]
    first, queued = sockets
    try:
        first.sendall(HEAD.format(len(photo)).encode() + photo)
        reader = threading.Thread(target=lambda: results.setdefault("first", read_answer(first)[:2]))
        reader.start()
        assert gated.entered.wait(60)
        queued.sendall(HEAD.format(len(photo)).encode() + photo)
        wait_for(lambda: server.app.queued == 1, "the second upload to wait for the first prediction", timeout=60)

        server.shutdown()
        closing = threading.Thread(target=server.server_close)
        closing.start()
        wait_for(lambda: any("stopping" in r.getMessage() for r in caplog.records), "the stopping line", timeout=60)
        gated.release.set()
        refused = "the server stopped before this upload's turn (not predicted)"
        assert read_answer(queued)[:2] == (503, {"error": refused})
        reader.join(60)
        closing.join(60)
        assert results["first"][0] == 200 and gated.calls == 1 and server.app.queued == 0
        assert not closing.is_alive() and server.open_connections == 0
        stopping = [r.getMessage() for r in caplog.records if "stopping" in r.getMessage()]
        assert stopping == ["stopping: waiting for 2 open connection(s); a prediction in progress is answered first, "
                            "1 queued refused"]  # fmt: skip
    finally:
        gated.release.set()
        for sock in sockets:
            sock.close()


def test_a_client_gone_before_its_answer_is_one_line(run, caplog, capfd):
    """A closed tab or a reload while its prediction runs: one INFO line, no traceback, not logged as a failed
    prediction, and the server keeps serving."""
    caplog.set_level(logging.INFO, logger="tools.web")
    predictor, photo = run["predictor"], run["photo"]
    gated = Gated(predictor)
    server, address = serving(gated)
    try:
        sock = socket.create_connection(address, timeout=60)
        sock.sendall(HEAD.format(len(photo)).encode() + photo)
        assert gated.entered.wait(60)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, as a killed tab
        sock.close()
        gated.release.set()
        wait_for(lambda: server.open_connections == 0, "the connection to be closed", timeout=60)
        gone = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
        assert re.fullmatch(r"127\.0\.0\.1 went away before its answer \((BrokenPipe|ConnectionReset)Error\)", gone[0])
        assert len(gone) == 1 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "Traceback" not in capfd.readouterr().err
        with socket.create_connection(address, timeout=60) as again:
            again.sendall(HEAD.format(len(photo)).encode() + photo)
            assert read_answer(again)[0] == 200
    finally:
        gated.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), TimeoutError("timed out")])
def test_a_client_that_stops_reading_is_one_line_and_a_bug_keeps_its_traceback(run, error, caplog, capfd):
    """What ends a connection's thread: a client gone, or silent while its answer is written (the socket's timeout),
    is one INFO line; any other exception is a bug and keeps socketserver's traceback."""
    caplog.set_level(logging.INFO, logger="tools.web")
    server = web.WebApp(run["predictor"]).make_server(port=0)
    try:
        for raised in (error, KeyError("a bug")):
            try:
                raise raised
            except Exception:
                server.handle_error(None, ("127.0.0.1", 5000))
    finally:
        server.server_close()
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"127.0.0.1 went away before its answer ({type(error).__name__})"]
    err = capfd.readouterr().err
    assert err.count("Traceback") == 1 and "KeyError: 'a bug'" in err and type(error).__name__ not in err



def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_address_is_served(run):
    """``--host ::1``: an IPv6 socket (an IPv4 one cannot bind it), the page and a prediction answered there, its
    address in brackets as URLs write it; an address that is not this machine's says so in one line, bracketed."""
    server = web.WebApp(run["predictor"]).make_server("::1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert server.url == f"http://[::1]:{port}/"
        with urllib.request.urlopen(server.url, timeout=30) as page:
            assert page.status == 200 and page.read() == server.app.page
        with socket.create_connection(("::1", port), timeout=60) as client:
            client.sendall(HEAD.format(len(run["photo"])).encode() + run["photo"])
            status, answer, _ = read_answer(client)
        assert status == 200 and [r["text"] for r in answer["results"]] == ["the red circle"]
    finally:
        server.shutdown()
        server.server_close()
    # an address for documentation, never a machine's
    with pytest.raises(ValueError, match=r"^cannot listen on \[2001:db8::1\]:0: .+ \(choose another --port or"):
        web.WebApp(run["predictor"]).make_server("2001:db8::1", 0)

def test_the_command_serves_until_ctrl_c(run):
    """``python -m tools.web`` as a user starts it: an INFO line with the address it listens on (port 0: the one it
    was given) after the model's, the page served there, and Ctrl-C ending it with status 0 and no traceback, soon
    even with a connection kept alive (its thread would otherwise wait out the 60 s idle limit). Each connection's
    thread is joined: a daemon thread freeing the model's tensors while the interpreter finalizes used to abort
    the process now and then (status -6, "terminate called without an active exception"); with daemon threads
    this test aborts every time (3 of 3), the kept-alive connection's thread ending during finalization."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tools.web", "--checkpoint", str(run["checkpoint"]), "--device", "cpu", "--port", "0"]
    with terminal_job(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
        reader.start()
        shown = [lines.get(timeout=60)]  # the model's INFO lines, then the address
        while "serving on" not in shown[-1]:
            shown.append(lines.get(timeout=60))
        ready = re.fullmatch(r"INFO serving on http://127\.0\.0\.1:(\d+)/ \(Ctrl-C stops\)\n", shown[-1])
        assert ready, shown
        kept = http.client.HTTPConnection("127.0.0.1", int(ready[1]), timeout=60)  # as a browser's, kept alive
        kept.request("GET", "/")
        assert kept.getresponse().read().startswith(b"<!doctype html>")
        with urllib.request.urlopen(f"http://127.0.0.1:{ready[1]}/", timeout=30) as page:  # closed after it
            assert page.status == 200 and b'<code id="model">' in page.read()
        proc.send_signal(signal.SIGINT)  # at once: the second answer's thread may still be ending
        assert proc.wait(timeout=30) == 0
        assert kept.sock.recv(1) == b""
        kept.close()
    reader.join(30)  # what is left, to the end of stderr
    rest = "".join(lines.queue)
    assert re.fullmatch(r'(INFO 127\.0\.0\.1 "GET / HTTP/1\.1" 200 -\n){2}INFO stopping: waiting for [12] open '
                        r"connection\(s\); a prediction in progress is answered first\n", rest), rest  # fmt: skip


# The command with a prediction that takes as long as the test wants (PREDICT_SECONDS), saying when it starts. Once
# the file SIGINT_HERE names exists, the predicting thread sends SIGINT to itself: as the kernel may hand a Ctrl-C
# to any thread of the process.
SLOW_WEB = """
import os, signal, sys, threading, time
from tools import demo, web
predict = demo.Predictor.predict
def slow(self, *args):
    print("predicting", file=sys.stderr, flush=True)
    end, trigger = time.monotonic() + float(os.environ["PREDICT_SECONDS"]), os.environ.get("SIGINT_HERE", "")
    while time.monotonic() < end:
        if trigger and os.path.exists(trigger):
            os.remove(trigger)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        time.sleep(0.05)
    return predict(self, *args)
demo.Predictor.predict = slow
sys.exit(web.main())
"""


@pytest.mark.parametrize("receiver", ["process", "predicting thread"])
def test_a_second_ctrl_c_ends_the_command_without_waiting_for_the_prediction(run, tmp_path, receiver):
    """Ctrl-C while a prediction runs waits for it (the test above); a second Ctrl-C ends the command at once with
    status 130 and one line, the client's connection closed without an answer, and no abort or traceback (the
    thread still predicting is not waited for and the interpreter does not finalize around it). Also when the
    kernel hands that Ctrl-C to the predicting thread: the main thread, waiting for it, must still see it."""
    trigger = tmp_path / "sigint_here"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PREDICT_SECONDS": "120",
           "SIGINT_HERE": str(trigger)}  # fmt: skip
    argv = [sys.executable, "-c", SLOW_WEB, "--checkpoint", str(run["checkpoint"]), "--device", "cpu", "--port", "0"]
    with terminal_job(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
        reader.start()
        shown = [lines.get(timeout=60)]
        while "serving on" not in shown[-1]:
            shown.append(lines.get(timeout=60))
        port = int(re.search(r":(\d+)/", shown[-1])[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            client.sendall(HEAD.format(len(run["photo"])).encode() + run["photo"])
            assert lines.get(timeout=60) == "predicting\n"
            proc.send_signal(signal.SIGINT)
            assert lines.get(timeout=60).startswith("INFO stopping: waiting for 1 open connection(s)")
            start = time.monotonic()
            if receiver == "process":
                proc.send_signal(signal.SIGINT)
            else:
                trigger.touch()
            assert proc.wait(timeout=30) == 130 and time.monotonic() - start < 10
            assert until_closed(client) == b""
    reader.join(30)
    rest = "".join(lines.queue)
    assert rest == ("python -m tools.web: interrupted (Ctrl-C) again: stopped without answering the prediction in "
                    "progress\n"), rest  # fmt: skip
