"""Nothing lost, nothing run: refs pickles that name code are refused unrun, configuration values are checked (and
integers taken as floats) before anything is built, and the synthetic dataset never writes into a folder that is
not its own nor leaves stale images behind."""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from args import config_from_args, parse_args
from configs import get_cfg_defaults, get_config
from configs.validate import ConfigError
from data.synthetic import SyntheticRootError, ensure_synthetic, generate, main
from engine.config_check import validate_config
from refer import REFER, ReferDataError
from refer.safe_pickle import UnsafePickleError, load_plain_pickle, loads_plain_pickle

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


# ---------------------------------------------------------------------------------------------------- config
def test_integers_where_floats_are_expected(tmp_path: Path):
    cfg = get_config(None, ["TRAIN.LR", "3", "TRAIN.CE_WEIGHTS", "[1, 2]", "TRAIN.CLIP_GRAD", 1])
    assert (cfg.TRAIN.LR, cfg.TRAIN.CE_WEIGHTS, cfg.TRAIN.CLIP_GRAD) == (3.0, [1.0, 2.0], 1.0)
    assert type(cfg.TRAIN.LR) is float and all(type(w) is float for w in cfg.TRAIN.CE_WEIGHTS)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("TRAIN:\n  LR: 2\n  WEIGHT_DECAY: 1e-4\n  EPOCHS: 3\n")  # YAML reads 1e-4 as a string
    cfg = get_config(yaml)
    assert (cfg.TRAIN.LR, cfg.TRAIN.WEIGHT_DECAY, cfg.TRAIN.EPOCHS) == (2.0, 1e-4, 3)
    assert get_config(None, ["MODEL_ID", "'123'"]).MODEL_ID == "123"  # quoted strings stay strings


@pytest.mark.parametrize(
    "opts, match",
    [
        (["DATA.SIZE", "abc"], r"^DATA\.SIZE must be an integer \(default 480\), got 'abc' \(str\) in the overrides$"),
        (["TRAIN.EPOCHS", "2.5"], r"^TRAIN\.EPOCHS must be an integer .*got 2\.5 \(float\)"),
        (["DATA.AUGMENT", "1"], r"^DATA\.AUGMENT must be true/false .*got 1 \(int\)"),
        (["EVAL.SPLITS", "val"], r"^EVAL\.SPLITS must be a list .*got 'val' \(str\)"),
    ],
)
def test_type_mismatch_is_one_line(opts: list, match: str):
    with pytest.raises(ConfigError, match=match):
        get_config(None, opts)


def test_type_mismatch_in_a_file_names_it(tmp_path: Path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("DATA:\n  WORKERS: many\n")
    with pytest.raises(ConfigError, match=r"^DATA\.WORKERS must be an integer .*got 'many' \(str\) in .*bad\.yaml$"):
        get_config(yaml)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--lr", "nan"], r"^TRAIN\.LR must be a finite number > 0, got nan$"),
        (["--lr", "0"], r"^TRAIN\.LR must be > 0, got 0\.0$"),
        (["--epochs", "0"], r"^TRAIN\.EPOCHS must be >= 1, got 0$"),
        (["--batch_size", "0"], r"^TRAIN\.BATCH_SIZE must be >= 1, got 0$"),
        (["--weight_decay", "-1"], r"^TRAIN\.WEIGHT_DECAY must be >= 0, got -1\.0$"),
        (["--workers", "-1"], r"^DATA\.WORKERS must be >= 0, got -1$"),
        (["--size", "0"], r"^DATA\.SIZE must be >= 1, got 0$"),
        (["--clip_grad", "inf"], r"^TRAIN\.CLIP_GRAD must be a finite number >= 0, got inf$"),
        (["--type", "val", "testX"], r"^EVAL\.SPLITS must be one of 'train', 'val', .*got 'testX'$"),
        (["--type", "val", "val"], r"^EVAL\.SPLITS names a split twice: \['val', 'val'\]$"),
        (["--dataset", "refclef"], r"^DATA\.DATASET must be one of 'refcoco', 'refcoco\+', 'refcocog', 'synthetic'"),
        (["--splitBy", "berkeley"], r"^DATA\.SPLIT_BY must be one of 'unc', 'google', 'umd', got 'berkeley'$"),
        (["--model_id", "a/b"], r"^MODEL_ID names the run folder under OUTPUT: it must be one folder name"),
        (["--opts", "MODEL.NAME", "lavt2"], r"^MODEL\.NAME must be one of 'lavt', 'lavt_one', got 'lavt2'$"),
        (["--opts", "TRAIN.LOSS", "focal"], r"^TRAIN\.LOSS must be one of 'ce', 'dice', 'ce\+dice', got 'focal'$"),
        (["--opts", "TRAIN.AMP", "fp8"], r"^TRAIN\.AMP must be one of '', 'bf16', 'fp16', 'auto', got 'fp8'$"),
        (["--opts", "EVAL.MODE", "max"], r"^EVAL\.MODE must be one of 'each', 'cat', 'avg', got 'max'$"),
        (["--opts", "EVAL.RESOLUTION", "full"], r"^EVAL\.RESOLUTION must be one of 'network', 'original'"),
        (["--opts", "MODEL.SWIN.STEM", "vit"], r"^MODEL\.SWIN\.STEM must be one of 'patch', 'conv', got 'vit'$"),
        (["--opts", "DATA.RESIZE", "lanczos"], r"^DATA\.RESIZE must be one of 'pil', 'cv2', got 'lanczos'$"),
        (["--opts", "DATA.MASK_PARTS", "sum"], r"^DATA\.MASK_PARTS must be one of 'official', 'union'"),
        (["--opts", "MODEL.FUSION.DROPOUT", "1"], r"^MODEL\.FUSION\.DROPOUT must be in \[0, 1\), got 1\.0$"),
        (["--opts", "MODEL.SWIN.DROP_PATH_RATE", "-0.1"], r"^MODEL\.SWIN\.DROP_PATH_RATE must be in \[0, 1\)"),
        (["--opts", "TRAIN.CE_WEIGHTS", "[1.0]"], r"^TRAIN\.CE_WEIGHTS must be 2 finite numbers > 0 .*got \[1\.0\]$"),
        (["--opts", "TRAIN.CE_WEIGHTS", "[1.0, 0]"], r"^TRAIN\.CE_WEIGHTS must be 2 finite numbers > 0"),
        (["--opts", "MODEL.SWIN.DEPTHS", "[2, 2, 2]"], r"^MODEL\.SWIN\.DEPTHS must be a list of 4 integers >= 1"),
        (["--opts", "MODEL.SWIN.NUM_HEADS", "[3, 8, 16, 32]"],
         r"^MODEL\.SWIN\.NUM_HEADS \[3, 8, 16, 32\]: stage 1 has 128 channels .* do not divide into 3 heads$"),
        (["--opts", "MODEL.SWIN.WINDOW_SIZE", "0"], r"^MODEL\.SWIN\.WINDOW_SIZE must be >= 1, got 0$"),
        (["--opts", "MODEL.TEXT.DROPOUT", "on"], r"^MODEL\.TEXT\.DROPOUT must be one of 'auto', 'enabled', 'disabled'"),
        (["--opts", "MODEL.TEXT.MAX_TOKENS", "1"], r"^MODEL\.TEXT\.MAX_TOKENS must be >= 2, got 1$"),
        (["--opts", "TRAIN.SEED", "-1"], r"^TRAIN\.SEED must be >= 0, got -1$"),
        (["--opts", "EVAL.SPLITS", "[]"], r"^EVAL\.SPLITS must be a non-empty list of split names from .*, got \[\]$"),
        (["--size", "96", "--opts", "TRAIN.LOW_RES_SIZE", "96"],
         r"^TRAIN\.LOW_RES_SIZE 96 must be below DATA\.SIZE 96 \(or 0: off\)$"),
        (["--opts", "TRAIN.LOW_RES_EPOCHS", "1"], r"^TRAIN\.LOW_RES_EPOCHS 1 needs TRAIN\.LOW_RES_SIZE"),
        # the text feature cache: a trained encoder (the paper's 10 layers), or a frozen one with its dropout on
        (["--opts", "MODEL.TEXT.CACHE", "True"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got ENCODER 'pretrained/bert-base-uncased', TRAIN_LAYERS 10, NAME lavt, "
         r"DROPOUT auto\)$"),
        (["--opts", "MODEL.TEXT.CACHE", "True", "MODEL.TEXT.TRAIN_LAYERS", "0", "MODEL.TEXT.DROPOUT", "enabled"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got .* TRAIN_LAYERS 0, NAME lavt, DROPOUT enabled\)$"),
        (["--opts", "MODEL.TEXT.CACHE", "True", "MODEL.TEXT.TRAIN_LAYERS", "0", "MODEL.TEXT.ENCODER", "''"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got ENCODER '', TRAIN_LAYERS 0, NAME lavt, DROPOUT auto\)$"),
        (["--dataset", "synthetic", "--opts", "DATA.SYNTHETIC_IMAGES", "3"],
         r"^DATA\.SYNTHETIC_IMAGES / DATA\.SYNTHETIC_EVAL_IMAGES: num_images=3 is too small"),
        (["--dataset", "synthetic", "--opts", "DATA.SYNTHETIC_IMAGES", "9", "DATA.SYNTHETIC_EVAL_IMAGES", "3"],
         r"^DATA\.SYNTHETIC_IMAGES / DATA\.SYNTHETIC_EVAL_IMAGES: 9 synthetic images leave none for train"),
    ],
)
def test_bad_values_are_refused_in_one_line(argv: list, match: str):
    cfg = config_from_args(parse_args(["--cfg_file", ""] + argv))  # the paper's defaults with the flags over them
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg_file", [None] + sorted(str(p) for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_pass(cfg_file: str | None):
    """Every shipped config passes the checks, and the checks are live on it: the same config with one bad value
    is refused."""
    cfg = get_config(cfg_file)
    assert validate_config(cfg) is None
    bad = cfg.clone()
    bad.defrost()
    bad.TRAIN.LR = -cfg.TRAIN.LR
    with pytest.raises(ConfigError, match=f"TRAIN.LR must be > 0, got {-cfg.TRAIN.LR}"):
        validate_config(bad)


@pytest.mark.parametrize(
    "key,lowest", [("MODEL.SWIN.PATCH_SIZE", 1), ("TRAIN.EPOCHS", 1), ("TRAIN.BATCH_SIZE", 1), ("DATA.WORKERS", 0)]
)
def test_integer_bounds_are_inclusive(key: str, lowest: int):
    """The lowest allowed value passes, one below is refused (the bound itself, not only far values)."""
    assert validate_config(get_config(None, [key, lowest])) is None
    with pytest.raises(ConfigError, match=f"{key} must be >= {lowest}, got {lowest - 1}"):
        validate_config(get_config(None, [key, lowest - 1]))


@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.TEXT.CACHE", True, "MODEL.TEXT.TRAIN_LAYERS", 0],  # frozen, the official dropout (off in lavt)
        ["MODEL.TEXT.CACHE", True, "MODEL.TEXT.TRAIN_LAYERS", 0, "MODEL.TEXT.DROPOUT", "disabled"],
        ["MODEL.FUSION.DROPOUT", 0.0, "MODEL.SWIN.DROP_PATH_RATE", 0.999],  # rates: 0 included, 1 not
    ],
)
def test_allowed_edges_pass(opts: list):
    """The settings just inside each rule pass (the refusals above are not all there is)."""
    assert validate_config(get_config(None, opts)) is None


def leaves(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def test_every_key_is_checked():
    """A key added to configs/defaults.py without a rule in engine/config_check.py fails here."""
    defaults = get_cfg_defaults()
    for key in leaves(defaults):
        tree = json.loads(json.dumps(defaults))  # plain nested dicts: any value can go in
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = {"not": "a value"}
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}\b"):
            validate_config(tree)


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


def test_unreadable_marker_is_refused(tmp_path: Path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "generator.json").write_text("{not json")
    before = snapshot(tmp_path)
    with pytest.raises(SyntheticRootError, match=r"cannot tell which files .*generator\.json is unreadable"):
        ensure_synthetic(tmp_path, num_images=4, **SMALL)
    assert snapshot(tmp_path) == before


def test_force_regenerates_an_identical_dataset(tmp_path: Path, caplog):
    argv = ["--root", str(tmp_path), "--num-images", "4", "--min-size", "32", "--max-size", "32", "--workers", "1"]
    main(argv)
    first = snapshot(tmp_path)
    main(argv + ["--force"])
    assert snapshot(tmp_path) == first  # same arguments: the same bytes, written anew
    assert "is regenerated on request (force)" in caplog.text
