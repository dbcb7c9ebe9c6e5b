"""deploy/monitoring proven by Prometheus's own promtool (Debian's ``prometheus`` package, installed by
``make debs``): the rules load (``promtool check rules``), every alert fires when it should and stays quiet
when it should not (``promtool test rules`` on deploy/monitoring/tests/kipvs-alerts.test.yaml), those
tests catch a broken rule, and the scrape job is a valid Prometheus configuration (``promtool check
config``). Without promtool these tests fail, saying how to install it: never skipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "kipvs-alerts.yaml"
RULE_TESTS = MONITORING / "tests" / "kipvs-alerts.test.yaml"
SCRAPE = MONITORING / "prometheus-scrape.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run `make debs` (Debian's prometheus package ships it)")
    return found


def run(promtool: str, *argv: str, cwd: Path = ROOT) -> tuple[int, str]:
    done = subprocess.run([promtool, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def alert_names() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def test_the_rules_load_in_prometheus(promtool: str) -> None:
    code, out = run(promtool, "check", "rules", str(RULES))
    assert code == 0 and "SUCCESS" in out, out


def test_every_alert_fires_when_it_should_and_stays_quiet_when_it_should_not(promtool: str) -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    evals = [e for t in tests for e in t["alert_rule_test"]]
    fires = {e["alertname"] for e in evals if e.get("exp_alerts")}
    quiet = {e["alertname"] for e in evals if not e.get("exp_alerts")}
    assert alert_names() - fires == set(), f"alerts never shown firing: {sorted(alert_names() - fires)}"
    assert alert_names() - quiet == set(), f"alerts never shown quiet: {sorted(alert_names() - quiet)}"
    code, out = run(promtool, "test", "rules", str(RULE_TESTS))
    assert code == 0 and "SUCCESS" in out, out


@pytest.mark.parametrize(("alert", "good", "broken"), [
    ("KipvsPlannerBehind", "kipvs_planner_behind_seconds > 120", "kipvs_planner_behind_seconds > 1200"),
    ("KipvsNodeAheadOfPlan", "unless on (instance) (kipvs_planner_leader_election_master_status == 0)))",
     "))"),
    ("KipvsApplierTargetDown", 'up{job="kipvs", service="kipvs-applier"} == 0',
     'up{job="kipvs", service="kipvs-applier"} < 1 or up{job="kipvs"} == 0'),
])
def test_the_rule_tests_catch_a_broken_rule(promtool: str, tmp_path: Path, alert: str, good: str,
                                            broken: str) -> None:
    """The same tests against a copy with one rule broken (a threshold, the standby planner's exclusion,
    a selector that takes in other services' targets) fail, naming that alert."""
    text = RULES.read_text()
    assert text.count(good) == 1, good
    (tmp_path / "kipvs-alerts.yaml").write_text(text.replace(good, broken))
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    code, out = run(promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert code != 0 and f"alertname: {alert}," in out, out


def test_the_scrape_job_is_a_valid_prometheus_configuration(promtool: str, tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery (its promtool refuses
    ``kubernetes_sd_configs`` as an unknown field), so promtool checks the job with that block swapped for
    a static target, everything else as shipped (relabelings, regexes, names); the discovery block itself
    is checked here against Prometheus's kubernetes_sd_config fields (role pod, namespaces.names)."""
    doc = yaml.safe_load(SCRAPE.read_text())
    (job,) = doc["scrape_configs"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd == {"role": "pod", "namespaces": {"names": ["kipvs-system"]}}, sd
    job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(doc))
    code, out = run(promtool, "check", "config", str(config))
    assert code == 0 and "SUCCESS" in out, out
    names = _app_names()
    assert {"kipvs-watcher", "kipvs-planner", "kipvs-applier"} <= names, names
    assert 'service="kipvs-applier"' in RULES.read_text()  # the applier-down alerts select on the relabeling


def _app_names() -> set[str]:
    names: set[str] = set()
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            labels: Any = ((((doc or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")
            if labels and "app.kubernetes.io/name" in labels:
                names.add(labels["app.kubernetes.io/name"])
    return names
