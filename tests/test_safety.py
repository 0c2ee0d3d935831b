"""Nothing lost, nothing run: refs pickles that name code are refused unrun, and the synthetic dataset never writes
into a folder that is not its own nor leaves stale images behind (configuration: tests/test_config.py)."""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.synthetic import SyntheticRootError, ensure_synthetic, generate
from refer import REFER, ReferDataError
from refer.safe_pickle import UnsafePickleError, load_plain_pickle, loads_plain_pickle
from tools.synthetic import main
from tools.synthetic import run as run_synthetic

from .helpers_process import snapshot, terminal_job

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- pickles
class Payload:
    """Unpickled by pickle.load, it calls ``func(*args)``: how a malicious pickle runs code."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Each creates ``marker`` when unpickled by pickle.load."""
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "numpy.save": Payload(np.save, str(marker), np.zeros(1)),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.open", "numpy.save"])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_refs_pickle_is_refused_unrun(tmp_path: Path, name: str, protocol: int):
    marker = tmp_path / "pwned.npy"  # np.save adds .npy to a name without it
    payload = [{"ref_id": 0, "sentences": [payloads(marker)[name]]}]
    data = pickle.dumps(payload, protocol=protocol)
    pickle.loads(data)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (folder / "refs(unc).p").write_bytes(data)
    before = snapshot(tmp_path)
    with pytest.raises(ReferDataError, match=r"^cannot read REFER refs pickle .*refcoco/refs\(unc\)\.p: "
                       r"UnsafePickleError: it names \S+; only plain .* refused unrun$"):
        REFER(tmp_path, "refcoco", "unc")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_plain_pickles_of_every_protocol_load():
    value = [{"a": [1, 2.5, None, True, "caf\u00e9", (3, -4)], "s": {1, 2}, "f": frozenset({"x"}), "big": 2**70}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert loads_plain_pickle(pickle.dumps(value, protocol=protocol)) == value


def py2_protocol0(obj) -> bytes:
    """Protocol-0 pickle as Python 2's cPickle.dump writes by default: str as quoted byte strings (STRING)."""

    def enc(o) -> bytes:
        if isinstance(o, str):
            return b"S" + repr(o.encode("latin1"))[1:].encode("ascii") + b"\n"
        if isinstance(o, bool) or not isinstance(o, (int, float, list, dict)):
            raise TypeError(o)
        if isinstance(o, int):
            return b"I%d\n" % o
        if isinstance(o, float):
            return b"F" + repr(o).encode() + b"\n"
        if isinstance(o, list):
            return b"(" + b"".join(enc(x) for x in o) + b"l"
        return b"(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"d"

    return enc(obj) + b"."


def test_python2_protocol0_pickle():
    value = [{"raw": "caf\u00e9 sign", "ref_id": 3, "tokens": ["cafe", "sign"], "area": 1.5}]
    assert loads_plain_pickle(py2_protocol0(value)) == value
    # Python 2 sets: a call of __builtin__.set, the one kind of global admitted (with frozenset)
    assert loads_plain_pickle(b"c__builtin__\nset\n((lI1\naI2\natR.") == {1, 2}


def test_corrupt_and_unsafe_pickle_errors(tmp_path: Path):
    with pytest.raises(UnsafePickleError, match=r"it names builtins\.complex"):
        loads_plain_pickle(pickle.dumps(1 + 2j))
    with pytest.raises(UnsafePickleError, match="persistent id"):
        loads_plain_pickle(b"P1\n.")
    with pytest.raises(pickle.UnpicklingError):
        loads_plain_pickle(b"not a pickle")
    path = tmp_path / "x.p"
    path.write_bytes(pickle.dumps([1, "a"]))
    assert load_plain_pickle(path) == [1, "a"]


def test_generated_refs_are_plain(tmp_path: Path):
    data_dir = generate(tmp_path, num_images=4, min_size=32, max_size=40, workers=1)
    raw = (data_dir / "refs(unc).p").read_bytes()
    assert loads_plain_pickle(raw) == pickle.loads(raw)
    assert REFER(tmp_path, "synthetic").Refs


# ---------------------------------------------------------------------------------------------------- synthetic root
SMALL = dict(min_size=32, max_size=40, workers=1)


def images_in(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "images/mscoco/images/train2014").glob("*.jpg"))


@pytest.mark.parametrize("exists", [False, True])
def test_new_or_empty_root_is_generated_with_a_warning(tmp_path: Path, caplog, exists: bool):
    root = tmp_path / "typo_root"
    if exists:
        (root / "empty_folder").mkdir(parents=True)  # folders without files count as empty
    with caplog.at_level(logging.WARNING, logger="data.synthetic"):
        ensure_synthetic(root, num_images=4, **SMALL)
    assert [r.getMessage() for r in caplog.records] == [
        f"generating a new synthetic dataset in {root.resolve()} (there was none: check DATA.ROOT if you meant an "
        "existing one)"
    ]
    assert len(images_in(root)) == 4


def test_foreign_folder_is_refused_untouched(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "instances.json").write_text("{}")  # no generator.json: not a dataset made here
    before = snapshot(tmp_path)
    where = re.escape(str(tmp_path.resolve()))
    with pytest.raises(SyntheticRootError, match=rf"^refusing to write the synthetic dataset into {where}: the folder "
                       r"holds files but no synthetic dataset \(no synthetic/generator\.json\)"):
        ensure_synthetic(tmp_path, num_images=4, **SMALL)
    assert snapshot(tmp_path) == before
    (tmp_path / "file_root").write_text("x")
    with pytest.raises(SyntheticRootError, match=r"root .*file_root is a file, not a folder"):
        ensure_synthetic(tmp_path / "file_root", num_images=4, **SMALL)


def test_the_command_line_refuses_in_one_line(tmp_path: Path, capsys):
    """``python -m tools.synthetic`` into a foreign folder or a file: one line naming the root, status 2, nothing
    written (the same refusals as above, through the command line's own entry point: the command itself for the
    first, its ``run`` in this process for the others)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "file_root").write_text("x")
    before = snapshot(tmp_path)
    for root, message in [
        ("mine", "refusing to write the synthetic dataset into {}: the folder holds files but no synthetic dataset"),
        ("file_root", "the synthetic dataset's root {} is a file, not a folder (DATA.ROOT)"),
        # a root that cannot be created: under a file (as under /proc, or on a read-only disk)
        ("file_root/set", "cannot create the synthetic dataset's folders in {} (DATA.ROOT, --root): Not a directory"),
    ]:
        where = (tmp_path / root).resolve()
        flags = ["--root", str(where), "--num-images", "4"]
        if root == "mine":
            done = subprocess.run([sys.executable, "-m", "tools.synthetic", *flags], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            status, out, err = done.returncode, done.stdout, done.stderr
        else:
            status, (out, err) = run_synthetic(flags), capsys.readouterr()
        assert status == 2 and out == "", err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "python -m tools.synthetic: error: SyntheticRootError: " + message.format(where)
        ), err
        assert lines[0].endswith("Not a directory") == root.endswith("/set")  # the whole line, no Errno
    assert snapshot(tmp_path) == before


def test_ctrl_c_during_generation_is_one_line_and_the_next_run_cleans_up(tmp_path: Path):
    """Ctrl-C as a terminal sends it (to the whole process group, the drawing processes included) while
    ``python -m tools.synthetic`` draws: one line, status 130, no traceback; generating.json is left as the mark of
    a cut-off set, which the next run removes before it generates."""
    root = tmp_path / "set"
    argv = [sys.executable, "-m", "tools.synthetic", "--root", str(root), "--num-images", "4000", "--workers", "2"]
    with terminal_job(argv, cwd=REPO, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 120
        while len(list((root / "images").rglob("*.jpg"))) < 20:  # drawing under way
            assert proc.poll() is None and time.time() < deadline, "no images drawn"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        "python -m tools.synthetic: interrupted (Ctrl-C); the next run into this root removes what it had written, "
        "if anything (nothing while it waited)"
    )
    assert (root / "synthetic" / "generating.json").is_file() and not (root / "synthetic" / "generator.json").exists()
    ensure_synthetic(root, num_images=4)
    assert len(list((root / "images").rglob("*.jpg"))) == 4


def test_other_arguments_remove_the_previous_generation_first(tmp_path: Path, caplog):
    ensure_synthetic(tmp_path, num_images=12, **SMALL)
    image_dir = tmp_path / "images/mscoco/images/train2014"
    (image_dir / "COCO_train2014_000000000009.jpg").write_bytes(b"a real COCO image")  # not the generator's
    (tmp_path / "synthetic" / "my_notes.txt").write_text("kept")
    with caplog.at_level(logging.WARNING, logger="data.synthetic"):
        ensure_synthetic(tmp_path, num_images=8, **SMALL)
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"synthetic dataset in {tmp_path.resolve()} was made with other arguments (split_sizes ")
    assert message.endswith("removed the 16 files it wrote (its images and annotation files), generating it anew")
    assert images_in(tmp_path) == ["COCO_train2014_000000000009.jpg"] + [
        f"COCO_train2014_{1_000_000 + i:012d}.jpg" for i in range(8)
    ]  # the 4 stale images are gone, the others' files stay
    assert (tmp_path / "synthetic" / "my_notes.txt").read_text() == "kept"
    assert len(REFER(tmp_path, "synthetic").Imgs) == 8


def test_cut_off_generation_is_cleaned_up(tmp_path: Path, monkeypatch, caplog):
    import data.synthetic as synthetic

    real_draw = synthetic._draw_image

    def draw_then_fail(index: int, *args, **kwargs):
        if index == 5:
            raise KeyboardInterrupt
        return real_draw(index, *args, **kwargs)

    monkeypatch.setattr(synthetic, "_draw_image", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, num_images=8, **SMALL)
    monkeypatch.undo()
    assert (tmp_path / "synthetic" / "generating.json").is_file() and len(images_in(tmp_path)) == 5
    assert not (tmp_path / "synthetic" / "generator.json").exists()
    with caplog.at_level(logging.WARNING, logger="data.synthetic"):
        ensure_synthetic(tmp_path, num_images=4, **SMALL)
    assert "was cut off while being generated: removed the 6 files it wrote" in caplog.records[-1].getMessage()
    assert len(images_in(tmp_path)) == 4 and not (tmp_path / "synthetic" / "generating.json").exists()


def test_a_generation_cut_off_between_its_writes_leaves_nothing_behind(tmp_path: Path, monkeypatch, caplog):
    """Cut off after an annotation file is written but before it takes its name (the atomic write's rename): the
    temporary file is left, and the next run removes it with the rest."""
    import data.synthetic as synthetic

    real_write = synthetic._write

    def write_then_stop(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name.startswith("refs"):
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, num_images=8, **SMALL)
    monkeypatch.undo()
    folder = tmp_path / "synthetic"
    assert sorted(os.listdir(folder)) == ["generating.json", "instances.json", "refs(unc).p.tmp"]
    with caplog.at_level(logging.WARNING, logger="data.synthetic"):
        ensure_synthetic(tmp_path, num_images=4, **SMALL)
    assert "was cut off while being generated: removed the 11 files it wrote" in caplog.records[-1].getMessage()
    assert sorted(os.listdir(folder)) == ["attributes.json", "generator.json", "instances.json", "refs(unc).p"]
    assert len(images_in(tmp_path)) == 4


def test_unreadable_marker_is_refused(tmp_path: Path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "generator.json").write_text("{not json")
    before = snapshot(tmp_path)
    with pytest.raises(SyntheticRootError, match=r"cannot tell which files .*generator\.json is unreadable \(JSONDeco"):
        ensure_synthetic(tmp_path, num_images=4, **SMALL)
    assert snapshot(tmp_path) == before


def test_force_regenerates_an_identical_dataset(tmp_path: Path, caplog):
    argv = ["--root", str(tmp_path), "--num-images", "4", "--min-size", "32", "--max-size", "32", "--workers", "1"]
    main(argv)
    first = snapshot(tmp_path)
    main(argv + ["--force"])
    assert snapshot(tmp_path) == first  # same arguments: the same bytes, written anew
    assert "is regenerated on request (force)" in caplog.text
