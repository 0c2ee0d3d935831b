"""A pytest plugin that ``tests/mutation.py`` loads into mutmut's runs: mutmut keeps no output of its runs of the
unmutated code (the coverage run, the clean run), so a test failing there is written, with its reason, to the file
that ``MUTATION_FAILURE_LOG`` names. Failures under a mutant are mutmut's kills and are not written."""

from __future__ import annotations

import os
from typing import Any

#: mutmut's ``MUTANT_UNDER_TEST`` in its runs of the unmutated code: "stats" (coverage), "" (clean)
UNMUTATED_RUNS = ("stats", "")


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get("MUTATION_FAILURE_LOG")
    run = os.environ.get("MUTANT_UNDER_TEST")
    if path and report.failed and run in UNMUTATED_RUNS:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"=== {report.nodeid} ({report.when}, mutmut run {run!r})\n{report.longreprtext[-4000:]}\n")
