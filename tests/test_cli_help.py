"""``--help`` of the inference and export commands, as a user types them: each exits 0 and states what the command
needs and the defaults it would use (argparse formats help only when asked: a stray '%' breaks it only there); what
the commands import as they start."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from configs import DEMO_CONFIG, get_config
from data.synthetic import generate
from models.official import PACKAGINGS
from tools.export import FORMATS
from tools.synthetic import get_parser as synthetic_parser
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
    assert "Segment what each expression refers to in an image: writes the overlay PNG" in text
    assert "(--image IMAGE | --example N)" in text  # one of the two, required
    assert "default: the demo run's best.pth" in text and "--text TEXT" in text


def test_web_help_states_the_upload_limits_it_enforces() -> None:
    text = _help("tools.web")
    assert "A web page that segments what each typed expression refers to in an uploaded image." in text
    usage = text.split(" options:")[0]
    assert "--checkpoint CHECKPOINT" in usage and "[--checkpoint" not in usage  # required
    limits = Limits()
    for flag, default in [
        ("--max_megabytes", limits.max_bytes / 1e6),
        ("--max_megapixels", limits.max_pixels / 1e6),
        ("--max_expressions", limits.max_expressions),
        ("--port", 7860),
        ("--host", "127.0.0.1"),
        ("--idle_seconds", limits.idle_seconds),
    ]:
        described = text.split(f" {flag} {flag[2:].upper()} ", 1)[1].split(" --", 1)[0]  # the flag's own help
        assert f"default: {default}" in described, (flag, described)


def test_export_help_lists_formats_and_packagings() -> None:
    text = _help("tools.export")
    assert "{" + ",".join(FORMATS) + "}" in text and "{" + ",".join(PACKAGINGS) + "}" in text
    assert "[--force] checkpoint " in text  # the usage ends with the positional checkpoint


@pytest.mark.parametrize(
    "module", ["args", "tools.synthetic", "tools.demo", "tools.web", "tools.export", "tools.benchmark",
               "tools.bench_input", "tools.submit"],
)  # fmt: skip
def test_every_option_says_what_it_does(module: str) -> None:
    """Each command line's options all carry a help line (the hidden ones aside): --help leaves none unexplained."""
    parser = importlib.import_module(module).get_parser()
    unexplained = [a.option_strings or [a.dest] for a in parser._actions if not (a.help and a.help.strip())]
    assert unexplained == [], unexplained
    hidden = [a.option_strings for a in parser._actions if a.help == argparse.SUPPRESS]
    assert all(name.startswith("--_") for names in hidden for name in names)  # only internal ones are hidden


def test_the_synthetic_command_lines_defaults_are_generates() -> None:
    """``python -m tools.synthetic`` without options writes what ``generate`` writes without arguments."""
    assert synthetic_parser().description == "Write the synthetic REFER-format referring segmentation dataset."
    given = vars(synthetic_parser().parse_args(["--root", "x"]))
    defaults = {k: p.default for k, p in inspect.signature(generate).parameters.items() if p.default is not p.empty}
    shared = given.keys() & defaults.keys()
    assert shared >= {"num_images", "seed", "min_size", "max_size", "min_objects", "max_objects", "max_expressions",
                      "workers"}  # fmt: skip
    assert {k: given[k] for k in shared} == {k: defaults[k] for k in shared}
    # and where `python main.py` (the demo) looks for it
    assert synthetic_parser().parse_args([]).root == get_config(DEMO_CONFIG).DATA.ROOT == "data/synthetic_refer"


_RUN_BY_RUN_CLI = sorted(
    p.stem for p in (ROOT / "tools").glob("*.py") if "run_cli(" in p.read_text() and p.stem != "cli"
)


def test_the_commands_run_by_run_cli_are_found() -> None:
    assert {"demo", "web", "export", "synthetic", "benchmark", "bench_input"} <= set(_RUN_BY_RUN_CLI)


@pytest.mark.parametrize("stem", _RUN_BY_RUN_CLI)
def test_help_names_debug_and_the_command_as_typed(stem: str) -> None:
    """``run_cli`` takes ``--debug`` out before the parser sees it: only the epilog tells a user it exists; and the
    usage line names the command as it is typed, as its error lines do."""
    parser = importlib.import_module(f"tools.{stem}").get_parser()
    assert parser.prog == f"python -m tools.{stem}"
    text = " ".join(parser.format_help().split())
    assert text.endswith("--debug: the Python traceback of an error instead of its one line.")


def test_the_commands_start_without_dynamo_or_matplotlib() -> None:
    """Seconds of every process's start-up, a --help and a mistake's one line included: ``torch._dynamo`` (which
    ``torch.compiler.disable`` imports where it decorates) and matplotlib (the notebooks' figures; the demo and the
    web page draw with Pillow). Neither is imported by the commands, nor by an eager Winograd convolution (only a
    compiled one needs dynamo), which gives F.conv2d's values."""
    code = (
        "import sys, torch, torch.nn.functional as F, main, tools.demo, tools.web, tools.export, tools.benchmark\n"
        "from models.winograd import winograd_conv3x3\n"
        "x, w = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 3, 3, dtype=torch.float64)\n"
        "torch.testing.assert_close(winograd_conv3x3(x, w), F.conv2d(x, w, padding=1))\n"
        "print(sorted(m for m in ('torch._dynamo', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
