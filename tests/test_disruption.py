"""Connection disruption when a node changes hands between kube-proxy and kipvs: tests/guest/disruption_*.py,
run inside the QEMU guest (one boot for this module), each reported here as its own test with the counts it
printed (resets, stalls, failed new connections, lost datagrams per moment). If the guest cannot run, every
test here FAILS with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.guest_pytest import guest_results as run_guest

GUEST_FILES = sorted((Path(__file__).parent / "guest").glob("disruption_*.py"))
NAMES = [n.name for f in GUEST_FILES for n in ast.parse(f.read_text()).body
         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")]
pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_results() -> dict[str, tuple[str, str]]:
    # -x: every moment starts from the state the one before left. Time-outs stretched x2 more than emulation
    # alone asks: the Python processes each moment starts (traffic, applier, pods) start slowly on a loaded
    # host, and a stall is then an echo later than 18 s, which a deleted service or lost binding still is.
    return run_guest(GUEST_FILES, "disruption_*.py", timeout=2100, progress=True, extra="-x",
                     env="KIPVS_GUEST_TIME_SCALE=6")


@pytest.mark.parametrize("name", NAMES)
def test_in_real_kernel(guest_results: dict[str, tuple[str, str]], name: str) -> None:
    missing = ("missing", "the guest did not report it:\n" + guest_results["__log__"][1])
    outcome, detail = guest_results.get(name, missing)
    print(detail)  # the counts per moment
    assert outcome == "passed", f"{name} {outcome} in the guest kernel:\n{detail}"
