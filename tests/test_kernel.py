"""The applier against a real IPVS + nf_tables kernel: tests/guest/kernel_*.py, run inside the QEMU guest
(Debian's kernel, services.harness.guest).

The guest boots once for this module and runs every guest test; each is reported here as its own test.
If the guest cannot run, every test here FAILS with the reason (a kernel test is never silently skipped).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.guest_pytest import guest_results as run_guest

GUEST_DIR = Path(__file__).parent / "guest"
GUEST_FILES = sorted(GUEST_DIR.glob("kernel_*.py"))
NAMES = [n.name for f in GUEST_FILES for n in ast.parse(f.read_text()).body
         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")]
pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_results() -> dict[str, tuple[str, str]]:
    return run_guest(GUEST_FILES, "kernel_*.py")


@pytest.mark.parametrize("name", NAMES)
def test_in_real_kernel(guest_results: dict[str, tuple[str, str]], name: str) -> None:
    missing = ("missing", "the guest did not report it:\n" + guest_results["__log__"][1])
    outcome, detail = guest_results.get(name, missing)
    assert outcome == "passed", f"{name} {outcome} in the guest kernel:\n{detail}"
