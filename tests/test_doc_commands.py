"""Every command that README.md and docs/*.md show a user, parsed as the command itself parses it: a flag renamed or
removed, a choice that no longer exists, or a config key in ``--cfg_file`` / ``--opts`` that the config lost turns
this red. (Whether a documented command does what its text says is for the tests of that command.)"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import args as main_args
from configs import get_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# placeholders the docs use for what only the reader has; dropped before parsing ("python main.py ... --resume auto")
PLACEHOLDERS = {"...", "$ARGS"}
# where a command ends in the shell: what follows is another command or a redirection
SHELL_END = re.compile(r"\s(?:;|&&|\|\||\||&|>|2>)\s|;\s|\s&$")
# VAR=value words before a command
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


def _blocks(text: str) -> list[str]:
    """The lines of the fenced blocks (continuation lines joined, comments cut) and the inline code spans."""
    found = []
    for block in re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split("  #")[0].strip())
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) of every ``python ...`` / ``torchrun ...`` command in the docs: each of a line's shell
    commands, without the environment variables set before it."""
    out = []
    for path in DOCS:
        for line in _blocks(path.read_text(encoding="utf-8")):
            for command in SHELL_END.split(line):
                command = ENV_PREFIX.sub("", command.strip())
                if re.match(r"(python|torchrun) ", command):
                    out.append((path.relative_to(ROOT).as_posix(), command))
    return sorted(set(out))


# what a command runs -> the module whose get_parser() parses it (docs/*.py: the script itself, loaded by its path)
MODULES: dict[str, str] = {
    "main.py": "args",
    "tools/submit.py": "tools.submit",
    **{m: m for m in ("tools.demo", "tools.web", "tools.export", "tools.benchmark", "tools.bench_input",
                      "tests.mutation", "tools.synthetic")},  # fmt: skip
    **{f"docs/{s}.py": f"docs/{s}.py" for s in ("bench_official", "bench_floor", "bench_split", "bench_winograd",
                                                "bench_predict")},  # fmt: skip
}


@functools.cache  # each docs script loaded once, however many commands run it (parsing leaves a parser as it was)
def parser_of(target: str) -> argparse.ArgumentParser:
    assert target in MODULES, f"{target}: a documented command this test does not know: add it to MODULES"
    name = MODULES[target]
    if not name.endswith(".py"):
        return importlib.import_module(name).get_parser()
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_parser()


# not this repository's commands
FOREIGN = {"pytest", "ruff", "pip"}


def split_command(command: str) -> tuple[str, list[str]] | None:
    """(what runs, its arguments), or None for a command of another program or a torchrun fragment."""
    if command.startswith("python -c "):  # a Python one-liner, not a command of this repository
        return None
    words = [w for w in shlex.split(command) if w not in PLACEHOLDERS]
    if words[0] == "torchrun":  # torchrun's own options, then the script
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:
            return None
        words = ["python", *words[scripts[0] :]]
    target, rest = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    if target in FOREIGN or target.endswith(":"):  # "python -m tools.web: error: ...": an error message shown
        return None
    return target, rest


def check_command(target: str, argv: list[str]) -> None:
    """Parse ``argv`` with ``target``'s parser (``--help``: exits 0), then build the config it names."""
    parser = parser_of(target)
    if target == "tools/submit.py" and "--" in argv:  # its options, then main.py's
        argv, main_argv = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
        if main_argv:
            check_command("main.py", main_argv)
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 0
        return
    namespace = parser.parse_args(argv)
    if target == "main.py":
        main_args.config_from_args(namespace if argv else main_args.parse_args([]))
    elif getattr(namespace, "opts", None) or getattr(namespace, "cfg_file", None):
        get_config(namespace.cfg_file or None, list(namespace.opts or []))


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind() -> None:
    """The extraction finds what it checks: commands of main.py, torchrun, the tools and the docs' benchmarks."""
    targets = {split[0] for _, c in COMMANDS if (split := split_command(c))}
    assert {"main.py", "tools.demo", "tools.web", "tools.export", "tools.benchmark", "tools/submit.py",
            "docs/bench_official.py"} <= targets, targets  # fmt: skip
    assert any(c.startswith("torchrun --nproc_per_node") for _, c in COMMANDS)
    assert len(COMMANDS) >= 50


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # configs/*.yaml as the docs name them
    split = split_command(command)
    if split is None:
        return
    try:
        check_command(*split)
    except SystemExit as e:  # argparse's own message went to stderr
        pytest.fail(f"{doc}: `{command}` is refused by its parser (exit {e.code})")


def test_a_stale_flag_or_key_is_caught() -> None:
    """The checks above can fail: a renamed flag, an unknown choice and an unknown config key are each refused."""
    with pytest.raises(SystemExit):
        check_command("main.py", ["--cfg_file", "configs/demo.yaml", "--epoch", "3", "--no_such_flag"])
    with pytest.raises(SystemExit):
        check_command("tools.demo", ["--image", "x.jpg", "--text", "a", "--amp", "fp64"])
    with pytest.raises(Exception, match="NO_SUCH_KEY"):
        check_command("tools.benchmark", ["--opts", "MODEL.NO_SUCH_KEY", "1"])
    with pytest.raises(AssertionError, match="does not know"):
        check_command("tools.no_such_tool", [])
