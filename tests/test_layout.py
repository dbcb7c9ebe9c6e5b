"""The code's rooms (issue 25), checked on the source itself with the standard library's parser: no service
package imports another's, no import hides inside a function of the planner or the bus, history reads name
their reader, and every replay of the log goes through the one replay."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from services.planner.core import Planner
from services.planner.log_replay import feed, plan_events, replay
from shared.contract import events
from shared.messaging import bus
from tests import kube

ROOT = Path(__file__).resolve().parent.parent
# the services and the tools (not the test harnesses, which run everything), as folders
SERVICES = ("services/watcher", "services/planner", "services/applier", "services/tools", "services/auth")
HARNESSES = ("services/harness/demo", "services/harness/guest", "services/harness/simulator")


def package_of(folder: str) -> str:
    """The import name of a folder: pyproject's package-dir mapping when it has one, else the path itself."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    return next((name for name, path in mapping.items() if path == folder), folder.replace("/", "."))


def _modules(folder: Path) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(folder.rglob("*.py"))]


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_package_imports_another(service: str) -> None:
    assert (ROOT / service).is_dir(), service
    others = {package_of(folder) for folder in (*SERVICES, *HARNESSES) if folder != service}
    found = [f"{path.relative_to(ROOT)}: {name}" for path, tree in _modules(ROOT / service)
             for name in _imported(tree) if any(name == o or name.startswith(o + ".") for o in others)]
    assert not found, f"what two services need belongs under shared/: {found}"


@pytest.mark.parametrize("folder", ["services/planner", "shared/plan"])
def test_no_import_inside_a_function(folder: str) -> None:
    found = [f"{path.relative_to(ROOT)}:{inner.lineno} in {node.name}"
             for path, tree in _modules(ROOT / folder) for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             for inner in ast.walk(node) if isinstance(inner, ast.Import | ast.ImportFrom)]
    assert not found, found


def test_only_the_one_replay_feeds_the_core() -> None:
    """``Planner.handle`` is called by log_replay.py and by the active planner's consumer, nowhere else."""
    allowed = {ROOT / "services/planner/log_replay.py", ROOT / "services/planner/active.py"}
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in _modules(ROOT / "services")
             for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "handle"
             and isinstance(node.ctx, ast.Load) and path not in allowed
             and isinstance(node.value, ast.Attribute | ast.Name)
             and getattr(node.value, "attr", getattr(node.value, "id", "")) in ("planner", "view", "expected")]
    assert not found, f"replay through services.planner.log_replay: {found}"


def test_the_bus_has_no_hidden_reader() -> None:
    """Which stream and consumer name a history read uses is an argument, never a context variable."""
    tree = ast.parse((ROOT / "shared/messaging/bus.py").read_text(encoding="utf-8"))
    assert "contextvars" not in _imported(tree)
    reader = bus.LogReader("KIPVS_PLAN", via="KIPVS_PLAN_AUDIT")
    assert (reader.consumer_stream, bus.LogReader("KIPVS_KUBE").consumer_stream) == ("KIPVS_PLAN_AUDIT", "KIPVS_KUBE")
    assert bus.LogReader("KIPVS_PLAN", reader="reader-a").of("OBJ_X") == bus.LogReader("OBJ_X", reader="reader-a")


def _envelope(seq: int, obj: dict) -> events.Envelope:
    meta = obj["metadata"]
    record = events.KubeEvent(kind=obj["kind"], action="ADDED", namespace=meta.get("namespace", ""),
                              name=meta["name"], resource_version=str(seq), object=obj)
    return events.Envelope(id=f"kube/{seq}", time_ns=seq, producer="watcher", record=record)


def test_a_parked_record_only_moves_the_position_on() -> None:
    """A record the planner parked when it consumed it (``None``) is skipped by every replay, as the service
    skipped it: the deltas after it are the same as without it, and the core's position is past it."""
    svc = kube.service("web", cluster_ip="10.96.0.10")
    sl = kube.endpoint_slice("web-x", "web", [kube.endpoint("10.1.0.1")])
    with_gap = Planner()
    produced = list(replay(with_gap, [(1, _envelope(1, svc)), (2, None), (3, _envelope(3, sl))]))
    assert [seq for seq, _ in produced] == [1, 2, 3] and produced[1][1] == []
    assert with_gap.source_seq == 3
    plain = plan_events([_envelope(1, svc), _envelope(2, sl)], with_gap.config)
    assert with_gap.plans == plain.plans
    assert feed(Planner(), 7, None) == []


PATH_NAMED = re.compile(r"\b(?:services|shared)/[A-Za-z0-9_/]+\.py\b")


def test_every_source_path_named_in_docs_and_docstrings_exists() -> None:
    """A file moved by the regroup (issue 25) must not be named at its old place: every ``services/...py`` or
    ``shared/...py`` in README.md, docs/, deploy/ and the source exists."""
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deploy").rglob("*.yaml")]
    for folder in ("services", "shared", "tests"):
        texts += sorted((ROOT / folder).rglob("*.py"))
    stale = sorted({f"{p.relative_to(ROOT)}: {name}" for p in texts
                    for name in PATH_NAMED.findall(p.read_text(encoding="utf-8")) if not (ROOT / name).exists()})
    assert not stale, stale
