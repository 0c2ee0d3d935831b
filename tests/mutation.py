"""Sampled mutation testing of the core modules with mutmut (pinned in requirements-dev.txt); not part of CI.

    python -m tests.mutation                      # 8 mutants per module group, seed 0, 2 workers
    python -m tests.mutation --per-group 20 --seed 1 --groups models losses
    python -m tests.mutation --only utils.losses.x_dice_loss__mutmut_9   # re-run named mutants, current tests

The committed tree (tracked and untracked, not ignored files) is copied to ``--workdir`` and mutmut runs there
(``[tool.mutmut]`` in pyproject.toml: which files, which tests), so the checkout is never touched. mutmut writes
every mutant of the core modules, a random sample of each group is drawn (seeded: the same sample for the same
code), and mutmut runs only those, each against the tests that reach the mutated function. Prints and writes
``<workdir>/mutation_summary.json``: per group the sampled mutants, killed, survived, and the diff of each
survivor. docs/mutation.md has the last scores and the survivors judged equivalent. mutmut stops when a test
fails on the unmutated code; the error then names it (its reason: ``<workdir>/unmutated_failures.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: module groups reported apart, by path prefix of the mutated file (the first match wins)
GROUPS: dict[str, tuple[str, ...]] = {
    "weights": ("models/weights.py",),
    "models": ("models/",),
    "data": ("data/transforms.py", "data/dataset.py", "data/image_io.py"),
    "refer": ("refer/",),
    "engine": ("engine/",),
    "metrics": ("utils/metrics.py",),
    "losses": ("utils/losses.py",),
    "checkpoint": ("utils/checkpoint.py",),
    "checks": ("data/checks.py", "data/controls.py"),
    "synthetic": ("data/synthetic",),
    "infra": (
        "utils/amp.py", "utils/atomic.py", "utils/lock.py", "utils/launcher.py", "utils/distributed.py",
        "utils/allocator.py", "utils/machine.py", "utils/stopwatch.py",
    ),  # fmt: skip
    "web": ("tools/web",),  # the server and its uploads, apart from the other tools
    "tools": ("tools/",),
}
KILLED = {"killed", "caught by type check"}


def copy_tree(workdir: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored) into a fresh ``workdir``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, workdir / name)


def generate_mutants(workdir: Path) -> dict[str, str]:
    """mutmut's mutants of every configured file, written under ``<workdir>/mutants``: {mutant name: file}."""
    code = (
        "import os\n"
        "from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths\n"
        "from mutmut.mutation.trampoline import set_mutant_under_test\n"
        "set_mutant_under_test('mutant_generation')\n"
        "os.makedirs('mutants', exist_ok=True)\n"
        "copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(2)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    names = {}
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(workdir / "mutants"))[: -len(".meta")]
        names.update({name: source for name in json.loads(meta.read_text())["exit_code_by_key"]})
    return names


def group_of(source: str) -> str | None:
    return next((g for g, prefixes in GROUPS.items() if source.startswith(prefixes)), None)


def sample(names: dict[str, str], per_group: int, seed: int, groups: list[str]) -> dict[str, list[str]]:
    by_group: dict[str, list[str]] = {g: [] for g in groups}
    for name, source in sorted(names.items()):
        g = group_of(source)
        if g in by_group:
            by_group[g].append(name)
    rng = random.Random(seed)
    return {g: sorted(rng.sample(v, min(per_group, len(v)))) for g, v in by_group.items()}


def statuses(workdir: Path) -> dict[str, str]:
    """Every mutant's status as mutmut recorded it (killed, survived, timeout, no tests, not checked, ...)."""
    sys.path.insert(0, str(workdir))
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in (workdir / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lavt-mutation"))
    p.add_argument("--per-group", type=int, default=8, help="mutants sampled per module group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    p.add_argument("--only", nargs="+", default=None, help="re-run these mutants in the existing workdir")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)

    if args.only:  # the tests as they are now (new tests get their coverage measured), the mutants as generated
        for dest in (args.workdir / "tests", args.workdir / "mutants" / "tests"):
            shutil.copytree(REPO / "tests", dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        chosen = {"named": list(args.only)}
    else:
        copy_tree(args.workdir)
        names = generate_mutants(args.workdir)
        chosen = sample(names, args.per_group, args.seed, args.groups)
        print(
            f"{len(names)} mutants; sampled {sum(map(len, chosen.values()))} ({args.per_group} a group, seed "
            f"{args.seed})",
            flush=True,
        )
    # the tests' temporary folders (runs, datasets, checkpoints: GBs over a round) in one place, removed after it:
    # pytest's own clean-up keeps those of the mutants it cannot lock, and a full disk fails the clean run
    temp_root = args.workdir / "pytest-tmp"
    shutil.rmtree(temp_root, ignore_errors=True)
    temp_root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTEST_DEBUG_TEMPROOT"] = str(temp_root)
    # tests failing on the unmutated code are logged (tests/mutation_log.py), from a folder holding that plugin only:
    # the workdir's own copies of the packages must not shadow the mutated ones
    plugins, failures = args.workdir / "plugins", args.workdir / "unmutated_failures.txt"
    plugins.mkdir(exist_ok=True)
    shutil.copyfile(REPO / "tests" / "mutation_log.py", plugins / "mutation_failure_log.py")
    failures.unlink(missing_ok=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugins), env.get("PYTHONPATH")]))
    env["PYTEST_PLUGINS"] = ",".join(filter(None, [env.get("PYTEST_PLUGINS"), "mutation_failure_log"]))
    env["MUTATION_FAILURE_LOG"] = str(failures)
    todo = [n for names in chosen.values() for n in names]
    try:
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *todo],
                             cwd=args.workdir, env=env, capture_output=True, text=True)  # fmt: skip
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    (args.workdir / "mutmut_run.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        free_gb = shutil.disk_usage(args.workdir).free / 1e9
        failed = [line[4:].split(" (")[0] for line in _lines(failures) if line.startswith("=== ")]
        where = f"tests failing on the unmutated code: {', '.join(failed)} (reasons in {failures}); " if failed else ""
        sys.exit(f"mutmut failed (exit {run.returncode}); {where}see {args.workdir / 'mutmut_run.log'} "
                 f"({free_gb:.1f} GB free on its disk now: a full disk fails mutmut's clean run)")  # fmt: skip
    status = statuses(args.workdir)
    summary: dict = {"groups": {}, "survivors": {}}
    for g, names in chosen.items():
        killed = sum(status[n] in KILLED for n in names)
        summary["groups"][g] = {"sampled": len(names), "killed": killed,
                                "score": round(100 * killed / len(names), 1) if names else None,
                                "other": {n: status[n] for n in names if status[n] not in KILLED}}  # fmt: skip
        for n in names:
            if status[n] not in KILLED:
                shown = subprocess.run([sys.executable, "-m", "mutmut", "show", n], cwd=args.workdir, env=env,
                                       capture_output=True, text=True).stdout  # fmt: skip
                summary["survivors"][n] = shown
    (args.workdir / "mutation_summary.json").write_text(json.dumps(summary, indent=2))
    for g, s in summary["groups"].items():
        print(f"{g:12s} {s['killed']:3d} / {s['sampled']:3d} killed  ({s['score']}%)")
    for n, diff in summary["survivors"].items():
        print(f"\n--- {status[n]}: {n}\n{diff}")
    return summary


if __name__ == "__main__":
    main()
