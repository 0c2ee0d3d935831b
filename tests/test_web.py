"""tools.web served on a free port and used in a real headless browser (Debian's chromium driven by Playwright).

The masks the page lets one download must equal ``Predictor.predict`` on the same image and text, computed here
from its own load of the checkpoint; the overlays shown must be ``visualize.overlay_mask`` of them; every bad
upload must show its one-line message. One server and one browser serve every case.

Without chromium the browser tests are skipped, unless LAVT_REQUIRE_BROWSER=1 (set by .ci/run, which installs
chromium) makes them fail: CI never passes with the page untested. The HTTP test runs everywhere.
LAVT_SCREENSHOT=docs/web_page.png also writes the page's screenshot there (the one in the docs).
"""

from __future__ import annotations

import base64
import html
import http.client
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers_web import read_answer, serving
from tests.test_demo import MAX_TOKENS, SIZE, first_image, make_tiny_run, one_thread  # noqa: F401 (an autouse fixture)
from tools import demo, web, web_upload
from tools import visualize as vis

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags the machine notes give for a closed network: no background connections, no sandbox as root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
LIMIT_FLAGS = ["--max_megabytes", "0.2", "--max_megapixels", "0.25", "--max_expressions", "3"]
TEXTS = ["the red circle", "big star on the left"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    return make_tiny_run(tmp_path_factory.mktemp("web_run"))


@pytest.fixture(scope="module")
def predictor(run) -> demo.Predictor:
    """The reference: the checkpoint loaded again, apart from the server's own load."""
    return demo.Predictor.from_checkpoint(run["checkpoint"], device="cpu")


@pytest.fixture(scope="module")
def files(run, tmp_path_factory) -> dict[str, Path]:
    """Uploads: a good PNG, a JPEG stored sideways with EXIF orientation 6, and one file per way to get it wrong."""
    folder = tmp_path_factory.mktemp("uploads")
    rgb = first_image(run["cfg"])[:, :-9]  # not square, so that a rotation shows in the mask's shape
    paths = {key: folder / name for key, name in [("photo", "photo.png"), ("exif", "sideways.jpg"),
             ("text", "notes.txt"), ("heavy", "noise.png"), ("huge", "huge.png"), ("broken", "cut.png")]}  # fmt: skip
    Image.fromarray(rgb).save(paths["photo"])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; shown upright after a quarter turn clockwise
    Image.fromarray(rgb).save(paths["exif"], quality=95, exif=exif)
    paths["text"].write_text("the red circle\n")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)  # 90 kpx, ~270 kB
    Image.fromarray(noise).save(paths["heavy"])
    Image.new("RGB", (600, 500), "navy").save(paths["huge"])  # 0.3 megapixels, a few kB
    paths["broken"].write_bytes(paths["photo"].read_bytes()[: paths["photo"].stat().st_size // 2])
    return paths


@pytest.fixture(scope="module")
def official(run, predictor, tmp_path_factory) -> Path:
    """The tiny model saved in the authors' layout (``lavt``: weights and training args, no config)."""
    from models import to_official

    path = tmp_path_factory.mktemp("official") / "lavt.pth"
    torch.save(to_official(predictor.model, "lavt", img_size=SIZE, dataset="synthetic", splitBy="unc"), path)
    return path


@pytest.fixture(scope="module")
def url(run, official) -> str:
    """The page, served by ``python -m tools.web``'s own startup (``build``) on a free port, in a thread, from the
    official-format file (its architecture read from its weights): the reference ``predictor`` opens the project's
    own checkpoint of the same model."""
    encoder = run["cfg"].MODEL.TEXT.ENCODER
    argv = ["--checkpoint", str(official), "--ck_bert", encoder, "--opts", "MODEL.TEXT.MAX_TOKENS", str(MAX_TOKENS)]
    server = web.build([*argv, "--device", "cpu", "--port", "0", *LIMIT_FLAGS])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(url):
    if CHROMIUM is None:
        message = "no chromium: `apt-get install chromium` (.ci/run installs it)"
        if os.environ.get("LAVT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(accept_downloads=True, viewport={"width": 1000, "height": 640})
        page.goto(url)
        yield page
        browser.close()


def submit(page: Any, upload: Path | None, text: str) -> None:
    """Choose the file (or none), type the text, press Segment and wait for the answer to be shown."""
    page.set_input_files("#image", [] if upload is None else upload)
    page.fill("#texts", text)
    page.evaluate("delete document.body.dataset.state")
    page.click("#submit")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)


def decode_data_url(url: str) -> np.ndarray:
    head, _, payload = url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))))


def upright(path: Path) -> np.ndarray:
    """The stored pixels of an orientation-6 file turned a quarter clockwise, by hand (not through PIL's EXIF)."""
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6
        return np.ascontiguousarray(np.rot90(np.asarray(im.convert("RGB")), k=-1))


BAD = {  # case: (upload, text, what the page must say)
    "not-an-image": ("text", "the red circle", "'notes.txt' is not an image this page can read"),
    "too-many-bytes": ("heavy", "the red circle", "'noise.png' has 0.3 MB, more than the 0.2 MB this page accepts"),
    "too-many-pixels": ("huge", "the red circle", "'huge.png' is 600x500 pixels (0.3 megapixels), more than the 0.25"),
    "damaged": ("broken", "the red circle", "'cut.png' is damaged and cannot be decoded"),
    "no-file": (None, "the red circle", "no image: choose an image file first"),
    "no-text": ("photo", " \n\n ", "the expression is empty"),
    "no-known-word": ("photo", "the red circle\n\u2063\u2063", "holds no word the tokenizer knows"),
    "too-many-expressions": ("photo", "a\nb\nc\nd", "4 expressions, more than the 3 this page segments at once"),
}


@pytest.mark.parametrize("upload, text, message", BAD.values(), ids=BAD.keys())
def test_bad_upload_shows_its_message(page, files, upload, text, message):
    submit(page, files[upload] if upload else None, text)
    shown = page.inner_text("#error")
    assert message in shown and "\n" not in shown
    assert page.locator("figure.result").count() == 0


def test_page_shows_and_downloads_the_models_masks(page, files, predictor, tmp_path):
    """After the bad uploads above (same page, same server): the masks of two expressions."""
    submit(page, files["photo"], "\n".join(TEXTS) + "\n\n")
    assert page.inner_text("#error") == ""
    assert page.inner_text("#model") == f"lavt.pth on cpu, input {SIZE}x{SIZE}, float32"  # the size read from the file
    rgb = np.asarray(Image.open(files["photo"]).convert("RGB"))
    expected = predictor.predict(rgb, TEXTS)  # [2, H, W] bool
    assert 0.05 < expected[0].mean() < 0.95, "calibrated tiny model: both classes present"
    figures = page.locator("figure.result")
    assert figures.count() == len(TEXTS)
    for e, text in enumerate(TEXTS):
        figure = figures.nth(e)
        assert figure.locator(".text").inner_text().strip().startswith(f"{text} ({100 * expected[e].mean():.1f}% of")
        with page.expect_download() as download:
            figure.locator("a.mask").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name == f"photo_mask_{e}.png"
        mask = np.asarray(Image.open(saved))
        assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 0, expected[e])
        overlay = figure.locator("img.overlay")
        assert overlay.evaluate("img => img.complete ? img.naturalWidth : -1") == rgb.shape[1]  # decoded, shown
        shown = decode_data_url(overlay.get_attribute("src"))
        assert np.array_equal(shown, vis.overlay_mask(rgb, expected[e], vis.PALETTE[e]))
        swatch = figure.locator(".swatch").evaluate("s => getComputedStyle(s).backgroundColor")
        assert swatch == "rgb({}, {}, {})".format(*vis.PALETTE[e])  # the caption's colour is the overlay's
    targets = [tmp_path / "web_page.png"] + (
        [Path(os.environ["LAVT_SCREENSHOT"])] if "LAVT_SCREENSHOT" in os.environ else []
    )
    for target in targets:
        page.screenshot(path=target, full_page=True)
        assert Image.open(target).size[0] == 1000


def test_exif_orientation_is_applied(page, files, predictor, tmp_path):
    submit(page, files["exif"], TEXTS[0])
    assert page.inner_text("#error") == ""
    image = upright(files["exif"])
    with page.expect_download() as download:
        page.locator("figure.result a.mask").click()
    download.value.save_as(tmp_path / "m.png")
    mask = np.asarray(Image.open(tmp_path / "m.png")) > 0
    assert mask.shape == image.shape[:2] and image.shape[0] > image.shape[1]  # stored landscape, shown portrait
    assert np.array_equal(mask, predictor.predict(image, TEXTS[:1])[0])


def post(url: str, data: bytes, **query: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url + "predict?" + urllib.parse.urlencode(query), data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"] == "application/json"
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        return e.code, json.load(e)


def test_predict_endpoint_without_a_browser(url, files, predictor):
    status, answer = post(url, files["photo"].read_bytes(), name="photo.png", texts="\n".join(TEXTS))
    assert status == 200 and [r["text"] for r in answer["results"]] == TEXTS
    expected = predictor.predict(np.asarray(Image.open(files["photo"]).convert("RGB")), TEXTS)
    for r, m in zip(answer["results"], expected):
        assert np.array_equal(decode_data_url(r["mask"]) > 0, m) and r["warning"] == ""
    h, w = expected.shape[1:]
    assert answer["summary"] == f"{len(TEXTS)} mask(s) of {w}x{h} pixels"
    assert post(url, files["heavy"].read_bytes(), name="noise.png", texts="a")[0] == 413
    status, answer = post(url, b"GIF89a nonsense", name="x.gif", texts="the red circle")
    assert status == 400 and answer == {"error": "'x.gif' is not an image this page can read (PNG, JPEG, WebP, "
                                                 "BMP, TIFF, ...): UnidentifiedImageError"}  # fmt: skip
    assert post(url, files["photo"].read_bytes(), texts="the red circle")[0] == 200  # no file name: none needed
    status, answer = post(url, files["heavy"].read_bytes(), texts="a")  # nameless, refused: "the upload", unquoted
    assert status == 413 and answer["error"].startswith("the upload has ")
    status, answer = post(url, b"GIF89a nonsense", texts="a")
    assert status == 400 and answer["error"].startswith("the upload is not an image this page can read")
    for texts in ({"texts": " \n "}, {}):  # blank lines, or no texts field at all (a client of its own)
        status, answer = post(url, files["photo"].read_bytes(), name="photo.png", **texts)
        assert status == 400 and answer == {"error": "the expression is empty: describe the object to segment in words"}
    status, answer = post(url, files["photo"].read_bytes(), name="photo.png", texts="x" * 2001)
    assert status == 400 and answer["error"] == "the text has 2001 characters, more than the 2000 this page accepts"
    status, answer = post(url, files["photo"].read_bytes(), name="photo.png", texts="a\nb\n\nc\nd")
    assert status == 400 and answer == {"error": "4 expressions, more than the 3 this page segments at once: one "
                                                 "expression per line"}  # fmt: skip
    long = " ".join(["red"] * 20)  # more tokens than MAX_TOKENS: segmented, with a warning
    status, answer = post(url, files["photo"].read_bytes(), name="photo.png", texts=long)
    assert status == 200 and "more than the 12 the model reads" in answer["results"][0]["warning"]


def test_a_failed_prediction_is_a_500_and_a_logged_traceback(url, files, monkeypatch, caplog):
    """A bug in predicting (not the upload's fault): the answer says so (500), the log names the upload with the
    traceback, and the server goes on serving."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(demo.Predictor, "predict", broken)
    with caplog.at_level(logging.ERROR, logger="tools.web"):
        status, answer = post(url, files["photo"].read_bytes(), name="photo.png", texts="the red circle")
    assert (status, answer) == (500, {"error": "internal error: RuntimeError: boom"})
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "predict failed for 'photo.png'" and record.exc_info[0] is RuntimeError
    monkeypatch.undo()
    assert post(url, files["photo"].read_bytes(), name="photo.png", texts="the red circle")[0] == 200


@pytest.mark.parametrize(
    "length, answer",
    [
        (None, (400, {"error": "no image: choose an image file first"})),  # no body announced: an empty upload
        ("abc", (400, {"error": "bad Content-Length header"})),
        ("-5", (400, {"error": "bad Content-Length header"})),
        ("+5", (400, {"error": "bad Content-Length header"})),  # (Python's int() reads these two)
        ("1_0", (400, {"error": "bad Content-Length header"})),
        (["5", "7"], (400, {"error": "bad Content-Length header"})),  # two lengths: which one?
        (["0", "0"], (400, {"error": "no image: choose an image file first"})),  # the same one twice
    ],
)
def test_content_length_header(url, length, answer):
    """The upload's length as the request states it: absent is nothing, anything but digits (or two different
    lengths) is refused at once (the server does not wait for a body), and the server keeps serving."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.putrequest("POST", "/predict?name=x.png&texts=a")
    for value in [length] if isinstance(length, str) else length or []:
        connection.putheader("Content-Length", value)
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.load(response)) == answer and response.headers["Content-Type"] == "application/json"
    connection.close()
    assert urllib.request.urlopen(url, timeout=60).status == 200


def test_stalled_upload_is_answered_and_a_slow_one_served(predictor, files):
    """An upload that stops sending is answered 408 after ``idle_seconds`` of silence (not held open for ever),
    a request that never comes is closed, and one that keeps sending in pauses shorter than that is served
    however long it takes in all; the server keeps serving throughout."""
    server, address = serving(predictor, web.Limits(idle_seconds=0.6))
    head = "POST /predict?name=photo.png&texts=the%20red%20circle HTTP/1.1\r\nContent-Length: {}\r\n\r\n"
    try:
        with socket.create_connection(address, timeout=60) as sock:
            sock.sendall(head.format(1000).encode() + b"\x89PNG")
            status, answer, seconds = read_answer(sock)
        assert (status, answer) == (408, {"error": "the upload stopped: 1000 bytes announced, nothing more for 0.6 s"})
        assert 0.5 < seconds < 10
        with socket.create_connection(address, timeout=60) as sock:  # not even a request line
            start = time.monotonic()
            assert sock.recv(1) == b"" and 0.5 < time.monotonic() - start < 10
        photo = files["photo"].read_bytes()
        with socket.create_connection(address, timeout=60) as sock:
            sock.sendall(head.format(len(photo)).encode())
            for part in np.array_split(np.frombuffer(photo, np.uint8), 4):  # 4 x 0.3 s: longer than 0.6 in all
                time.sleep(0.3)
                sock.sendall(part.tobytes())
            status, answer, _ = read_answer(sock)
        assert status == 200 and answer["results"][0]["text"] == "the red circle"
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_is_served_at_its_two_addresses(url):
    """``/`` and ``/index.html`` answer the same page; a query string does not change the path."""
    pages = []
    for path in ("", "index.html", "?from=bookmark"):
        with urllib.request.urlopen(url + path, timeout=60) as answer:
            assert (answer.status, answer.headers["Content-Type"]) == (200, "text/html; charset=utf-8")
            pages.append(answer.read())
    assert pages[0].startswith(b"<!doctype html>") and pages[1] == pages[0] == pages[2]


def test_other_paths_are_not_found(url):
    for method, path in (("GET", "nope"), ("GET", "predict"), ("POST", ""), ("POST", "index.html")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + path, data=b"" if method == "POST" else None,
                                                          method=method), timeout=60)
        assert (e.value.code, e.value.headers["Content-Type"], e.value.read()) == (404, "text/plain", b"not found")


def test_preview_of_a_big_image_is_shrunk():
    image = np.random.default_rng(1).integers(0, 256, (600, 2048, 3), dtype=np.uint8)
    mask = np.zeros((600, 2048), bool)
    mask[100:300, 1000:1600] = True
    shown = web_upload.preview(image, mask, vis.PALETTE[0])
    assert shown.shape == (300, 1024, 3)
    small = np.asarray(Image.fromarray(image).resize((1024, 300), Image.BILINEAR))
    assert np.array_equal(shown, vis.overlay_mask(small, mask[::2, ::2], vis.PALETTE[0]))


def test_preview_of_a_thread_of_an_image_keeps_one_pixel_across():
    """A photo 1 pixel wide and 3000 tall shrinks to 1 x 1024, not to a width the image never had."""
    image = np.full((3000, 1, 3), 200, np.uint8)
    mask = np.ones((3000, 1), bool)
    shown = web_upload.preview(image, mask, vis.PALETTE[0])
    assert shown.shape == (1024, 1, 3)
    assert np.array_equal(shown, vis.overlay_mask(np.full((1024, 1, 3), 200, np.uint8), mask[:1024], vis.PALETTE[0]))


def test_startup_flags_reach_the_server(run, tmp_path):
    """``build`` without a browser: the limits (MB and megapixels as decimals), the port, the precision, a config
    file for a checkpoint without one, and the page's model and limits lines."""
    from models import read_checkpoint

    bare = tmp_path / "bare.pth"  # weights only: its heads are ambiguous without --cfg_file
    torch.save({"model": read_checkpoint(run["checkpoint"])["model"]}, bare)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(run["cfg"].dump())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free a moment ago
    argv = ["--checkpoint", str(bare), "--cfg_file", str(cfg_file), "--device", "cpu", "--port", str(port), "--amp",
            "bf16", "--max_megabytes", "1.5", "--max_megapixels", "2.5", "--max_expressions", "1",
            "--idle_seconds", "7.5"]  # fmt: skip
    server = web.build(argv)
    try:
        assert server.server_address[1] == port
        assert server.app.predictor.amp == "bf16"
        assert server.app.limits == web.Limits(1_500_000, 2_500_000, 1, idle_seconds=7.5)
        page = server.app.page.decode("utf-8")
        assert f"<code id=\"model\">bare.pth on cpu, input {SIZE}x{SIZE}, bf16</code>" in page
        assert html.escape(web.Limits(1_500_000, 2_500_000, 1).describe()) in page and "{{" not in page
    finally:
        server.server_close()
    with pytest.raises(ValueError, match="bare.pth stores no config"):
        web.build(argv[:2] + argv[4:])


def test_text_of_exactly_the_limit_is_read(predictor):
    limits = web_upload.Limits(max_text_chars=12)
    assert web_upload.read_expressions("the red\nbox", predictor, limits)[0] == ["the red", "box"]  # 11 characters
    assert web_upload.read_expressions("the red\n box", predictor, limits)[0] == ["the red", "box"]  # 12: the limit
    with pytest.raises(web_upload.UploadError, match="^the text has 13 characters, more than the 12 this page"):
        web_upload.read_expressions("the red\n  box", predictor, limits)


def test_a_damaged_upload_names_the_decoders_reason(files):
    """A readable header over cut pixel data: refused with the decoder's own reason, which PIL gives here."""
    data = files["broken"].read_bytes()
    with pytest.raises(OSError) as decoding:
        Image.open(io.BytesIO(data)).convert("RGB")
    with pytest.raises(web_upload.UploadError) as refused:
        web_upload.read_upload(data, "cut.png", web_upload.Limits())
    assert str(refused.value) == f"'cut.png' is damaged and cannot be decoded: {decoding.value}"


def test_a_file_of_exactly_the_byte_limit_is_read():
    limits = web_upload.Limits(max_bytes=1000)
    web_upload.check_bytes(1000, "photo.png", limits)  # the limit itself: accepted
    with pytest.raises(web_upload.UploadError, match=r"^'photo.png' has 0.0 MB, more than the 0.001 MB this page"):
        web_upload.check_bytes(1001, "photo.png", limits)


def test_a_files_size_is_said_in_megabytes_of_a_million_bytes():
    """As the limit is given: 1050001 bytes are 1.050001 MB, shown 1.1 (1.0 in any other unit near it)."""
    with pytest.raises(web_upload.UploadError, match=r"^'photo.png' has 1\.1 MB, more than the 1 MB this page"):
        web_upload.check_bytes(1_050_001, "photo.png", web_upload.Limits(max_bytes=1_000_000))


def test_page_names_the_model_lavt_without_a_name(predictor):
    assert f">LAVT on cpu, input {SIZE}x{SIZE}, float32<" in web.WebApp(predictor).page.decode("utf-8")


def test_the_command_line_reaches_the_predictor(predictor, monkeypatch):
    """--device, --cfg_file, --amp, --ck_bert and --opts open the checkpoint as given (a device this machine may not
    have: the predictor is not built, the arguments it would be built from are read)."""
    seen = []

    def from_checkpoint(*args):
        seen.append(args)
        return predictor

    monkeypatch.setattr(web.Predictor, "from_checkpoint", from_checkpoint)
    argv = ["--checkpoint", "x.pth", "--device", "cuda:1", "--cfg_file", "c.yaml", "--amp", "bf16", "--ck_bert", "b"]
    server = web.build([*argv, "--opts", "MODEL.TEXT.MAX_TOKENS", "9", "--port", "0"])
    server.server_close()
    web.build(["--checkpoint", "y.pth", "--port", "0"]).server_close()  # the defaults: the predictor's own device
    assert seen == [
        ("x.pth", "cuda:1", "c.yaml", ["MODEL.TEXT.MAX_TOKENS", "9", "MODEL.TEXT.ENCODER", "b"], "bf16"),
        ("y.pth", None, None, [], ""),  # "": float32 (the predictor takes no None)
    ]


def test_startup_mistakes_end_in_one_line(predictor, tmp_path, capsys):
    assert web.main(["--checkpoint", str(tmp_path / "nothing.pth"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m tools.web: error: CheckpointError: checkpoint not found") and err.count("\n") == 1
    for flag, value in [("--port", "0"), ("--port", "65535"), ("--idle_seconds", "0.5"), ("--max_megabytes", "6e-7")]:
        # the ends of the range, a fraction of a second, a limit that rounds to one byte: past the checks, the missing
        # checkpoint is what stops them
        assert web.main(["--checkpoint", str(tmp_path / "nothing.pth"), flag, value]) == 2
        assert "CheckpointError: checkpoint not found" in capsys.readouterr().err
    positive = "must be a finite number > 0, got"
    for flag, value, message in [
        ("--max_megabytes", "0", f"--max_megabytes {positive} 0.0"),
        ("--max_megabytes", "inf", f"--max_megabytes {positive} inf"),
        ("--max_megapixels", "nan", f"--max_megapixels {positive} nan"),
        ("--max_megapixels", "4e-7", f"--max_megapixels {positive} 4e-07"),  # less than one pixel
        ("--max_megabytes", "5e-7", f"--max_megabytes {positive} 5e-07"),  # half a byte rounds to none
        ("--max_expressions", "0", "--max_expressions must be >= 1, got 0"),
        ("--port", "65536", "--port must be 0-65535 (0: any free one), got 65536"),
        ("--port", "-1", "--port must be 0-65535 (0: any free one), got -1"),
    ]:
        assert web.main(["--checkpoint", "x.pth", flag, value]) == 2
        assert capsys.readouterr().err == f"python -m tools.web: error: ValueError: {message}\n"
    bert = ["--ck_bert", "b", "--opts", "MODEL.TEXT.DIM", "8", "MODEL.TEXT.ENCODER", "c"]
    assert web.main(["--checkpoint", "x.pth", *bert]) == 2
    assert capsys.readouterr().err == (
        "python -m tools.web: error: ValueError: --ck_bert and --opts MODEL.TEXT.ENCODER both set MODEL.TEXT.ENCODER: "
        "give it once\n"
    )
    for value in ("0", "-1", "nan"):
        assert web.main(["--checkpoint", "x.pth", "--idle_seconds", value]) == 2
        assert f"--idle_seconds must be positive, got {value}" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            web.WebApp(predictor).make_server("127.0.0.1", port)
    with pytest.raises(ValueError, match=r"^cannot listen on 127.0.0.1:70000: bind\(\): port must be 0-65535"):
        web.WebApp(predictor).make_server("127.0.0.1", 70000)


def test_the_command_lines_default_limits_are_the_documented_ones():
    """docs/web.md's defaults: 20 MB, 12 megapixels, 5 expressions, 60 seconds of silence."""
    a = web.get_parser().parse_args(["--checkpoint", "x.pth"])
    assert (a.max_megabytes, a.max_megapixels, a.max_expressions, a.idle_seconds) == (20.0, 12.0, 5, 60.0)


def test_the_default_address_is_the_readmes(predictor, monkeypatch):
    """http://127.0.0.1:7860/, the address README.md gives, from the command line and from ``make_server()`` alike
    (the server class stubbed: nothing is bound)."""
    assert web.get_parser().parse_args(["--checkpoint", "x.pth"]).port == 7860
    asked = []
    monkeypatch.setattr(web, "_Server", lambda address, handler: asked.append(address) or SimpleNamespace())
    web.WebApp(predictor).make_server()
    assert asked == [("127.0.0.1", 7860)]
