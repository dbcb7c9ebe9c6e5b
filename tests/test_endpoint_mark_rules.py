"""Calico's endpoint marks written by kipvs (``enforce`` mode), on this host's real kernel, with real packets.

A "node" network namespace holds kipvs's table, a VIP and a node address; a "pod" namespace is joined to
it by a veth whose node side has the Calico interface name of the pod, a "client" namespace by an ordinary
veth. A probe table in the node namespace (priority after kipvs's INPUT chain) counts packets by the mark
they carry, so each assertion is about what the kernel did to a packet.

(The host kernel has no IPVS, so the INPUT -> IPVS -> OUTPUT path is exercised in the guest,
tests/guest/kernel_datapath.py; here the OUTPUT rule is checked with locally sent packets.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from services.applier.kernel.endpoint_mark_rules import EndpointMarks, resolve_mode
from services.applier.kernel.rules import NftRules, RulesConfig
from services.planner.endpoint_marks import interface_name, layout
from shared.contract import events

LAYOUT = layout(0xFFFF0000)
EM, NON_CALICO = LAYOUT.endpoint_mask, LAYOUT.non_calico
POD_IFACE = interface_name("default", "web-1")
STRANGER_IFACE = interface_name("default", "not-planned")
POD_MARK, NEW_MARK = 0x00400000, 0x01000000
NODE_IP, VIP, POD_IP, STRANGER_IP, CLIENT_IP = "192.0.2.10", "10.96.0.10", "10.244.1.5", "10.244.1.6", "198.51.100.1"
MEMBERS = {"KUBE-IPVS-IPS": {VIP}, "KUBE-CLUSTER-IP": {f"{VIP},tcp:80"}}

# name -> nft match for the probe's counters (all in the node namespace, input hook after kipvs's chain)
PROBES = {
    "pod_nodeport_tcp": f"tcp dport 30080 meta mark & {EM:#x} == {{mark}}",
    "pod_nodeport_udp": f"udp dport 30081 meta mark & {EM:#x} == {{mark}}",
    "pod_vip": f"ip daddr {VIP} tcp dport 80 meta mark & {EM:#x} == {{mark}}",
    "pod_other_bits_kept": "tcp dport 30082 meta mark == {mark} | 0x4000",
    "client_nodeport": f"tcp dport 30080 meta mark & {EM:#x} == {NON_CALICO:#x}",
    "outside_ranges_unmarked": f"tcp dport 8080 meta mark & {EM:#x} == 0",
    "stranger_unmarked": f"tcp dport 30080 meta mark & {EM:#x} == 0",
    "output_cleared": "udp dport 9 meta mark == 0x4000",
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)


def probe_table(mark: int) -> str:
    counters = "\n".join(f"  counter {name} {{}}" for name in PROBES)
    rules = "\n".join(f"    {match.format(mark=f'{mark:#x}')} counter name {name}" for name, match in PROBES.items())
    return textwrap.dedent("""\
        table inet probe {}
        delete table inet probe
        table inet probe {
        %s
          chain prerouting { type filter hook prerouting priority raw; policy accept;
            tcp dport 30082 meta mark set 0x4000; }
          chain input { type filter hook input priority filter + 5; policy accept;
        %s
          }
          chain output_early { type filter hook output priority filter - 5; policy accept;
            udp dport 9 meta mark set 0x%x; }
          chain output_late { type filter hook output priority filter + 20; policy accept;
            udp dport 9 meta mark == 0x4000 counter name output_cleared; }
        }
        """) % (counters, rules, EM | 0x4000)


@pytest.fixture
def node():
    """Namespaces node, pod (veth cali... <-> eth0), stranger (an unplanned cali... interface), client."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"kipvs-{role}-{tag}" for role in ("node", "pod", "stranger", "client")}
    for ns in names.values():
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    n = names["node"]
    for addr in (f"{NODE_IP}/32", f"{VIP}/32"):
        _ip("-n", n, "addr", "add", addr, "dev", "lo")
    for role, iface, addr in (("pod", POD_IFACE, POD_IP), ("stranger", STRANGER_IFACE, STRANGER_IP),
                              ("client", "eth0", CLIENT_IP)):
        _ip("-n", n, "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", names[role])
        _ip("-n", n, "link", "set", iface, "up")
        _ip("-n", names[role], "link", "set", "eth0", "up")
        _ip("-n", names[role], "addr", "add", f"{addr}/32", "dev", "eth0")
        _ip("-n", names[role], "route", "add", "default", "dev", "eth0")
        _ip("-n", n, "route", "add", f"{addr}/32", "dev", iface)
    yield names
    for ns in names.values():
        _ip("netns", "del", ns)


def send(ns: str, packets: list[tuple[str, str, int]]) -> None:
    """Send each (proto, host, port) once: a TCP SYN (connect, no listener needed) or a UDP datagram."""
    script = textwrap.dedent(f"""
        import socket
        for proto, host, port in {packets!r}:
            if proto == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"x", (host, port))
            else:
                s = socket.socket(); s.settimeout(0.3)
                try:
                    s.connect((host, port))
                except OSError:
                    pass
            s.close()
    """)
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], check=True, timeout=30)


def counters(ns: str) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "counters"], capture_output=True,
                         text=True, check=True).stdout
    return {c["counter"]["name"]: c["counter"]["packets"] for c in json.loads(out)["nftables"] if "counter" in c}


def marks(pod_mark: int) -> EndpointMarks:
    return EndpointMarks(endpoint_mask=EM, non_calico=NON_CALICO, nodeport_ranges=((30000, 32767),),
                         marks={POD_IFACE: pod_mark})


async def test_packets_from_a_workload_interface_carry_its_mark(node: dict[str, str]) -> None:
    n = node["node"]
    rules = NftRules(RulesConfig(), netns=n)
    await rules.set_endpoint_marks(marks(POD_MARK), MEMBERS)
    _nft(n, probe_table(POD_MARK))

    send(node["pod"], [("tcp", NODE_IP, 30080), ("udp", NODE_IP, 30081), ("tcp", VIP, 80),
                       ("tcp", NODE_IP, 30082), ("tcp", NODE_IP, 8080)])
    send(node["client"], [("tcp", NODE_IP, 30080)])
    send(node["stranger"], [("tcp", NODE_IP, 30080)])
    send(n, [("udp", CLIENT_IP, 9)])
    got = counters(n)
    assert got["pod_nodeport_tcp"] >= 1, "tcp to a node port in kubeNodePortRanges: the pod's endpoint mark"
    assert got["pod_nodeport_udp"] >= 1, "udp too"
    assert got["pod_vip"] >= 1, "to a VIP on kube-ipvs0: the pod's endpoint mark"
    assert got["pod_other_bits_kept"] >= 1, "bits outside the endpoint mask are kept (0x4000 set before INPUT)"
    assert got["client_nodeport"] >= 1, "from a non-workload interface: the non-Calico mark"
    assert got["outside_ranges_unmarked"] >= 1, "a port outside the ranges, not a VIP: left alone"
    assert got["stranger_unmarked"] >= 1 and got["unmarked_workload_packets"] >= 1, \
        "a workload interface without a mark is counted, not given another endpoint's mark"
    assert got["output_cleared"] >= 1, "OUTPUT clears the endpoint bits after policies read them, keeps the rest"
    assert (await rules.installed_marks()) == {POD_IFACE: POD_MARK}

    # The pod's mark changes (a mask re-allocation): element and chain changes, no table rewrite.
    await rules.set_endpoint_marks(marks(NEW_MARK), None)
    assert (await rules.installed_marks()) == {POD_IFACE: NEW_MARK}
    assert rules.divergence(await rules.listed(), MEMBERS) == "", "its mark chains are no drift of the table"
    _nft(n, f"add rule inet kipvs em_{NEW_MARK:08x} accept")  # another program's rule in a mark chain
    assert rules.divergence(await rules.listed(), MEMBERS) == "chains or rules differed"
    await rules.set_endpoint_marks(marks(NEW_MARK), None)  # the same marks: nothing written
    await rules.install(MEMBERS)
    _nft(n, probe_table(NEW_MARK))
    send(node["pod"], [("tcp", NODE_IP, 30080)])
    assert counters(n)["pod_nodeport_tcp"] >= 1

    # The pod goes away: its interface has no mark any more.
    await rules.set_endpoint_marks(EndpointMarks(EM, NON_CALICO, ((30000, 32767),), {}), None)
    assert (await rules.installed_marks()) == {}
    _nft(n, probe_table(NEW_MARK))
    send(node["pod"], [("tcp", NODE_IP, 30080)])
    assert counters(n)["stranger_unmarked"] >= 1

    # observe / off: the rules leave the table (a rewrite keeps the sets).
    await rules.set_endpoint_marks(None, MEMBERS)
    assert (await rules.installed_marks()) is None
    assert (await rules.members())["KUBE-IPVS-IPS"] == {VIP}


async def test_node_port_ranges_come_from_the_plan(node: dict[str, str]) -> None:
    n = node["node"]
    rules = NftRules(RulesConfig(), netns=n)
    narrow = EndpointMarks(endpoint_mask=EM, non_calico=NON_CALICO, nodeport_ranges=((8080, 8080),),
                           marks={POD_IFACE: POD_MARK})
    await rules.set_endpoint_marks(narrow, MEMBERS)
    _nft(n, probe_table(POD_MARK))
    send(node["pod"], [("tcp", NODE_IP, 30080), ("tcp", NODE_IP, 8080)])
    got = counters(n)
    assert got["stranger_unmarked"] >= 1, "30080 is outside the node's ranges now: no endpoint mark"
    assert got["outside_ranges_unmarked"] == 0, "8080 is inside: marked"


def _state(**fields: object) -> events.SetNodeCalico:
    lay = events.MarkLayoutRecord(accept=LAYOUT.accept, pass_=LAYOUT.pass_, drop=LAYOUT.drop,
                                  scratch0=LAYOUT.scratch0, scratch1=LAYOUT.scratch1, wireguard=0,
                                  endpoint_mask=EM, non_calico=NON_CALICO)
    return events.SetNodeCalico(node="node-a", layout=lay, nodeport_ranges=((30000, 32767),), endpoint_marks={},
                                **fields)


@pytest.mark.parametrize(("flag", "fields", "rules", "mode"), [
    ("auto", {}, True, "enforce"),
    ("auto", {"calico_node": True}, True, "observe"),
    ("enforce", {"calico_node": True}, True, "enforce"),
    ("observe", {}, True, "observe"),
    ("enforce", {"bpf_enabled": True}, True, "off"),
    ("enforce", {}, False, "observe"),
])
def test_mode_per_node(flag, fields, rules, mode) -> None:
    got, reason = resolve_mode(flag, _state(**fields), rules)
    assert got == mode and reason
    assert resolve_mode(flag, None, rules)[0] == "off"
