"""Running a set of guest test files in one boot of the QEMU guest and reading their results back, for the
host test modules that report each guest test as their own (tests/test_kernel.py, tests/test_disruption.py).

If the guest cannot run, the caller's tests FAIL with the reason (a kernel test is never silently skipped).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from services.harness.guest.vm import GuestUnavailable, run_in_guest


def guest_results(files: list[Path], pattern: str, timeout: float = 1800, progress: bool = False,
                  extra: str = "", env: str = "") -> dict[str, tuple[str, str]]:
    """test name -> (passed | failed | skipped, detail) for every test in ``files`` (whose names match
    ``pattern``) run by pytest in one guest boot; ``__log__`` holds the end of the guest's output.
    ``progress``: pytest's output (``-s``: what the tests print) goes to the console as it comes, so a
    guest that runs out of time still shows how far it got; ``extra``: more pytest options; ``env``:
    ``NAME=value`` words for the guest's pytest."""
    paths = " ".join(str(f) for f in files)
    output = "2>&1 | tee /run/tmp/pytest.log" if progress else "> /run/tmp/pytest.log 2>&1"
    command = (f"{env} python -m pytest -q -p no:cacheprovider -o junit_logging=system-out -o python_files='{pattern}' "
               f"{'-s ' if progress else ''}{extra} {paths} "
               f"--junitxml=/run/tmp/junit.xml {output}; "
               "echo JUNIT-BEGIN; cat /run/tmp/junit.xml; echo; echo JUNIT-END; tail -40 /run/tmp/pytest.log")
    try:
        # progress: each console line also printed here as it comes (seen with pytest -s)
        run = run_in_guest(command, timeout=timeout, memory="1536M",
                           on_line=(lambda line: print(line, flush=True)) if progress else None)
    except GuestUnavailable as exc:
        pytest.fail(f"KERNEL TESTS COULD NOT RUN: {exc}", pytrace=False)
    match = re.search(r"JUNIT-BEGIN\n(.*?)\nJUNIT-END", run.output, re.S)
    if not match or not match.group(1).strip():
        pytest.fail(f"KERNEL TESTS COULD NOT RUN: the guest produced no results:\n{run.output[-4000:]}", pytrace=False)
    results: dict[str, tuple[str, str]] = {}
    for case in ET.fromstring(match.group(1)).iter("testcase"):
        # `is not None`, never truthiness: an Element without children is falsy.
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        out = case.find("system-out")
        printed = out.text or "" if out is not None else ""
        if problem is not None:
            results[case.get("name", "")] = ("failed", (problem.get("message") or "") + "\n" + (problem.text or "")
                                             + printed)
        elif skipped is not None:
            results[case.get("name", "")] = ("skipped", skipped.get("message") or "")
        else:
            results[case.get("name", "")] = ("passed", printed)
    results["__log__"] = ("log", run.output[-4000:])
    return results
