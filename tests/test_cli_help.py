"""``--help`` of the inference and export commands, as a user types them: each exits 0 and states what the command
needs and the defaults it would use (argparse formats help only when asked: a stray '%' breaks it only there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from models.official import PACKAGINGS
from tools.export import FORMATS
from tools.web import Limits

ROOT = Path(__file__).resolve().parents[1]


def _help(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
    assert text.startswith(f"usage: python -m {module} ")
    return text


def test_demo_help_names_the_two_sources_and_the_default_checkpoint() -> None:
    text = _help("tools.demo")
    assert "(--image IMAGE | --example N)" in text  # one of the two, required
    assert "default: the demo run's best.pth" in text and "--text TEXT" in text


def test_web_help_states_the_upload_limits_it_enforces() -> None:
    text = _help("tools.web")
    usage = text.split(" options:")[0]
    assert "--checkpoint CHECKPOINT" in usage and "[--checkpoint" not in usage  # required
    limits = Limits()
    for flag, default in [
        ("--max_megabytes", limits.max_bytes / 1e6),
        ("--max_megapixels", limits.max_pixels / 1e6),
        ("--max_expressions", limits.max_expressions),
        ("--port", 7860),
        ("--host", "127.0.0.1"),
    ]:
        described = text.split(f" {flag} {flag[2:].upper()} ", 1)[1].split(" --", 1)[0]  # the flag's own help
        assert f"default: {default}" in described, (flag, described)


def test_export_help_lists_formats_and_packagings() -> None:
    text = _help("tools.export")
    assert "{" + ",".join(FORMATS) + "}" in text and "{" + ",".join(PACKAGINGS) + "}" in text
    assert "[--force] checkpoint " in text  # the usage ends with the positional checkpoint
