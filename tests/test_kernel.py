"""The applier against a real IPVS + nf_tables kernel: tests/guest/kernel_*.py, run inside the QEMU guest
(Debian's kernel, kipvs.guest).

The guest boots once for this module and runs every guest test; each is reported here as its own test.
If the guest cannot run, every test here FAILS with the reason (a kernel test is never silently skipped).
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kipvs.guest.vm import GuestUnavailable, run_in_guest

GUEST_DIR = Path(__file__).parent / "guest"
GUEST_FILES = sorted(GUEST_DIR.glob("kernel_*.py"))
NAMES = [n.name for f in GUEST_FILES for n in ast.parse(f.read_text()).body
         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")]
pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_results() -> dict[str, tuple[str, str]]:
    files = " ".join(str(f) for f in GUEST_FILES)
    command = (f"python -m pytest -q -p no:cacheprovider -o python_files='kernel_*.py' {files} "
               "--junitxml=/run/tmp/junit.xml > /run/tmp/pytest.log 2>&1; "
               "echo JUNIT-BEGIN; cat /run/tmp/junit.xml; echo; echo JUNIT-END; tail -40 /run/tmp/pytest.log")
    try:
        run = run_in_guest(command, timeout=1800, memory="1536M")
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
        if problem is not None:
            results[case.get("name", "")] = ("failed", (problem.get("message") or "") + "\n" + (problem.text or ""))
        elif skipped is not None:
            results[case.get("name", "")] = ("skipped", skipped.get("message") or "")
        else:
            results[case.get("name", "")] = ("passed", "")
    results["__log__"] = ("log", run.output[-4000:])
    return results


@pytest.mark.parametrize("name", NAMES)
def test_in_real_kernel(guest_results: dict[str, tuple[str, str]], name: str) -> None:
    missing = ("missing", "the guest did not report it:\n" + guest_results["__log__"][1])
    outcome, detail = guest_results.get(name, missing)
    assert outcome == "passed", f"{name} {outcome} in the guest kernel:\n{detail}"
