"""kube-proxy IPVS-mode parity, one behaviour per test, each checked through `kipvs plan` output."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.service.cli import main as kipvs
from tests import kube


def added(*objs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "ADDED", "object": o} for o in objs]


def web(**spec: Any) -> dict[str, Any]:
    return kube.service("web", cluster_ip="10.96.0.10", **spec)


def slice_(*eps: dict[str, Any], name: str = "web-1", ports: list[dict] | None = None, family: str = "IPv4") -> dict:
    return kube.endpoint_slice(name, "web", list(eps), ports=ports, family=family)


NODES = (kube.node("node-a", "192.0.2.1", zone="z1"), kube.node("node-b", "192.0.2.2", zone="z2"))


def test_cluster_ip_virtual_service_address_and_set(plan) -> None:
    events = added(*NODES, web(), slice_(kube.endpoint("10.244.1.5"), kube.endpoint("10.244.2.5", "node-b")))
    assert plan(events) == [
        "-A -t 10.96.0.10:80 -s rr",
        "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
        "-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1",
    ]
    state = plan(events, fmt="json")
    assert state["addresses"] == ["10.96.0.10"]
    assert state["ipsets"]["KUBE-CLUSTER-IP"] == ["10.96.0.10,tcp:80"]
    assert state["ipsets"]["KUBE-IPVS-IPS"] == ["10.96.0.10"]
    assert state["ipsets"]["KUBE-LOOP-BACK"] == ["10.244.1.5,tcp:8080,10.244.1.5"]  # only the local endpoint
    assert state["warnings"] == []


def test_empty_service_keeps_its_virtual_service(plan) -> None:
    assert plan(added(*NODES, web())) == ["-A -t 10.96.0.10:80 -s rr"]


def test_node_port_on_every_internal_ip_of_the_node(plan) -> None:
    node = kube.node("node-a", "192.0.2.1")
    node["status"]["addresses"].append({"type": "InternalIP", "address": "192.0.2.101"})
    node["status"]["addresses"].append({"type": "ExternalIP", "address": "203.0.113.1"})
    svc = web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    lines = plan(added(node, svc, slice_(kube.endpoint("10.244.1.5"))))
    assert "-A -t 192.0.2.1:30080 -s rr" in lines and "-A -t 192.0.2.101:30080 -s rr" in lines
    assert not any("203.0.113.1" in line for line in lines)
    state = plan(added(node, svc), fmt="json")
    assert state["addresses"] == ["10.96.0.10"], "node ports are not bound to kube-ipvs0"
    assert state["ipsets"]["KUBE-NODE-PORT-TCP"] == ["30080"]


def test_udp_and_sctp(plan) -> None:
    svc = web(type="NodePort", ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                                      {"name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30868}])
    sl = slice_(kube.endpoint("10.244.1.5"), ports=[{"name": "dns", "port": 5353, "protocol": "UDP"},
                                                    {"name": "sig", "port": 3868, "protocol": "SCTP"}])
    lines = plan(added(*NODES, svc, sl))
    assert "-A -u 10.96.0.10:53 -s rr" in lines
    assert "-a -u 10.96.0.10:53 -r 10.244.1.5:5353 -m -w 1" in lines
    assert "-A --sctp-service 10.96.0.10:3868 -s rr" in lines
    assert "-A --sctp-service 192.0.2.1:30868 -s rr" in lines
    state = plan(added(*NODES, svc, sl), fmt="json")
    assert state["ipsets"]["KUBE-NODE-PORT-UDP"] == ["30053"]
    assert state["ipsets"]["KUBE-NODE-PORT-SCTP-HASH"] == ["192.0.2.1,sctp:30868"]


def test_external_ips_bound_unless_the_node_owns_them(plan) -> None:
    svc = web(externalIPs=["203.0.113.9", "192.0.2.1"])
    state = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5"))), fmt="json")
    vips = {(v["address"], v["port"]) for v in state["ipvs"]}
    assert {("203.0.113.9", 80), ("192.0.2.1", 80)} <= vips
    assert state["addresses"] == ["10.96.0.10", "203.0.113.9"]
    assert state["ipsets"]["KUBE-EXTERNAL-IP"] == ["192.0.2.1,tcp:80", "203.0.113.9,tcp:80"]


def test_load_balancer_ingress_and_source_ranges(plan) -> None:
    svc = web(type="LoadBalancer", loadBalancerSourceRanges=["192.0.2.0/24", "198.51.100.0/25"],
              ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"},
                                                  {"ip": "203.0.113.51", "ipMode": "Proxy"},
                                                  {"hostname": "lb.example"}]}}
    state = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5"))), fmt="json")
    assert ("203.0.113.50", 80) in {(v["address"], v["port"]) for v in state["ipvs"]}
    assert all(v["address"] != "203.0.113.51" for v in state["ipvs"]), "ipMode Proxy is not programmed"
    assert "203.0.113.50" in state["addresses"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER"] == ["203.0.113.50,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-FW"] == ["203.0.113.50,tcp:80"]
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == [
        "203.0.113.50,tcp:80,192.0.2.0/24", "203.0.113.50,tcp:80,198.51.100.0/25"]
    # The node's own address is inside a source range: the node may reach the LB VIP (kube-proxy's allowFromNode).
    assert state["ipsets"]["KUBE-LOAD-BALANCER-SOURCE-IP"] == ["203.0.113.50,tcp:80,203.0.113.50"]


def test_dual_stack(plan) -> None:
    svc = kube.service("web", cluster_ip="10.96.0.10")
    svc["spec"]["clusterIPs"] = ["10.96.0.10", "fd00::a"]
    v6 = slice_(kube.endpoint("fd00:244::5"), name="web-v6", family="IPv6")
    lines = plan(added(*NODES, svc, slice_(kube.endpoint("10.244.1.5")), v6))
    assert lines == [
        "-A -t 10.96.0.10:80 -s rr",
        "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
        "-A -t [fd00::a]:80 -s rr",
        "-a -t [fd00::a]:80 -r [fd00:244::5]:8080 -m -w 1",
    ]
    state = plan(added(*NODES, svc), fmt="json")
    assert state["ipsets"]["KUBE-6-CLUSTER-IP"] == ["fd00::a,tcp:80"]


def test_ports_matched_by_name_slices_merged_duplicates_once(plan) -> None:
    svc = web(ports=[{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "metrics", "port": 9090}])
    s1 = slice_(kube.endpoint("10.244.1.5"), kube.endpoint("10.244.1.6"), name="web-1",
                ports=[{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}])
    s2 = slice_(kube.endpoint("10.244.1.6"), kube.endpoint("10.244.1.7"), name="web-2",
                ports=[{"name": "http", "port": 8080}])
    lines = plan(added(*NODES, svc, s1, s2))
    assert [line for line in lines if ":80 -r" in line] == [
        f"-a -t 10.96.0.10:80 -r 10.244.1.{i}:8080 -m -w 1" for i in (5, 6, 7)]
    assert [line for line in lines if ":9090 -r" in line] == [
        f"-a -t 10.96.0.10:9090 -r 10.244.1.{i}:9100 -m -w 1" for i in (5, 6)]


def test_ready_endpoints_else_serving_terminating(plan) -> None:
    eps = [kube.endpoint("10.244.1.5"), kube.endpoint("10.244.1.6", ready=False, serving=True, terminating=True),
           kube.endpoint("10.244.1.7", ready=False, serving=False)]
    assert plan(added(*NODES, web(), slice_(*eps)))[1:] == ["-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"]
    eps[0] = kube.endpoint("10.244.1.5", ready=False, serving=False, terminating=True)
    assert plan(added(*NODES, web(), slice_(*eps)))[1:] == ["-a -t 10.96.0.10:80 -r 10.244.1.6:8080 -m -w 1"]


def test_topology_hints(plan) -> None:
    eps = [kube.endpoint("10.244.1.5", zone="z1", hints=["z1"]), kube.endpoint("10.244.2.5", "node-b", zone="z2",
                                                                               hints=["z2"])]
    assert plan(added(*NODES, web(), slice_(*eps)))[1:] == ["-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"]
    assert plan(added(*NODES, web(), slice_(*eps)), "node-b")[1:] == ["-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1"]
    # One ready endpoint without hints: topology is ignored.
    eps.append(kube.endpoint("10.244.3.5", "node-c"))
    assert len(plan(added(*NODES, web(), slice_(*eps)))) == 4
    # No endpoint for the node's zone: topology is ignored.
    eps = [kube.endpoint("10.244.2.5", "node-b", hints=["z2"]), kube.endpoint("10.244.2.6", "node-b", hints=["z2"])]
    assert len(plan(added(*NODES, web(), slice_(*eps)))) == 3


def _local_service(**policy: str) -> dict:
    return web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}], **policy)


def test_external_traffic_policy_local_with_ipvs_fallback(plan) -> None:
    svc = _local_service(externalTrafficPolicy="Local")
    eps = slice_(kube.endpoint("10.244.1.5", "node-a"), kube.endpoint("10.244.2.5", "node-b"))
    a = plan(added(*NODES, svc, eps), "node-a")
    node_port = [x for x in a if x.startswith("-a -t 192.0.2.1:30080")]
    assert node_port == ["-a -t 192.0.2.1:30080 -r 10.244.1.5:8080 -m -w 1"]
    assert len([x for x in a if x.startswith("-a -t 10.96.0.10:80")]) == 2, "the ClusterIP keeps every endpoint"
    only_b = slice_(kube.endpoint("10.244.2.5", "node-b"))
    a = plan(added(*NODES, svc, only_b), "node-a")
    assert [x for x in a if x.startswith("-a -t 192.0.2.1:30080")] == [
        "-a -t 192.0.2.1:30080 -r 10.244.2.5:8080 -m -w 1"], "IPVS mode falls back to cluster endpoints"
    state = plan(added(*NODES, svc, only_b), "node-a", "json")
    assert state["ipsets"]["KUBE-NODE-PORT-LOCAL-TCP"] == ["30080"]


def test_internal_traffic_policy_local(plan) -> None:
    svc = web(internalTrafficPolicy="Local")
    eps = slice_(kube.endpoint("10.244.1.5", "node-a"), kube.endpoint("10.244.2.5", "node-b"))
    assert plan(added(*NODES, svc, eps), "node-a")[1:] == ["-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"]
    # No local endpoint and no external access: kube-proxy has no cluster endpoints to fall back to.
    assert plan(added(*NODES, svc, eps), "node-c") == ["-A -t 10.96.0.10:80 -s rr"]


def test_scheduler_default_flag_and_annotation(plan) -> None:
    svc = web()
    assert plan(added(svc), "node-a", "ipvsadm", "--scheduler", "lc") == ["-A -t 10.96.0.10:80 -s lc"]
    svc["metadata"]["annotations"] = {"kipvs.io/scheduler": "sh"}
    assert plan(added(svc)) == ["-A -t 10.96.0.10:80 -s sh"]
    svc["metadata"]["annotations"] = {"kipvs.io/scheduler": "fastest"}
    state = plan(added(svc), fmt="json")
    assert state["ipvs"][0]["scheduler"] == "rr"
    assert state["warnings"][0]["code"] == "invalid-scheduler" and "'fastest'" in state["warnings"][0]["message"]


def test_mh_is_printed_with_the_port_flag_the_applier_programs(plan) -> None:
    """``ipvsadm -R`` of ``kipvs plan`` must reproduce the kernel: the applier writes mh with mh-port
    (shared/plan/ipvs_flags.service_flags), and ipvsadm -Sn prints it after -p as ``-b mh-port`` (ipvsadm.c
    ``print_service_entry``, FMT_RULE)."""
    svc = web()
    assert plan(added(svc), "node-a", "ipvsadm", "--scheduler", "mh") == ["-A -t 10.96.0.10:80 -s mh -b mh-port"]
    svc["spec"]["sessionAffinity"] = "ClientIP"
    assert plan(added(svc), "node-a", "ipvsadm", "--scheduler", "mh") == [
        "-A -t 10.96.0.10:80 -s mh -p 10800 -b mh-port"]
    assert plan(added(svc), "node-a", "ipvsadm", "--scheduler", "sh") == ["-A -t 10.96.0.10:80 -s sh -p 10800"]


def test_session_affinity_is_persistence(plan) -> None:
    svc = web(sessionAffinity="ClientIP")
    assert plan(added(svc)) == ["-A -t 10.96.0.10:80 -s rr -p 10800"]
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 600}}
    assert plan(added(svc)) == ["-A -t 10.96.0.10:80 -s rr -p 600"]


def test_ignored_services(plan) -> None:
    headless = kube.service("h", cluster_ip="None")
    external_name = kube.service("e", type="ExternalName", externalName="db.example")
    external_name["spec"].pop("clusterIP")
    other = kube.service("o", cluster_ip="10.96.0.77")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other-proxy"}
    state = plan(added(headless, external_name, other), fmt="json")
    assert state["ipvs"] == [] and state["warnings"] == []


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s["spec"].update(clusterIP="10.96.0.999", clusterIPs=["10.96.0.999"]), "'10.96.0.999' is not an IP"),
    (lambda s: s["spec"]["ports"][0].update(port=70000), "70000 is not a port number"),
    (lambda s: s["spec"]["ports"][0].update(protocol="QUIC"), "unknown protocol 'QUIC'"),
    (lambda s: s["spec"].pop("clusterIP") and s["spec"].pop("clusterIPs"), "spec.clusterIP: missing"),
])
def test_invalid_service_is_a_warning_and_does_not_poison_others(plan, mutate, message: str) -> None:
    bad = kube.service("bad", cluster_ip="10.96.0.99")
    mutate(bad)
    state = plan(added(*NODES, bad, web(), slice_(kube.endpoint("10.244.1.5"))), fmt="json")
    assert [v["address"] for v in state["ipvs"]] == ["10.96.0.10"]
    (warning,) = state["warnings"]
    assert warning["kind"] == "Service" and warning["object"] == "default/bad" and warning["code"] == "invalid-service"
    assert message in warning["message"]


def test_bad_endpoint_is_skipped_with_a_warning(plan) -> None:
    eps = slice_(kube.endpoint("10.244.1.5"), kube.endpoint("not-an-ip"))
    state = plan(added(*NODES, web(), eps), fmt="json")
    assert [r["address"] for r in state["ipvs"][0]["real_servers"]] == ["10.244.1.5"]
    assert state["warnings"][0]["object"] == "default/web-1" and "not-an-ip" in state["warnings"][0]["message"]


def test_fixing_an_object_clears_its_warning(plan) -> None:
    bad = web()
    bad["spec"]["ports"][0]["port"] = 0
    good = web()
    good["metadata"]["resourceVersion"] = "9"
    state = plan([*added(bad), {"type": "MODIFIED", "object": good}], fmt="json")
    assert state["warnings"] == [] and len(state["ipvs"]) == 1


def test_deletes(plan) -> None:
    sl = slice_(kube.endpoint("10.244.1.5"))
    assert plan([*added(web(), sl), {"type": "DELETED", "object": sl}]) == ["-A -t 10.96.0.10:80 -s rr"]
    assert plan([*added(web(), sl), {"type": "DELETED", "object": web()}]) == []


def test_service_changes_apply_in_place(plan) -> None:
    changed = copy.deepcopy(web())
    changed["spec"]["ports"][0]["port"] = 8080
    assert plan([*added(web()), {"type": "MODIFIED", "object": changed}]) == ["-A -t 10.96.0.10:8080 -s rr"]


def test_unreadable_input_is_a_precise_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"type": "ADDED", "object": web()}) + "\n{oops\n")
    assert kipvs(["plan", "--events", str(f), "--node", "n"]) == 2
    assert f"{f}:2: not JSON" in capsys.readouterr().err
    f.write_text(json.dumps({"type": "UPSERT", "object": web()}) + "\n")
    assert kipvs(["plan", "--events", str(f), "--node", "n"]) == 2
    assert "not a watch event" in capsys.readouterr().err


def felix(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration", "metadata": {"name": name},
            "spec": spec}


def test_calico_endpoint_marks_layout_and_ranges(plan) -> None:
    from services.planner.endpoint_marks import interface_name, layout

    host = kube.pod("host", node_name="node-a")
    host["spec"]["hostNetwork"] = True
    done = kube.pod("done", node_name="node-a")
    done["status"]["phase"] = "Succeeded"
    state = plan(added(*NODES, kube.pod("web-1"), kube.pod("web-2", node_name="node-b"), host, done), fmt="json")
    lay = layout(0xFFFF0000)
    assert list(state["endpoint_marks"]) == [interface_name("default", "web-1")], "only live workloads on node-a"
    mark = state["endpoint_marks"][interface_name("default", "web-1")]
    assert mark & lay.endpoint_mask == mark and mark not in (0, lay.non_calico)
    assert state["mark_layout"] == {"accept": 0x10000, "pass": 0x20000, "drop": 0x40000, "scratch0": 0x80000,
                                    "scratch1": 0x100000, "wireguard": 0, "endpoint_mask": 0xFFE00000,
                                    "non_calico": 0x200000}
    assert state["nodeport_ranges"] == [[30000, 32767]]


def test_felix_configuration_per_node_override_and_nodeport_outside_ranges(plan) -> None:
    svc = web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    events = added(*NODES, svc, felix("default", wireguardEnabled=True),
                   felix("node.node-a", kubeNodePortRanges=["31000:31999"]))
    a = plan(events, "node-a", "json")
    assert a["mark_layout"]["wireguard"] == 0x200000 and a["nodeport_ranges"] == [[31000, 31999]]
    (warning,) = [w for w in a["warnings"] if w["code"] == "nodeport-outside-ranges"]
    assert warning["object"] == "default/web"
    assert "nodePort 30080 is outside kubeNodePortRanges 31000:31999 on nodes node-a" in warning["message"]
    b = plan(events, "node-b", "json")
    assert b["nodeport_ranges"] == [[30000, 32767]]
    assert b["warnings"] == a["warnings"], "a Service-level warning, published once, naming the nodes affected"
    fixed = [*events, {"type": "MODIFIED", "object": felix("node.node-a", kubeNodePortRanges=["30000:32767"])}]
    assert not plan(fixed, "node-a", "json")["warnings"], "the warning clears when fixed"


def test_endpoint_mark_exhaustion_names_the_pods(plan) -> None:
    pods = [kube.pod(f"p{i}", ip=f"10.244.1.{i + 10}") for i in range(8)]
    state = plan(added(*NODES, felix("default", iptablesMarkMask=0x0FF0), *pods), fmt="json")
    assert len(state["endpoint_marks"]) == 6, "only the endpoints that got a position are listed"
    marked = [m for m in state["endpoint_marks"].values() if m]
    assert len(marked) == 6 and len(set(marked)) == 6
    (warning,) = [w for w in state["warnings"] if w["code"] == "endpoint-marks-exhausted"]
    assert "2 pods on node-a have no endpoint mark (capacity 6)" in warning["message"]
    assert "default/p6" in warning["message"] and "default/p7" in warning["message"]


def test_invalid_felix_configuration_is_a_warning_and_keeps_the_valid_value(plan) -> None:
    state = plan(added(*NODES, felix("default", iptablesMarkMask=1, kubeNodePortRanges=["1-2"])), fmt="json")
    assert state["mark_layout"]["endpoint_mask"] == 0xFFE00000 and state["nodeport_ranges"] == [[30000, 32767]]
    (warning,) = [w for w in state["warnings"] if w["code"] == "invalid-felix-configuration"]
    assert "fewer than 2 bits" in warning["message"] and "'1-2'" in warning["message"]


def test_calico_node_pod_and_bpf_mode_are_reported_per_node(plan) -> None:
    calico_node = kube.pod("calico-node-x", ns="kube-system", node_name="node-a", labels={"k8s-app": "calico-node"})
    calico_node["spec"]["hostNetwork"] = True
    events = added(*NODES, calico_node)
    a, b = plan(events, "node-a", "json"), plan(events, "node-b", "json")
    assert a["calico_node"] is True and b["calico_node"] is False, "only the node the calico-node pod runs on"
    assert not a["endpoint_marks"], "calico-node is host-network: no workload endpoint"
    gone = [*events, {"type": "DELETED", "object": calico_node}]
    assert plan(gone, "node-a", "json")["calico_node"] is False
    bpf = plan([*events, {"type": "ADDED", "object": felix("node.node-b", bpfEnabled=True)}], "node-b", "json")
    assert bpf["bpf_enabled"] is True
    (warning,) = [w for w in bpf["warnings"] if w["code"] == "calico-bpf-dataplane"]
    assert "no IPVS support" in warning["message"]


def test_warnings_are_on_stderr_in_the_default_format(plan, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The ipvsadm format prints every warning of the JSON form on stderr, one line each: stdout stays
    `ipvsadm -R` input."""
    svc = web(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    bad = kube.service("bad", cluster_ip="10.96.0.11", ports=[{"name": "x", "port": 70000, "protocol": "TCP"}])
    pods = [kube.pod(f"p{i}", ip=f"10.244.1.{i + 10}") for i in range(8)]
    events = added(*NODES, svc, bad, felix("default", iptablesMarkMask=0x0FF0),
                   felix("node.node-a", kubeNodePortRanges=["31000:31999"]), *pods)
    expected = plan(events, "node-a", "json")["warnings"]
    assert {w["code"] for w in expected} == {"invalid-service", "nodeport-outside-ranges",
                                             "endpoint-marks-exhausted"}
    f = tmp_path / "events.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in events))
    capsys.readouterr()
    assert kipvs(["plan", "--events", str(f), "--node", "node-a"]) == 0
    out, err = capsys.readouterr()
    assert out and all(line.startswith(("-A ", "-a ")) for line in out.splitlines()), out
    warnings = [line for line in err.splitlines() if line.startswith("kipvs plan: warning: ")]
    assert warnings == [f"kipvs plan: warning: {w['code']} " + (
        w["message"] if w["message"].startswith(f"{w['kind']} {w['object']}") else
        f"{w['kind']} {w['object']}: {w['message']}") for w in expected], err
    assert not [line for line in warnings if line.count("default/bad") > 1], "the object is named once"
    assert any(line.startswith("kipvs plan: warning: endpoint-marks-exhausted Node node-a: 2 pods on node-a")
               for line in warnings)
    assert any(line.startswith("kipvs plan: warning: nodeport-outside-ranges Service default/web: ")
               for line in warnings)
    assert any(line.startswith("kipvs plan: warning: invalid-service Service default/bad skipped: ")
               for line in warnings)
    capsys.readouterr()
    assert kipvs(["plan", "--events", str(f), "--node", "node-a", "--format", "json"]) == 0
    assert "warning" not in capsys.readouterr().err, "the JSON form carries them itself"
