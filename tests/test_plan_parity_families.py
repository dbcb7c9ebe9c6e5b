"""Parity, third round (issue 23), the planner's part: which set an external IP of a Local Service goes
into, per-family decisions (source ranges, "reachable from outside"), health-check node ports of load
balancers without node ports or VIPs, and legacy addresses with leading zeros. Each through ``kipvs plan``
as a user runs it, and where the behaviour is live, through the planner's incremental core against planning
from scratch and through the applier's per-Service state (the operations a change costs)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.applier.ops import AddEntry, DelEntry, DesiredState
from services.planner.core import Planner
from services.planner.log_replay import plan_events, read_events
from shared.plan.resolve import resolve_service
from shared.service import sloppy
from tests import kube
from tests.test_plan_rules import added, slice_, web

V6_NODE = kube.node("node-a", "192.0.2.1")
V6_NODE["status"]["addresses"].append({"type": "InternalIP", "address": "2001:db8::1"})
NODES = (V6_NODE, kube.node("node-b", "192.0.2.2"))
HTTP = [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]


def _plan(watch_events: list[dict[str, Any]]) -> Planner:
    return plan_events(read_events([json.dumps(e) for e in watch_events], "t"), Planner().config)


def _sets(state: dict, *names: str) -> dict[str, list[str]]:
    return {name: state["ipsets"][name] for name in names}


# --- 1. externalIPs of an externalTrafficPolicy Local Service -----------------------------------------


def test_external_ip_of_a_local_service_is_only_in_the_local_set(plan) -> None:
    local = web(externalIPs=["203.0.113.5"], externalTrafficPolicy="Local")
    state = plan(added(*NODES, local, slice_(kube.endpoint("10.244.1.5", "node-a"))), "node-a", "json")
    assert _sets(state, "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL") == {
        "KUBE-EXTERNAL-IP": [], "KUBE-EXTERNAL-IP-LOCAL": ["203.0.113.5,tcp:80"]}, "proxier.go's external-IP loop"
    cluster = web(externalIPs=["203.0.113.5"])
    state = plan(added(*NODES, cluster), "node-a", "json")
    assert _sets(state, "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL") == {
        "KUBE-EXTERNAL-IP": ["203.0.113.5,tcp:80"], "KUBE-EXTERNAL-IP-LOCAL": []}


def test_load_balancer_ip_of_a_local_service_stays_in_both_sets(plan) -> None:
    svc = web(type="LoadBalancer", externalTrafficPolicy="Local", ports=HTTP)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    state = plan(added(*NODES, svc), "node-a", "json")
    assert _sets(state, "KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-LOCAL") == {
        "KUBE-LOAD-BALANCER": ["203.0.113.9,tcp:80"], "KUBE-LOAD-BALANCER-LOCAL": ["203.0.113.9,tcp:80"]}


def test_switching_the_policy_live_moves_the_external_ip_between_the_sets() -> None:
    cluster = web(externalIPs=["203.0.113.5"])
    local = web(externalIPs=["203.0.113.5"], externalTrafficPolicy="Local")
    live = _plan([*added(*NODES, cluster), {"type": "MODIFIED", "object": local}])
    assert live.plans == _plan(added(*NODES, local)).plans
    desired = DesiredState()
    facts = live.nodes["node-a"]
    desired.update("default/web", resolve_service(_plan(added(*NODES, cluster)).plans["default/web"], facts))
    ops = desired.update("default/web", resolve_service(live.plans["default/web"], facts))
    entries = {(type(op).__name__, op.set, op.entry) for op in ops if isinstance(op, AddEntry | DelEntry)}
    assert entries == {("DelEntry", "KUBE-EXTERNAL-IP", "203.0.113.5,tcp:80"),
                       ("AddEntry", "KUBE-EXTERNAL-IP-LOCAL", "203.0.113.5,tcp:80")}


# --- 2. per-family decisions --------------------------------------------------------------------------


def _dual_stack_lb(ranges: list[str], **spec: Any) -> dict:
    svc = web(type="LoadBalancer", ports=HTTP, clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"],
              loadBalancerSourceRanges=ranges, **spec)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"ip": "2001:db8:9::9"}]}}
    return svc


def test_source_ranges_of_one_family_leave_the_other_family_open(plan) -> None:
    state = plan(added(*NODES, _dual_stack_lb(["198.51.100.0/24"])), "node-a", "json")
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == ["203.0.113.9,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["203.0.113.9,tcp:80,198.51.100.0/24"]
    assert state["ipsets"]["KUBE-6-LOAD-BALANCER-FW"] == [], "no IPv6 range: IPv6 is open (MapCIDRsByIPFamily)"
    assert state["ipsets"]["KUBE-6-LOAD-BALANCER"] == ["2001:db8:9::9,tcp:80"]
    only_v6 = plan(added(*NODES, _dual_stack_lb(["2001:db8:77::/48"])), "node-a", "json")
    assert only_v6["ipsets"]["KUBE-LOAD-BALANCER-FW"] == [], "and the other way round"
    assert only_v6["ipsets"]["KUBE-6-LOAD-BALANCER-FW"] == ["2001:db8:9::9,tcp:80"]


def test_node_may_reach_the_address_only_in_the_family_whose_range_holds_a_node_address(plan) -> None:
    # node-a's IPv6 address is in the IPv6 range; its IPv4 address is in no IPv4 range
    state = plan(added(*NODES, _dual_stack_lb(["198.51.100.0/24", "2001:db8::/64"])), "node-a", "json")
    assert state["ipsets"]["KUBE-6-LOAD-BALANCER-SOURCE-IP"] == ["2001:db8:9::9,tcp:80,2001:db8:9::9"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-IP"] == [], "IPv4: the node's address is in no range"


def test_node_may_reach_the_address_only_by_its_one_node_ip_of_the_family(plan) -> None:
    """kube-proxy checks its one nodeIP per family (proxier.go ``syncProxyRules``: ``cidr.Contains(
    proxier.nodeIP)``; the first of the family, pkg/util/node ``GetNodeHostIPs``); kipvs checked every
    InternalIP of the family, so a second one in a range let the node in."""
    two = kube.node("node-a", "192.0.2.1")
    two["status"]["addresses"].append({"type": "InternalIP", "address": "198.51.100.20"})  # in the range
    state = plan(added(two, _dual_stack_lb(["198.51.100.0/24"])), "node-a", "json")
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == ["203.0.113.9,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-IP"] == [], "192.0.2.1, the node IP, is in no range"
    two["status"]["addresses"].reverse()  # now 198.51.100.20 is the node IP
    state = plan(added(two, _dual_stack_lb(["198.51.100.0/24"])), "node-a", "json")
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-IP"] == ["203.0.113.9,tcp:80,203.0.113.9"]


def test_node_ip_of_a_family_without_internal_ip_is_its_first_external_ip(plan) -> None:
    """GetNodeHostIPs (pkg/util/node): InternalIPs first, then ExternalIPs; the first of each family. A
    node with an IPv4 InternalIP and an IPv6 ExternalIP has an IPv6 node IP, so it may reach the IPv6
    load-balancer address its range covers; the ExternalIP serves no NodePort (addresses: InternalIPs)."""
    node = kube.node("node-a", "192.0.2.1")
    node["status"]["addresses"] += [{"type": "ExternalIP", "address": "198.51.100.7"},
                                    {"type": "ExternalIP", "address": "2001:db8::1"},
                                    {"type": "InternalIP", "address": "192.0.2.99"}]
    state = plan(added(node, _dual_stack_lb(["198.51.100.0/24", "2001:db8::/64"])), "node-a", "json")
    assert state["ipsets"]["KUBE-6-LOAD-BALANCER-SOURCE-IP"] == ["2001:db8:9::9,tcp:80,2001:db8:9::9"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-IP"] == [], "IPv4: the InternalIP 192.0.2.1 comes first"
    facts = _plan(added(node)).nodes["node-a"]
    assert (facts.addresses, facts.host_ips) == (("192.0.2.1", "192.0.2.99"), ("192.0.2.1", "2001:db8::1"))


def _reals(lines: list[str], vip: str) -> list[str]:
    return [line.split(" -r ")[1].split(" ")[0] for line in lines if line.startswith(f"-a -t {vip} ")]


def test_reachable_from_outside_is_decided_per_family(plan) -> None:
    """internalTrafficPolicy Local with an IPv4 external IP only: the IPv4 ClusterIP uses cluster endpoints
    (UsesClusterEndpoints: reachable from outside), the IPv6 one does not (its proxier sees no external IP)."""
    svc = web(clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"], internalTrafficPolicy="Local",
              externalIPs=["203.0.113.5"])
    v4 = slice_(kube.endpoint("10.244.2.5", "node-b"), name="web-v4")
    v6 = slice_(kube.endpoint("fd00:244::2:5", "node-b"), name="web-v6", family="IPv6")
    lines = plan(added(*NODES, svc, v4, v6), "node-a")
    assert _reals(lines, "10.96.0.10:80") == ["10.244.2.5:8080"]
    assert _reals(lines, "[fd00::10]:80") == [], "IPv6 is not reachable from outside: no cluster endpoints"


# --- 3. health-check node ports of load balancers without node ports -----------------------------------


@pytest.mark.parametrize("status", [
    {}, {"loadBalancer": {"ingress": [{"ip": "203.0.113.9", "ipMode": "Proxy"}]}},
    {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}], ids=["pending", "ipmode-proxy", "vip"])
def test_health_check_node_port_without_allocated_node_ports(plan, status: dict) -> None:
    svc = web(type="LoadBalancer", externalTrafficPolicy="Local", allocateLoadBalancerNodePorts=False,
              healthCheckNodePort=32210, ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
    if status:
        svc["status"] = status
    for node in ("node-a", "node-b"):
        state = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5", "node-a"))), node, "json")
        assert state["ipsets"]["KUBE-HEALTH-CHECK-NODE-PORT"] == ["32210"], (node, "NeedsHealthCheck: by type")


def test_health_check_node_port_stays_while_the_load_balancer_comes_and_goes() -> None:
    svc = web(type="LoadBalancer", externalTrafficPolicy="Local", allocateLoadBalancerNodePorts=False,
              healthCheckNodePort=32210, ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
    assigned = json.loads(json.dumps(svc))
    assigned["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    steps = [*added(*NODES, svc)]
    for obj in (assigned, svc):
        steps.append({"type": "MODIFIED", "object": obj})
        assert _plan(steps).plans["default/web"].health_check_node_port == 32210


# --- 4. legacy addresses with leading zeros ------------------------------------------------------------


def test_legacy_cluster_ip_is_read_as_kube_proxy_reads_it_with_a_warning(plan) -> None:
    svc = web(clusterIP="10.96.011.012", clusterIPs=["10.96.011.012"])
    state = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5"))), "node-a", "json")
    assert "10.96.11.12" in state["addresses"], "decimal, not octal (10.96.9.10)"
    assert state["ipsets"]["KUBE-CLUSTER-IP"] == ["10.96.11.12,tcp:80"]
    assert [(w["code"], w["object"]) for w in state["warnings"]] == [("legacy-address", "default/web")]
    assert "spec.clusterIPs[0]" in state["warnings"][0]["message"] and "10.96.011.012" in state["warnings"][0][
        "message"]


def test_every_address_field_is_read_sloppily(plan) -> None:
    svc = web(type="LoadBalancer", ports=HTTP, clusterIPs=["10.96.0.10"], externalIPs=["203.0.113.005"],
              loadBalancerSourceRanges=["198.051.100.0/24"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.000.113.9"}]}}
    node = kube.node("node-a", "192.0.2.001")
    eps = slice_(kube.endpoint("10.244.001.5", "node-a"))
    state = plan(added(node, svc, eps), "node-a", "json")
    assert state["ipsets"]["KUBE-EXTERNAL-IP"] == ["203.0.113.5,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["203.0.113.9,tcp:80,198.51.100.0/24"]
    assert state["ipsets"]["KUBE-LOOP-BACK"] == ["10.244.1.5,tcp:8080,10.244.1.5"]
    assert "-A -t 192.0.2.1:30080 -s rr" in plan(added(node, svc, eps), "node-a")
    fields = {w["object"]: w["message"] for w in state["warnings"] if w["code"] == "legacy-address"}
    assert set(fields) == {"default/web", "default/web-1", "node-a"}
    for field in ("spec.externalIPs[0]", "spec.loadBalancerSourceRanges[0]", "status.loadBalancer.ingress[0].ip"):
        assert field in fields["default/web"], field
    assert "endpoints[0].addresses[0]" in fields["default/web-1"]
    assert "status.addresses[0].address" in fields["node-a"]


def test_ipv4_mapped_ipv6_forms_are_ipv4_as_kube_proxy_reads_them(plan) -> None:
    """Go's net.ParseIP + To4(): ``::ffff:a.b.c.d`` is IPv4, and ParseCIDRSloppy reads ``::ffff:a.b.c.d/96+n``
    as ``a.b.c.d/n`` (IPNet.String). Before: the range left the LB open, the external IP and ingress were
    dropped, the endpoint skipped and the clusterIP put in the KUBE-6 sets."""
    svc = web(type="LoadBalancer", ports=HTTP, clusterIP="::ffff:10.96.0.19", clusterIPs=["::ffff:10.96.0.19"],
              externalIPs=["::ffff:203.0.113.5"], loadBalancerSourceRanges=["::ffff:198.51.100.0/120"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "::ffff:203.0.113.18"}]}}
    eps = slice_(kube.endpoint("::ffff:10.244.1.20", "node-a"))
    state = plan(added(*NODES, svc, eps), "node-a", "json")
    assert state["ipsets"]["KUBE-CLUSTER-IP"] == ["10.96.0.19,tcp:80"]
    assert state["ipsets"]["KUBE-6-CLUSTER-IP"] == []
    assert state["ipsets"]["KUBE-EXTERNAL-IP"] == ["203.0.113.5,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == ["203.0.113.18,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["203.0.113.18,tcp:80,198.51.100.0/24"]
    assert state["ipsets"]["KUBE-LOOP-BACK"] == ["10.244.1.20,tcp:8080,10.244.1.20"]
    fields = {w["object"]: w["message"] for w in state["warnings"] if w["code"] == "legacy-address"}
    for field in ("spec.clusterIPs[0]", "spec.externalIPs[0]", "spec.loadBalancerSourceRanges[0]",
                  "status.loadBalancer.ingress[0].ip"):
        assert field in fields["default/web"], field
    assert "::ffff:198.51.100.0/120" in fields["default/web"] and "IPv4-mapped" in fields["default/web"]
    assert "endpoints[0].addresses[0]" in fields["default/web-1"]


def test_an_ipv4_mapped_address_in_an_ipv6_slice_is_skipped_with_one_message(plan) -> None:
    """An IPv6 EndpointSlice's ``::ffff:10.244.1.20`` is IPv4 (To4() != nil), which kube-apiserver's
    IsValidIPv6Address refuses for an IPv6 slice: skipped as not an IPv6 address, once, not also reported
    as a legacy address read as 10.244.1.20 (an endpoint that was not used)."""
    svc = web(clusterIP="fd00::10", clusterIPs=["fd00::10"], ipFamilies=["IPv6"])
    eps = slice_(kube.endpoint("::ffff:10.244.1.20", "node-a"), kube.endpoint("fd00:244::5", "node-a"),
                 family="IPv6")
    state = plan(added(*NODES, svc, eps), "node-a", "json")
    assert state["ipsets"]["KUBE-6-LOOP-BACK"] == ["fd00:244::5,tcp:8080,fd00:244::5"]
    about = [(w["code"], w["message"]) for w in state["warnings"] if w["object"] == "default/web-1"]
    assert about == [("invalid-endpointslice", "EndpointSlice default/web-1: skipped endpoints: endpoints[0].addresses"
                      "[0]: '::ffff:10.244.1.20' is not an IPv6 address (an IPv4-mapped address is IPv4)")], about


@pytest.mark.parametrize(("raw", "read"), [("::ffff:10.0.0.1/96", "0.0.0.0/0"), ("::ffff:10.0.0.1/64", "::/64"),
                                           ("::10.0.0.1/120", "::a00:0/120"), ("::ffff:10.0.0.1/128", "10.0.0.1/32")])
def test_mapped_cidrs_follow_go_parse_cidr(raw: str, read: str) -> None:
    assert sloppy.parse_cidr(raw) == (read, read != "::/64" and read != "::a00:0/120")


def test_legacy_warning_clears_when_the_address_is_rewritten() -> None:
    legacy = web(clusterIP="10.96.011.012", clusterIPs=["10.96.011.012"])
    fixed = web(clusterIP="10.96.11.12", clusterIPs=["10.96.11.12"])
    planner = _plan([*added(*NODES, legacy), {"type": "MODIFIED", "object": fixed}])
    assert "Service/default/web/legacy-address" not in planner.warnings
    assert planner.plans == _plan(added(*NODES, fixed)).plans, "same plan either way"


@pytest.mark.parametrize("bad", ["10.96.0.256", "10.96.0", "0x0a.96.0.1", "10.96.0.1a", "fd00::g"])
def test_what_kube_proxy_cannot_read_either_is_still_invalid(plan, bad: str) -> None:
    state = plan(added(*NODES, web(clusterIP=bad, clusterIPs=[bad])), "node-a", "json")
    assert [w["code"] for w in state["warnings"]] == ["invalid-service"]
    assert "spec.clusterIPs[0]" in state["warnings"][0]["message"]


def _with_bad_entries(ranges: list[str]) -> dict:
    svc = web(type="LoadBalancer", ports=HTTP, externalIPs=["0x0a.1.2.3", "203.0.113.5", " "],
              loadBalancerSourceRanges=ranges)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.300"}, {"ip": "203.0.113.9"}]}}
    return svc


def test_an_entry_kube_proxy_cannot_read_either_is_skipped_and_the_service_planned(plan) -> None:
    """kube-proxy skips the entry and logs it (pkg/proxy/util/utils.go ``MapIPsByIPFamily`` "Skipping invalid
    IP", ``MapCIDRsByIPFamily`` "Invalid CIDR ignored"; an ingress IP ``ParseIPSloppy`` refuses has no family:
    serviceport.go ``newBaseServiceInfo``). kipvs dropped the whole Service, ClusterIP too (invalid-service)."""
    svc = _with_bad_entries(["198.51.100.0/33", "198.51.100.0/24"])
    state = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5"))), "node-a", "json")
    assert "10.96.0.10" in state["addresses"], "the ClusterIP is served"
    assert state["ipsets"]["KUBE-EXTERNAL-IP"] == ["203.0.113.5,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER"] == ["203.0.113.9,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["203.0.113.9,tcp:80,198.51.100.0/24"]
    (warning,) = state["warnings"]
    assert (warning["code"], warning["object"]) == ("invalid-address", "default/web")
    message = warning["message"]
    for said in ("spec.externalIPs[0]: '0x0a.1.2.3' is not an IP address: skipped",
                 "spec.loadBalancerSourceRanges[0]: '198.51.100.0/33' is not a CIDR: skipped",
                 "status.loadBalancer.ingress[0].ip: '203.0.113.300' is not an IP address: skipped"):
        assert said in message, message
    assert "externalIPs[2]" not in message, "an empty entry is skipped without a word, as kube-proxy"
    assert "open to every source" not in message


def test_with_every_source_range_skipped_the_load_balancer_is_open_as_kube_proxy_leaves_it(plan) -> None:
    state = plan(added(*NODES, _with_bad_entries(["198.51.100.0/33", "x"])), "node-a", "json")
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == [], "syncProxyRules firewalls only with ranges"
    assert state["ipsets"]["KUBE-LOAD-BALANCER"] == ["203.0.113.9,tcp:80"]
    (warning,) = state["warnings"]
    assert "no range left, so the load balancer is open to every source" in warning["message"]


def test_a_family_whose_every_source_range_is_skipped_is_said_to_be_open(plan) -> None:
    """["10.0.0.0/33", "2001:db8::/64"] on dual-stack: IPv6 is filtered, IPv4 has no range left and is open
    (MapCIDRsByIPFamily gives the IPv4 proxier none): the warning says so for IPv4, not for IPv6."""
    state = plan(added(*NODES, _dual_stack_lb(["198.51.100.0/33", "2001:db8::/64"])), "node-a", "json")
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == [] and state["ipsets"]["KUBE-6-LOAD-BALANCER-FW"]
    (warning,) = state["warnings"]
    assert warning["message"].endswith(
        "spec.loadBalancerSourceRanges[0]: '198.51.100.0/33' is not a CIDR: skipped; spec.loadBalancerSourceRanges: "
        "no IPv4 range left, so the load balancer is open to every IPv4 source (as kube-proxy leaves a family "
        "without ranges)"), warning["message"]
    assert "IPv6 source" not in warning["message"]
    both = plan(added(*NODES, _dual_stack_lb(["198.51.100.0/33", "198.51.100.0/24", "2001:db8::/64"])),
                "node-a", "json")
    assert "open" not in both["warnings"][0]["message"], "a readable IPv4 range is left"


def test_the_skipped_entry_warning_clears_when_the_entry_is_fixed() -> None:
    broken = _with_bad_entries(["198.51.100.0/24"])
    fixed = _with_bad_entries(["198.51.100.0/24"])
    fixed["spec"]["externalIPs"] = ["203.0.113.5"]
    fixed["status"]["loadBalancer"]["ingress"] = [{"ip": "203.0.113.9"}]
    live = _plan([*added(*NODES, broken), {"type": "MODIFIED", "object": fixed}])
    assert "Service/default/web/invalid-address" not in live.warnings
    assert live.plans == _plan(added(*NODES, fixed)).plans


# --- 9. a LoadBalancer turned ClusterIP before its status is cleared ----------------------------------------


def _turned_cluster_ip() -> tuple[dict, dict]:
    lb = web(type="LoadBalancer", ports=HTTP, loadBalancerSourceRanges=["198.51.100.0/24"])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    turned = web()  # the controller has not cleared the status yet (MetalLB issue 190, kube-vip issue 1700)
    turned["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    return lb, turned


def test_a_service_no_longer_a_load_balancer_stops_serving_its_old_address_at_once(plan) -> None:
    """kipvs's chosen behaviour (docs/plan-format.md, parity notes): kube-proxy keeps serving the address
    until the status is cleared; kipvs drops it with the type, and warns while the status lingers."""
    _, turned = _turned_cluster_ip()
    state = plan(added(*NODES, turned, slice_(kube.endpoint("10.244.1.5"))), "node-a", "json")
    assert "203.0.113.9" not in state["addresses"] and state["ipsets"]["KUBE-LOAD-BALANCER"] == []
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == []
    assert "10.96.0.10" in state["addresses"], "the ClusterIP is served as always"
    (warning,) = state["warnings"]
    assert warning["code"] == "stale-load-balancer-status" and "203.0.113.9" in warning["message"]


def test_the_stale_status_warning_lists_only_what_kube_proxy_would_still_serve(plan) -> None:
    """Not ipMode Proxy entries (serviceport.go ``IsVIPMode``), not unparseable ones; each as read."""
    turned = web()
    turned["status"] = {"loadBalancer": {"ingress": [
        {"ip": "203.0.113.9"}, {"ip": "203.0.113.10", "ipMode": "Proxy"}, {"ip": "not-an-ip"},
        {"ip": "203.000.113.011"}, {"ip": "::ffff:203.0.113.12"}, {"hostname": "lb.example"}]}}
    (warning,) = plan(added(*NODES, turned), "node-a", "json")["warnings"]
    assert "lists 203.0.113.9, 203.0.113.11, 203.0.113.12:" in warning["message"], warning["message"]
    turned["status"]["loadBalancer"]["ingress"] = [{"ip": "203.0.113.10", "ipMode": "Proxy"}, {"ip": "x"}]
    assert plan(added(*NODES, turned), "node-a", "json")["warnings"] == []


def test_the_change_of_type_is_live_and_the_warning_clears_with_the_status() -> None:
    lb, turned = _turned_cluster_ip()
    steps = [*added(*NODES, lb), {"type": "MODIFIED", "object": turned}]
    live = _plan(steps)
    assert live.plans["default/web"].load_balancer_ips == ()
    assert "Service/default/web/stale-load-balancer-status" in live.warnings
    cleared = web()
    live = _plan([*steps, {"type": "MODIFIED", "object": cleared}])
    assert "Service/default/web/stale-load-balancer-status" not in live.warnings
    assert live.plans == _plan(added(*NODES, cleared)).plans


def test_a_cluster_ip_service_with_a_status_of_the_wrong_shape_is_still_planned(plan) -> None:
    svc = web()
    svc["status"] = {"loadBalancer": {"ingress": "203.0.113.9"}}  # never read for a ClusterIP Service
    assert plan(added(*NODES, svc), "node-a", "json")["warnings"] == []
