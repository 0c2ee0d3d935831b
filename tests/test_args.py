import subprocess
import sys
from pathlib import Path

import pytest

import args as cli
from configs import DEMO_CONFIG
from configs.validate import ConfigError
from models import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

ISSUE_FLAGS = [
    "--cfg_file", "--opts", "--dataset", "--splitBy", "--refer_data_root", "--batch_size", "--size", "--epochs",
    "--lr", "--weight_decay", "--resume", "--pretrain", "--pretrained_swin_weights", "--ck_bert", "--eval", "--type",
    "--eval_mode", "--eval_resolution", "--output", "--model_id", "--workers", "--amp", "--seed",
]  # fmt: skip


def cfg_of(argv):
    return cli.config_from_args(cli.parse_args(argv))


def test_help_lists_every_flag_of_the_issue():
    text = cli.get_parser().format_help()
    for flag in ISSUE_FLAGS:
        assert flag in text, flag


def test_not_parsed_at_import():
    # importing args with foreign argv (e.g. under pytest or a notebook) must not parse or exit
    out = subprocess.run(
        [sys.executable, "-c", "import args; print('ok')", "--no-such-flag"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_flags_map_onto_config():
    cfg = cfg_of(
        [
            "--cfg_file", "", "--dataset", "refcoco+", "--splitBy", "unc", "--refer_data_root", "/d",
            "--batch_size", "4", "--size", "320", "--epochs", "3", "--lr", "1e-4", "--weight_decay", "0.05",
            "--ck_bert", "minilm-l6",
            "--pretrained_swin_weights", "sw.pth", "--type", "testA", "--eval_mode", "cat",
            "--eval_resolution", "original", "--output", "out", "--model_id", "007", "--workers", "0",
            "--amp", "bf16", "--seed", "3", "--loss", "ce+dice",
        ]
    )  # fmt: skip
    assert cfg.is_frozen()
    assert (cfg.DATA.DATASET, cfg.DATA.SPLIT_BY, cfg.DATA.ROOT, cfg.DATA.SIZE, cfg.DATA.WORKERS) == (
        "refcoco+", "unc", "/d", 320, 0,
    )  # fmt: skip
    assert (cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.EPOCHS, cfg.TRAIN.LR, cfg.TRAIN.WEIGHT_DECAY) == (4, 3, 1e-4, 0.05)
    assert (cfg.TRAIN.AMP, cfg.TRAIN.SEED, cfg.TRAIN.LOSS) == ("bf16", 3, "ce+dice")
    assert (cfg.MODEL.TEXT.ENCODER, cfg.MODEL.PRETRAINED_SWIN) == ("minilm-l6", "sw.pth")
    assert (cfg.EVAL.SPLITS, cfg.EVAL.MODE, cfg.EVAL.RESOLUTION) == (["testA"], "cat", "original")
    assert (cfg.OUTPUT, cfg.MODEL_ID) == ("out", "007")  # a numeric-looking id stays a string
    assert cfg.EVAL.BATCH_SIZE == 1  # --batch_size is the training batch unless --eval


def test_eval_batch_size_from_batch_size_with_eval():
    """With --eval, --batch_size is the evaluation's batch (EVAL.BATCH_SIZE), named so in the log and in errors; the
    training's stays the config's. --eval_batch_size, when given, is the evaluation's."""
    default = cfg_of(["--type", "val"]).TRAIN.BATCH_SIZE  # (any flag: the paper's recipe, not the demo)
    a = cli.parse_args(["--eval", "--batch_size", "6", "--type", "val", "testB"])
    cfg = cli.config_from_args(a)
    assert cfg.EVAL.BATCH_SIZE == 6 and cfg.TRAIN.BATCH_SIZE == default != 6 and cfg.EVAL.SPLITS == ["val", "testB"]
    assert "EVAL.BATCH_SIZE=6" in cli.describe_config(a) and "TRAIN.BATCH_SIZE" not in cli.describe_config(a)
    from engine.config_check import validate_config

    with pytest.raises(ConfigError, match=r"^EVAL\.BATCH_SIZE must be >= 1, got 0$"):  # the checks main.py runs
        validate_config(cfg_of(["--eval", "--batch_size", "0"]))
    both = cfg_of(["--eval", "--batch_size", "6", "--eval_batch_size", "3"])
    assert (both.TRAIN.BATCH_SIZE, both.EVAL.BATCH_SIZE) == (6, 3)
    assert cfg_of(["--batch_size", "6"]).TRAIN.BATCH_SIZE == 6  # without --eval, the training's


def test_precedence_defaults_file_flags_opts(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("TRAIN:\n  EPOCHS: 7\n  BATCH_SIZE: 5\n  LR: 0.001\n")
    cfg = cfg_of(["--cfg_file", str(f), "--batch_size", "2", "--lr", "0.01", "--opts", "TRAIN.EPOCHS", "9"])
    assert cfg.TRAIN.LR == 0.01 and cfg.TRAIN.BATCH_SIZE == 2  # flags over the file
    assert cfg.TRAIN.EPOCHS == 9  # --opts over the file
    assert cfg.TRAIN.WEIGHT_DECAY == 1e-2  # untouched default
    assert cfg_of(["--cfg_file", str(f), "--opts", "TRAIN.LR", "0.5", "TRAIN.LR", "0.2"]).TRAIN.LR == 0.2  # the last


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "0.01", "--opts", "TRAIN.LR", "0.5"], "--lr and --opts TRAIN.LR both set TRAIN.LR: give it once"),
        (["--opts", "TRAIN.EPOCHS", "3", "DATA.ROOT", "x", "--refer_data_root", "y"],
         "--refer_data_root and --opts DATA.ROOT both set DATA.ROOT: give it once"),
        (["--eval", "--batch_size", "4", "--opts", "EVAL.BATCH_SIZE", "8"],  # --batch_size is the evaluation's here
         "--batch_size and --opts EVAL.BATCH_SIZE both set EVAL.BATCH_SIZE: give it once"),
    ],
)  # fmt: skip
def test_a_key_set_by_a_flag_and_by_opts_is_refused(argv, message):
    """Either would silently lose to the other: refused, naming both."""
    with pytest.raises(ValueError) as caught:
        cfg_of(argv)
    assert str(caught.value) == message
    assert cfg_of(["--batch_size", "4", "--opts", "EVAL.BATCH_SIZE", "8"]).EVAL.BATCH_SIZE == 8  # (training's batch)


def test_no_arguments_is_the_demo_anything_else_the_papers_recipe():
    a = cli.parse_args([])
    assert Path(a.cfg_file) == DEMO_CONFIG and not a.eval and not a.resume
    demo = cli.config_from_args(a)
    assert demo.DATA.DATASET == "synthetic" and demo.MODEL.TEXT.ENCODER == "minilm-l6"
    assert demo.EVAL.SPLITS == ["val", "testA", "testB"]
    assert "the built-in demo" in cli.describe_config(a) and "no overrides" in cli.describe_config(a)
    # the form a user types first trains the paper's model, not the demo's
    first = cli.parse_args(["--dataset", "refcoco", "--refer_data_root", "/data/refer"])
    paper = cli.config_from_args(first)
    swin = paper.MODEL.SWIN
    assert (swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS, swin.WINDOW_SIZE) == (128, [2, 2, 18, 2], [4, 8, 16, 32], 12)
    data = paper.DATA
    assert (data.SIZE, data.DATASET, data.SPLIT_BY, data.ROOT) == (480, "refcoco", "unc", "/data/refer")
    assert (paper.TRAIN.LR, paper.TRAIN.EPOCHS, paper.TRAIN.WEIGHT_DECAY, paper.TRAIN.LOSS) == (5e-5, 40, 0.01, "ce")
    assert (paper.MODEL.TEXT.ENCODER, paper.MODEL.TEXT.TRAIN_LAYERS) == ("pretrained/bert-base-uncased", 10)
    assert paper.MODEL.SWIN.STEM == "patch" and paper.MODEL.DECODER_HIDDEN == 0 and not paper.MODEL.TEXT.CACHE
    line = cli.describe_config(first)
    assert "configs/defaults.py (the paper's recipe)" in line and "DATA.ROOT='/data/refer'" in line
    assert cli.parse_args(["--eval"]).cfg_file is None  # only no argument at all is the demo


def test_bad_values():
    with pytest.raises(SystemExit):
        cli.get_parser().parse_args(["--eval_mode", "mean"])
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        cfg_of(["--cfg_file", "nope.yaml"])
    with pytest.raises(ConfigError, match=r"^unknown config key TRAIN\.NOT_A_KEY in the overrides \(TRAIN has AMP, "):
        cfg_of(["--opts", "TRAIN.NOT_A_KEY", "1"])
    odd = r"^--opts takes KEY VALUE pairs, got an odd number of items \(3\): TRAIN.LR 1e-4 TRAIN.EPOCHS$"
    with pytest.raises(ValueError, match=odd):  # the flags' own pairs not named
        cfg_of(["--output", "runs", "--lr", "1e-3", "--opts", "TRAIN.LR", "1e-4", "TRAIN.EPOCHS"])


@pytest.mark.parametrize(
    ("flag", "value", "edge", "message"),
    [
        ("--print_freq", "-1", "0", r"^--print_freq must be >= 0 \(0: no per-iteration log lines\), got -1$"),
        ("--stale_lock_minutes", "0", "0.01", r"^--stale_lock_minutes must be > 0, got 0.0$"),
    ],
)
def test_flag_values_out_of_range_refused(flag, value, edge, message):
    a = cli.parse_args([flag, value, "--opts", "MODEL.TEXT.ENCODER", "minilm-l6"])
    with pytest.raises(ValueError, match=message):
        cli.check_flags(a, cli.config_from_args(a))
    a = cli.parse_args([flag, edge, "--opts", "MODEL.TEXT.ENCODER", "minilm-l6"])
    cli.check_flags(a, cli.config_from_args(a))  # the edge of the range: accepted


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^checkpoint not found: .*weights.pth \(--pretrain\)$"),
        (b"", r"^cannot read checkpoint .*weights.pth: the file is empty \(--pretrain\)$"),
        (b"PK but not a zip" * 4, r"^cannot read checkpoint .*weights.pth: neither a PyTorch .*safetensors file \("),
    ],
)
def test_eval_checkpoint_refused_before_anything_is_written(tmp_path, content, message):
    """--eval of a missing, empty or foreign file is refused by the flag checks, which run before any folder is
    made; the file itself is left as it was."""
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    argv = ["--eval", "--pretrain", str(path), "--opts", "MODEL.TEXT.ENCODER", "minilm-l6"]
    a = cli.parse_args(argv)
    with pytest.raises(CheckpointError, match=message):
        cli.check_flags(a, cli.config_from_args(a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["weights.pth"])
    assert content is None or path.read_bytes() == content
