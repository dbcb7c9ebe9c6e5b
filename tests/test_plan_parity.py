"""Parity found in the field (issue 12): cases users reported against kube-proxy's IPVS mode and Calico,
each as a kind of input with its variants, checked through ``kipvs plan`` (and, where the behaviour is
live, through the planner's incremental core against planning from scratch)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from services.planner.core import Planner
from services.planner.log_replay import plan_events, read_events
from shared.service.cli import main as kipvs
from tests import kube
from tests.test_plan_rules import added, slice_, web

NODES3 = (kube.node("node-1", "192.0.2.1", zone="z1"), kube.node("node-2", "192.0.2.2", zone="z1"),
          kube.node("node-3", "192.0.2.3", zone="z2"))
STALE = kube.endpoint("10.244.2.7", "node-2", ready=False, serving=False, terminating=True)
SUCCESSOR = kube.endpoint("10.244.2.7", "node-3")


def reals(lines: list[str], vip: str) -> list[str]:
    return [line.split(" -r ")[1].split(" ")[0] for line in lines if line.startswith(f"-a -t {vip} ")]


# --- 1. one address listed twice with different conditions --------------------------------------


@pytest.mark.parametrize("order", [(STALE, SUCCESSOR), (SUCCESSOR, STALE)], ids=["stale-first", "successor-first"])
def test_duplicate_address_in_one_slice_the_non_terminating_copy_wins(plan, order) -> None:
    svc = web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
              externalTrafficPolicy="Local")
    events = added(*NODES3, svc, slice_(*order))
    for node in ("node-1", "node-2", "node-3"):
        assert reals(plan(events, node), "10.96.0.10:80") == ["10.244.2.7:8080"], node
    # The hairpin entry and the Local bookkeeping follow the winner's node (node-3), not the stale one.
    on_3, on_2 = plan(events, "node-3", "json"), plan(events, "node-2", "json")
    assert on_3["ipsets"]["KUBE-LOOP-BACK"] == ["10.244.2.7,tcp:8080,10.244.2.7"]
    assert on_2["ipsets"]["KUBE-LOOP-BACK"] == []
    assert reals(plan(events, "node-3"), "192.0.2.3:30080") == ["10.244.2.7:8080"], "local endpoint on node-3"


@pytest.mark.parametrize("names", [("a-old", "b-new"), ("b-old", "a-new")], ids=["stale-slice-first", "stale-last"])
def test_duplicate_address_across_two_slices_in_any_order(plan, names) -> None:
    stale, fresh = slice_(STALE, name=names[0]), slice_(SUCCESSOR, name=names[1])
    for objs in itertools.permutations([stale, fresh]):
        events = added(*NODES3, web(), *objs)
        assert reals(plan(events, "node-1"), "10.96.0.10:80") == ["10.244.2.7:8080"]
        assert plan(events, "node-3", "json")["ipsets"]["KUBE-LOOP-BACK"] == ["10.244.2.7,tcp:8080,10.244.2.7"]


def test_duplicate_address_ready_beats_not_ready_and_the_choice_is_order_free() -> None:
    not_ready = kube.endpoint("10.244.2.7", "node-2", ready=False, serving=False)
    for a, b in itertools.permutations([not_ready, SUCCESSOR]):
        planner = _plan(added(*NODES3, web(), slice_(a, name="s1"), slice_(b, name="s2")))
        endpoint = planner.plans["default/web"].ports[0].endpoints
        assert [(e.ip, e.node, e.ready) for e in endpoint] == [("10.244.2.7", "node-3", True)]


def test_duplicate_resolved_live_when_the_stale_copy_goes() -> None:
    """Incremental planning (one event at a time) agrees with planning the final state from scratch."""
    steps = added(*NODES3, web(), slice_(STALE, name="s1"), slice_(SUCCESSOR, name="s2"))
    steps.append({"type": "DELETED", "object": slice_(SUCCESSOR, name="s2")})
    live = _plan(steps)
    scratch = _plan(added(*NODES3, web(), slice_(STALE, name="s1")))
    assert live.plans == scratch.plans
    # Only the stale copy left: not ready anywhere, not serving: no real server.
    assert live.plans["default/web"].ports[0].endpoints[0].terminating


# --- 2. both traffic policies Local on a Service reachable from outside ------------------------------


def test_both_policies_local_with_a_node_port_fall_back_to_cluster_endpoints(plan) -> None:
    svc = web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
              internalTrafficPolicy="Local", externalTrafficPolicy="Local")
    eps = slice_(kube.endpoint("10.244.1.5", "node-1"), kube.endpoint("10.244.2.5", "node-2"))
    on_3 = plan(added(*NODES3, svc, eps), "node-3")
    both = ["10.244.1.5:8080", "10.244.2.5:8080"]
    assert reals(on_3, "10.96.0.10:80") == both, "UsesClusterEndpoints: externally accessible"
    assert reals(on_3, "192.0.2.3:30080") == both
    on_1 = plan(added(*NODES3, svc, eps), "node-1")
    assert reals(on_1, "10.96.0.10:80") == ["10.244.1.5:8080"] and reals(on_1, "192.0.2.1:30080") == [
        "10.244.1.5:8080"], "a node with a local pod keeps it"


def test_internal_local_cluster_ip_only_stays_empty_without_a_local_pod(plan) -> None:
    svc = web(internalTrafficPolicy="Local")
    eps = slice_(kube.endpoint("10.244.1.5", "node-1"))
    assert plan(added(*NODES3, svc, eps), "node-3") == ["-A -t 10.96.0.10:80 -s rr"]


def test_internal_local_with_a_load_balancer_ip_uses_cluster_endpoints(plan) -> None:
    svc = web(type="LoadBalancer", internalTrafficPolicy="Local",
              ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    lines = plan(added(*NODES3, svc, slice_(kube.endpoint("10.244.1.5", "node-1"))), "node-3")
    assert reals(lines, "10.96.0.10:80") == ["10.244.1.5:8080"]
    assert reals(lines, "203.0.113.9:80") == ["10.244.1.5:8080"]


# --- 3. healthCheckNodePort ---------------------------------------------------------------------


def _lb_local(health_check: int | None = 32210, **spec: Any) -> dict:
    svc = web(type="LoadBalancer", externalTrafficPolicy="Local",
              ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}], **spec)
    if health_check is not None:
        svc["spec"]["healthCheckNodePort"] = health_check
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    return svc


def test_health_check_node_port_is_in_its_set_on_every_node(plan) -> None:
    events = added(*NODES3, _lb_local(), slice_(kube.endpoint("10.244.1.5", "node-1")))
    for node in ("node-1", "node-3"):  # with and without a local endpoint
        assert plan(events, node, "json")["ipsets"]["KUBE-HEALTH-CHECK-NODE-PORT"] == ["32210"], node
    cluster_policy = _lb_local()
    cluster_policy["spec"]["externalTrafficPolicy"] = "Cluster"  # only ETP=Local LoadBalancers have one
    assert plan(added(*NODES3, cluster_policy), "node-1", "json")["ipsets"]["KUBE-HEALTH-CHECK-NODE-PORT"] == []


def test_health_check_node_port_that_is_not_a_port_is_a_warning(plan) -> None:
    state = plan(added(*NODES3, _lb_local(70000)), "node-1", "json")
    assert [w["code"] for w in state["warnings"]] == ["invalid-service"]
    assert "spec.healthCheckNodePort" in state["warnings"][0]["message"]


# --- 4. node hints (trafficDistribution: PreferSameNode) ---------------------------------------


def _hinted(ip: str, node: str, zone: str, for_nodes: list[str] | None, for_zones: list[str] | None) -> dict:
    ep = kube.endpoint(ip, node, zone=zone)
    hints: dict[str, Any] = {}
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if hints:
        ep["hints"] = hints
    return ep


def test_node_hints_keep_traffic_on_the_node(plan) -> None:
    eps = slice_(_hinted("10.244.1.5", "node-1", "z1", ["node-1"], ["z1"]),
                 _hinted("10.244.2.5", "node-2", "z1", ["node-2"], ["z1"]),
                 _hinted("10.244.3.5", "node-3", "z2", ["node-3"], ["z2"]))
    events = added(*NODES3, web(), eps)
    for node, ip in (("node-1", "10.244.1.5"), ("node-2", "10.244.2.5"), ("node-3", "10.244.3.5")):
        assert reals(plan(events, node), "10.96.0.10:80") == [f"{ip}:8080"], node


def test_node_without_a_node_hint_falls_back_to_zone_then_to_all(plan) -> None:
    eps = [_hinted("10.244.1.5", "node-1", "z1", ["node-1"], ["z1"]),
           _hinted("10.244.3.5", "node-3", "z2", ["node-3"], ["z2"])]
    events = added(*NODES3, web(), slice_(*eps))
    assert reals(plan(events, "node-2"), "10.96.0.10:80") == ["10.244.1.5:8080"], "node-2's zone z1"
    no_zone_hints = [_hinted("10.244.1.5", "node-1", "z1", ["node-1"], None),
                     _hinted("10.244.3.5", "node-3", "z2", ["node-3"], None)]
    assert reals(plan(added(*NODES3, web(), slice_(*no_zone_hints)), "node-2"), "10.96.0.10:80") == [
        "10.244.1.5:8080", "10.244.3.5:8080"], "no hint for node-2 and no zone hints: all"
    partly = [_hinted("10.244.1.5", "node-1", "z1", ["node-1"], None), kube.endpoint("10.244.3.5", "node-3")]
    assert len(reals(plan(added(*NODES3, web(), slice_(*partly)), "node-1"), "10.96.0.10:80")) == 2, \
        "node hints must be on every ready endpoint"


# --- 5. a load-balancer address that is a node's own -------------------------------------------------


def test_load_balancer_ip_equal_to_the_node_address_is_not_bound_there(plan) -> None:
    svc = web(type="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}  # node-1's InternalIP (k3s svclb)
    events = added(*NODES3, svc, slice_(kube.endpoint("10.244.1.5", "node-1")))
    on_1 = plan(events, "node-1", "json")
    assert "192.0.2.1" not in on_1["addresses"] and "192.0.2.1" not in on_1["ipsets"]["KUBE-IPVS-IPS"]
    assert "192.0.2.1,tcp:80" in on_1["ipsets"]["KUBE-LOAD-BALANCER"], "still load-balanced"
    assert reals(plan(events, "node-1"), "192.0.2.1:80") == ["10.244.1.5:8080"]
    on_2 = plan(events, "node-2", "json")
    assert "192.0.2.1" in on_2["addresses"], "another node binds it, as kube-proxy does"
    warning = [w for w in on_2["warnings"] if w["code"] == "service-address-is-node-address"]
    assert len(warning) == 1 and "default/web" in warning[0]["message"] and "node-1" in warning[0]["message"]


def test_external_ip_equal_to_another_nodes_address_warns_and_clears() -> None:
    svc = web(externalIPs=["192.0.2.3"])
    planner = _plan(added(*NODES3, svc))
    assert "Service/default/web/node-address" in planner.warnings
    moved = kube.node("node-3", "192.0.2.33")
    planner = _plan([*added(*NODES3, svc), {"type": "MODIFIED", "object": moved}])
    assert "Service/default/web/node-address" not in planner.warnings, "cleared when the node's address moves"
    scratch = _plan(added(*NODES3[:2], moved, svc))
    assert planner.warnings == scratch.warnings


# --- 7. two Services on one external address and port ----------------------------------------


def test_two_services_on_one_address_the_owner_is_kept_and_the_other_warned(plan) -> None:
    first = kube.service("alpha", cluster_ip="10.96.0.11", externalIPs=["203.0.113.5"])
    second = kube.service("beta", cluster_ip="10.96.0.12", externalIPs=["203.0.113.5"])
    eps = [kube.endpoint_slice("alpha-1", "alpha", [kube.endpoint("10.244.1.1", "node-1")]),
           kube.endpoint_slice("beta-1", "beta", [kube.endpoint("10.244.1.2", "node-1")])]
    for order in ([first, second], [second, first]):
        events = added(*NODES3, *order, *eps)
        assert reals(plan(events, "node-1"), "203.0.113.5:80") == ["10.244.1.1:8080"], "alpha: first by name"
        warnings = plan(events, "node-1", "json")["warnings"]
        assert [(w["code"], w["object"]) for w in warnings] == [("address-conflict", "default/beta")]
        assert "default/alpha" in warnings[0]["message"] and "203.0.113.5:80" in warnings[0]["message"]
    gone = _plan([*added(*NODES3, first, second), {"type": "DELETED", "object": first}])
    assert "Service/default/beta/address-conflict" not in gone.warnings, "beta owns it once alpha is gone"


def test_an_address_of_a_family_a_service_has_no_cluster_ip_in_is_no_conflict(plan) -> None:
    """alpha is IPv4-only with an IPv6 external IP: neither kube-proxy's IPv6 proxier (it skips a Service
    without a cluster IP of its family: servicechangetracker.go ``serviceToServiceMap``) nor kipvs serves it
    there, so beta, which does, holds it alone: no address-conflict (there was one, naming beta), nor a
    node-address warning about an address alpha never binds."""
    first = kube.service("alpha", cluster_ip="10.96.0.11", externalIPs=["2001:db8::5", "192.0.2.2"])
    second = kube.service("beta", cluster_ip="fd00::12", externalIPs=["2001:db8::5"])
    eps = [kube.endpoint_slice("alpha-1", "alpha", [kube.endpoint("10.244.1.1", "node-1")]),
           kube.endpoint_slice("beta-1", "beta", [kube.endpoint("fd00:244::2", "node-1")], family="IPv6")]
    v6_node = kube.node("node-2", "192.0.2.2")
    v6_node["status"]["addresses"].append({"type": "InternalIP", "address": "2001:db8::5"})
    events = added(NODES3[0], v6_node, first, second, *eps)
    assert reals(plan(events, "node-1"), "[2001:db8::5]:80") == ["[fd00:244::2]:8080"], "beta's"
    warnings = plan(events, "node-1", "json")["warnings"]
    assert [(w["code"], w["object"]) for w in warnings] == [
        ("service-address-is-node-address", "default/alpha"), ("service-address-is-node-address", "default/beta")]
    alpha_says = next(w["message"] for w in warnings if w["object"] == "default/alpha")
    assert "192.0.2.2 is the InternalIP" in alpha_says and "2001:db8::5" not in alpha_says, alpha_says
    live = _plan([*added(NODES3[0], v6_node, first), {"type": "ADDED", "object": second}])
    assert "Service/default/beta/address-conflict" not in live.warnings


# --- bad input on the same path -----------------------------------------------------------------


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda n: n["metadata"].update(labels="zone=z1"), "metadata.labels"),
    (lambda n: n.update(status="Ready"), "status"),
    (lambda n: n["status"].update(addresses={"type": "InternalIP"}), "status.addresses"),
])
def test_malformed_node_is_a_warning_and_the_rest_goes_on(plan, mutate, field: str) -> None:
    bad = kube.node("node-2", "192.0.2.2")
    mutate(bad)
    state = plan(added(NODES3[0], bad, web(), slice_(kube.endpoint("10.244.1.5", "node-1"))), "node-1", "json")
    assert [w["code"] for w in state["warnings"]] == ["invalid-node"]
    assert field in state["warnings"][0]["message"] and "node-2" in state["warnings"][0]["message"]
    assert state["ipvs"], "the Service is planned all the same"


def test_raw_watch_stream_bookmarks_skipped_errors_reported(tmp_path: Path, capsys) -> None:
    lines = [{"type": "ADDED", "object": web()},
             {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": "12"}}},
             {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                          "message": "too old resource version: 5 (12)"}},
             {"type": "ADDED", "object": slice_(kube.endpoint("10.244.1.5", "node-1"))}]
    f = tmp_path / "watch.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    assert kipvs(["plan", "--events", str(f), "--node", "node-1"]) == 0
    out, err = capsys.readouterr()
    assert "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1" in out
    assert f"{f}:3: ERROR event skipped (code 410, Expired: too old resource version: 5 (12))" in err
    assert "BOOKMARK" not in err


def test_file_that_is_not_utf8_is_reported_with_its_line(tmp_path: Path, capsys) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps({"type": "ADDED", "object": web()}).encode() + b"\n" + b'{"type": "ADDED", "x": "\xe9"}\n')
    capsys.readouterr()
    assert kipvs(["plan", "--events", str(f), "--node", "node-1"]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: not UTF-8" in err and "Traceback" not in err


def _plan(watch_events: list[dict[str, Any]]) -> Planner:
    return plan_events(read_events([json.dumps(e) for e in watch_events], "t"), Planner().config)
