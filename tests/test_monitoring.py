"""deploy/monitoring, offline: the alerting rules are Prometheus rule groups (a schema check, and every
expression parsed by promql-parser, a binding of the Rust port of Prometheus's parser), the dashboard has
what Grafana needs, and every metric name either references is one the services really export, proved
by scraping the real services (tests/stack.py), and every label value they select on one those series carry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from services.harness.simulator.server import Simulator
from tests.stack import start_stack

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "monitoring" / "kipvs-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "kipvs-dashboard.json"
SCRAPE = ROOT / "deploy" / "monitoring" / "prometheus-scrape.yaml"

DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")  # model.ParseDuration
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; ValueError (the parser's message) when it is not PromQL."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def equality_matchers(expr: str) -> set[tuple[str, str, str]]:
    """(metric, label, value) of every ``label="value"`` an expression selects on."""
    found: set[tuple[str, str, str]] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            for m in node.matchers.matchers:
                if m.op == promql_parser.MatchOp.Equal:
                    found.add((node.name, m.name, m.value))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def rule_groups() -> list[dict[str, Any]]:
    """The rules file checked as Prometheus loads it (rulefmt): groups with unique names, each rule an
    alert or a record with a parseable expr, durations, string labels and annotations."""
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}, f"unknown top-level keys {set(doc) - {'groups'}}"
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules", "query_offset"}, group.keys()
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS, f"unknown keys {set(rule) - RULE_KEYS}"
            assert ("alert" in rule) != ("record" in rule), "a rule is an alert or a record"
            assert NAME.match(rule.get("alert") or rule["record"]), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    assert DURATION.match(rule[key]) and rule[key], f"{rule.get('alert')}: {key} {rule[key]!r}"
            for key in ("labels", "annotations"):
                for label, value in (rule.get(key) or {}).items():
                    assert NAME.match(label) and isinstance(value, str), f"{rule.get('alert')}: {key} {label}"
    return doc["groups"]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_alerting_rules_are_prometheus_rule_groups() -> None:
    found = alerts()
    for name in ("KipvsNodeBehind", "KipvsDriftRepairedRepeatedly", "KipvsParkedMessages",
                 "KipvsCalicoEndpointMarksExhausted", "KipvsNodePortRangeMismatch"):
        assert name in found, f"no {name} alert"
    for name, rule in found.items():
        assert metric_names(rule["expr"]), f"{name} selects no metric"
        assert rule.get("for"), f"{name} has no for: (one bad scrape would page)"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name


def test_the_rules_check_rejects_what_prometheus_would() -> None:
    """The checks above can fail: a PromQL error, an unknown key and a bad duration are each caught."""
    with pytest.raises(ValueError):
        metric_names("rate(kipvs_applier_parked_total[5m]")
    with pytest.raises(ValueError):
        metric_names("sum by (instance (kipvs_applier_plan_seq)")
    assert not DURATION.match("5 minutes") and not DURATION.match("5M") and DURATION.match("1h30m")
    assert metric_names('a_total / on(instance) group_left(node) b{x="1"} + count(c offset 5m)') == {
        "a_total", "b", "c"}


def test_dashboard_has_what_grafana_needs() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["title"] and board["uid"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "node"} <= variables
    for panel in board["panels"]:
        assert panel["type"] in ("timeseries", "stat", "gauge", "table", "bargauge"), panel["type"]
        assert panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), f"{panel['title']}: {target['expr']}"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("network programming", "apply duration", "behind", "drift", "parked", "marks", "node-port"):
        assert topic in titles, f"no panel about {topic}"


def test_scrape_config_keeps_kipvs_pods_and_names_appliers_by_node() -> None:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    relabel = job["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http",
            "action": "keep"} in relabel
    manifests = "".join(p.read_text() for p in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")))
    assert manifests.count("{name: http, containerPort:") == 4, "watcher, planner, auth and applier expose port http"


async def test_every_metric_the_rules_and_dashboard_use_is_exported(nats_url: str, sim: Simulator,
                                                                    tmp_path: Path) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        exported: dict[str, list[dict[str, str]]] = {}
        for service in ("watcher", "planner", "applier"):
            scrape = await stack.scrape(service)
            for name, samples in scrape.samples.items():
                exported.setdefault(name, []).extend(labels for labels, _ in samples)
    finally:
        await stack.close()
    exprs = [rule["expr"] for rule in alerts().values()] + dashboard_exprs()
    used = {name for expr in exprs for name in metric_names(expr)} - set(SCRAPE_SERIES)
    assert used, "nothing referenced"
    assert not used - set(exported), f"referenced but not exported: {sorted(used - set(exported))}"
    # a label value selected on (code="nodeport-outside-ranges", reason="gone") is one the series carry
    for name, label, value in {m for expr in exprs for m in equality_matchers(expr)}:
        if name in SCRAPE_SERIES:
            assert value in scrape_label_values()[label], f'{name}{{{label}="{value}"}}: not what the scrape gives'
            continue
        assert any(labels.get(label) == value for labels in exported[name]), f'{name}{{{label}="{value}"}}'


# Series Prometheus makes for each target itself (not exported by the services), selected on by the labels
# prometheus-scrape.yaml gives: job (its job_name) and service (the pod's app.kubernetes.io/name).
SCRAPE_SERIES = ("up",)


def scrape_label_values() -> dict[str, set[str]]:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    apps = {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text())
            if doc and "template" in (doc.get("spec") or {})}
    return {"job": {job["job_name"]}, "service": apps}
