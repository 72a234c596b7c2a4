"""Check which of a list of mutants a set of tests kills, in one process.

``mutmut run`` decides survivors; after writing tests for them, each new test has to be shown
to fail on its mutant and pass on the original code. Starting pytest once per mutant costs a
second or more of imports each on a loaded machine; mutmut's trampolined copy picks the mutant
from ``MUTANT_UNDER_TEST`` at call time, so one process can run the tests once per mutant.

    cd /tmp/pytunnel-mutation
    /tmp/venv-mut/bin/mutmut results | awk -F: '/survived/ {print $1}' > survivors.txt
    PYTHONPATH=$PWD/mutants/src:$PWD/mutants /tmp/venv-mut/bin/python \\
        tools/mutation/check_kills.py survivors.txt tests/test_mutation_kills.py -k relay

Prints ``KILLED <name>`` or ``SURVIVED <name>`` per mutant, then a run on the original code
(``original``), which must pass. Knows nothing about which test targets which mutant: select
with ``-k``.

``--fresh`` (first argument) runs each mutant in its own interpreter instead. A function that
runs while a module is imported (``messages._build_converter``, the validator factories) is
mutated only in a process that imports the module with the mutant already selected; in one
process the first run's import fixes it for every later run. ``mutmut run`` itself forks its
workers after the stats run imported everything, so it cannot kill such a mutant at all.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest


class _Outcome:
    """Counts failed and passed reports of one pytest run."""

    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failed += 1
        elif report.passed and report.when == "call":
            self.passed += 1


def _run(mutant: str, pytest_args: list[str]) -> _Outcome:
    os.environ["MUTANT_UNDER_TEST"] = mutant
    outcome = _Outcome()
    with contextlib.redirect_stdout(io.StringIO()):
        pytest.main(["-q", "-x", "-p", "no:cacheprovider", *pytest_args], plugins=[outcome])
    return outcome


def _run_fresh(mutant: str, pytest_args: list[str]) -> _Outcome:
    """One interpreter per run, so import-time code runs with the mutant selected."""
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    outcome = _Outcome()
    # pytest's exit status: 0 all passed, 1 some failed; anything else (collection or import
    # error, as a mutant that breaks an import causes) counts as failed too
    if done.returncode != 0:
        outcome.failed = 1
    return outcome


def main(argv: list[str]) -> int:
    runner = _run
    if argv and argv[0] == "--fresh":
        runner, argv = _run_fresh, argv[1:]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    for name in names:
        outcome = runner(name, argv[1:])
        verdict = "KILLED" if outcome.failed else "SURVIVED"
        print(f"{verdict} {name} ({outcome.passed} passed)", flush=True)
    original = runner("", argv[1:])  # no mutant: every selected test must pass
    print(f"original: {original.passed} passed, {original.failed} failed", flush=True)
    return 1 if original.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
