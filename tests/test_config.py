"""Configuration is checked before anything is built: values of the wrong type (integers taken as floats), unknown
keys, a group given a value, config files that are not YAML mappings, and every value outside its rule, each one
line naming the key or the place in the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from args import config_from_args, parse_args
from configs import get_cfg_defaults, get_config
from configs.validate import ConfigError
from engine.config_check import validate_config

REPO = Path(__file__).resolve().parents[1]


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
        (["--opts", "EVAL.SPLITS", "[]"],
         r"^EVAL\.SPLITS must be a non-empty list of split names from train, val, test, testA, testB, testC, testAB, "
         r"testBC, testAC, got \[\]$"),
        (["--size", "96", "--opts", "TRAIN.LOW_RES_SIZE", "96"],
         r"^TRAIN\.LOW_RES_SIZE 96 must be below DATA\.SIZE 96 \(or 0: off\)$"),
        (["--opts", "TRAIN.LOW_RES_EPOCHS", "1"], r"^TRAIN\.LOW_RES_EPOCHS 1 needs TRAIN\.LOW_RES_SIZE"),
        (["--opts", "TRAIN.LOW_RES_SIZE", "240", "TRAIN.LOW_RES_EPOCHS", "40.5"],
         r"^TRAIN\.LOW_RES_EPOCHS 40\.5 is more than the run's TRAIN\.EPOCHS 40$"),
        # the text feature cache: a trained encoder (the paper's 10 layers), or a frozen one with its dropout on
        (["--opts", "MODEL.TEXT.CACHE", "True"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got ENCODER 'pretrained/bert-base-uncased', TRAIN_LAYERS 10, NAME lavt, "
         r"DROPOUT auto\)$"),
        (["--opts", "MODEL.TEXT.CACHE", "True", "MODEL.TEXT.TRAIN_LAYERS", "0", "MODEL.TEXT.DROPOUT", "enabled"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got .* TRAIN_LAYERS 0, NAME lavt, DROPOUT enabled\)$"),
        (["--opts", "MODEL.TEXT.CACHE", "True", "MODEL.TEXT.TRAIN_LAYERS", "0", "MODEL.TEXT.ENCODER", "''"],
         r"^MODEL\.TEXT\.CACHE keeps .* \(got ENCODER '', TRAIN_LAYERS 0, NAME lavt, DROPOUT auto\)$"),
        (["--dataset", "synthetic", "--opts", "DATA.SYNTHETIC_IMAGES", "3"],
         r"^DATA\.SYNTHETIC_IMAGES=3 is too small for train/val/testA/testB; give at least 4$"),
        (["--dataset", "synthetic", "--opts", "DATA.SYNTHETIC_IMAGES", "9", "DATA.SYNTHETIC_EVAL_IMAGES", "3"],
         r"^DATA\.SYNTHETIC_IMAGES=9 leaves none for train after 3 x DATA\.SYNTHETIC_EVAL_IMAGES=3 for val, testA and "
         r"testB$"),
    ],
)
def test_bad_values_are_refused_in_one_line(argv: list, match: str):
    cfg = config_from_args(parse_args(["--cfg_file", ""] + argv))  # the paper's defaults with the flags over them
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(cfg)
    assert "\n" not in str(e.value)


def test_the_synthetic_sizes_are_checked_for_the_synthetic_dataset_only():
    """A RefCOCO run ignores DATA.SYNTHETIC_IMAGES: a value the synthetic dataset would refuse passes there."""
    argv = ["--cfg_file", "", "--dataset", "refcoco", "--opts", "DATA.SYNTHETIC_IMAGES", "3"]
    assert validate_config(config_from_args(parse_args(argv))) is None


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
        ["TRAIN.LOW_RES_SIZE", 240, "TRAIN.LOW_RES_EPOCHS", 40.0],  # the whole run at the low resolution
        ["MODEL.SWIN.EMBED_DIM", 1, "MODEL.SWIN.NUM_HEADS", [1, 1, 1, 1]],  # the narrowest Swin (widths 1, 2, 4, 8)
    ],
)
def test_allowed_edges_pass(opts: list):
    """The settings just inside each rule pass (the refusals above are not all there is)."""
    assert validate_config(get_config(None, opts)) is None


@pytest.mark.parametrize("value, shown", [("fast", "'fast' (str)"), (True, "True (bool)"), ([1], "[1] (list)")])
def test_a_number_key_given_another_kind_names_its_type(value, shown: str):
    """A bool is no number here, though Python counts it as an int."""
    tree = json.loads(json.dumps(get_cfg_defaults()))
    tree["TRAIN"]["LR"] = value
    with pytest.raises(ConfigError) as e:
        validate_config(tree)
    assert str(e.value) == f"TRAIN.LR must be a number > 0, got {shown}"


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


def _keys(group: str = "") -> str:
    """The keys of a group of configs/defaults.py (the top level for ""), as the messages list them."""
    node = get_cfg_defaults()
    for part in filter(None, group.split(".")):
        node = node[part]
    return ", ".join(sorted(node))


@pytest.mark.parametrize(
    "opts, message",
    [
        (["TRAIN.NOPE", "1"], f"unknown config key TRAIN.NOPE in the overrides (TRAIN has {_keys('TRAIN')})"),
        (["MODEL.SWIN.EMBEDDIM", 3], "unknown config key MODEL.SWIN.EMBEDDIM in the overrides (did you mean "
         f"MODEL.SWIN.EMBED_DIM? MODEL.SWIN has {_keys('MODEL.SWIN')})"),
        (["TRAINN.LR", 1], "unknown config key TRAINN.LR in the overrides (did you mean TRAIN? the top level has "
         "DATA, EVAL, LOG, MODEL, MODEL_ID, OUTPUT, TRAIN)"),
        (["TRAIN.LR.X", 1], f"unknown config key TRAIN.LR.X in the overrides (did you mean TRAIN.LR? TRAIN has "
         f"{_keys('TRAIN')})"),
        (["DATA.SIZ", 96], "unknown config key DATA.SIZ in the overrides (did you mean DATA.SIZE? DATA has "
         f"{_keys('DATA')})"),
        (["DATA.SIZE", 96, "X", 1], f"unknown config key X in the overrides (the top level has {_keys()})"),
        (["TRAIN", 1], f"TRAIN is a group of keys ({_keys('TRAIN')}), not a value: got 1 in the overrides"),
        (["MODEL.SWIN", "{'DEPTHS': [2]}"], f"MODEL.SWIN is a group of keys ({_keys('MODEL.SWIN')}), not a value: got "
         "{'DEPTHS': [2]} in the overrides"),
    ],
)  # fmt: skip
def test_unknown_keys_and_groups_are_one_line(opts: list, message: str):
    """A key configs/defaults.py does not have names the keys of the deepest group on its path and the closest of
    them; a group's name given a value lists the group's keys (yacs: an assertion, or the whole group printed)."""
    with pytest.raises(ConfigError) as e:
        get_config(None, opts)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "content, message",
    [
        (b"TRAIN:\n  LR: 1e-4\n  NOPE: 1\n", f"unknown config key TRAIN.NOPE in {{}} (TRAIN has {_keys('TRAIN')})"),
        (b"MODEL:\n  SWIN: 3\n", f"MODEL.SWIN is a group of keys ({_keys('MODEL.SWIN')}), not a value: got 3 in {{}}"),
        (b"TRAIN:\n  LR:\n    X: 1\n", "TRAIN.LR must be a number (default 5e-05), got CfgNode({{'X': 1}}) (CfgNode) "
         "in {}"),
        (b"TRAIN: [\n", "config file {} is not valid YAML at line 2, column 1: expected the node content, but found "
         "'<stream end>'"),
        (b"TRAIN:\n  LR: 1\n   EPOCHS: 2\n", "config file {} is not valid YAML at line 3, column 10: mapping values "
         "are not allowed here"),
        (b"- TRAIN\n- LR\n", "config file {} must map config keys to values (e.g. TRAIN: {{LR: 5e-05}}), got "
         "['TRAIN', 'LR']"),
        (b"just words\n", "config file {} must map config keys to values (e.g. TRAIN: {{LR: 5e-05}}), got "
         "'just words'"),
        (b"TRAIN:\n  LR: 1\n\xff\n", "config file {} is not UTF-8 text (byte 15): is it a YAML file?"),
    ],
)  # fmt: skip
def test_config_file_mistakes_are_one_line_and_the_file_is_left(tmp_path: Path, content: bytes, message: str):
    """A config file with a mistake is refused in one line that names the file and, where YAML can tell, the line
    and column (yacs: a traceback), through main.py's flags as well; the file stays as it was."""
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    for read in (lambda: get_config(path), lambda: config_from_args(parse_args(["--cfg_file", str(path)]))):
        with pytest.raises(ConfigError) as e:
            read()
        assert str(e.value) == message.format(path)
    assert path.read_bytes() == content


def test_an_empty_config_file_is_the_defaults(tmp_path: Path):
    (tmp_path / "empty.yaml").write_text("# nothing set yet\n")
    assert get_config(tmp_path / "empty.yaml") == get_cfg_defaults()
