"""kipvs's nftables table on this host's real kernel, in a network namespace the test creates.

(Fast, on the host kernel, which has nf_tables but no IPVS; the rules and IPVS together are tested in the
guest, tests/guest/kernel_datapath.py.) Real packets: the VIP port filter rejects a NEW connection to a VIP
on a port that is no Service port; loadBalancerSourceRanges let an allowed source through and drop the others."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from services.applier.kernel.rules import NftRules, RulesConfig, ruleset
from services.applier.ops import AddEntry, DelEntry

MEMBERS = {
    "KUBE-CLUSTER-IP": {"10.96.0.10,tcp:80"},
    "KUBE-IPVS-IPS": {"10.96.0.10", "203.0.113.5"},
    "KUBE-LOAD-BALANCER": {"203.0.113.5,tcp:80"},
    "KUBE-LOAD-BALANCER-FW": {"203.0.113.5,tcp:80"},
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": {"203.0.113.5,tcp:80,192.0.2.0/24"},
    "KUBE-LOOP-BACK": {"10.244.1.5,tcp:8080,10.244.1.5"},
    "KUBE-NODE-PORT-TCP": {"30080"},
    "KUBE-6-CLUSTER-IP": {"fd00::a,tcp:80"},
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def netns():
    """A "node" namespace holding the VIPs, and a "client" namespace outside it, joined by a veth pair:
    client traffic arrives at the node through PREROUTING and INPUT, as a real client's would."""
    name = f"kipvs-node-{uuid.uuid4().hex[:6]}"
    client = name.replace("node", "client")
    for ns in (name, client):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    for addr in ("10.96.0.10/32", "203.0.113.5/32"):
        _ip("-n", name, "addr", "add", addr, "dev", "lo")
    _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
    for ns in (name, client):
        _ip("-n", ns, "link", "set", "eth0", "up")
    for addr in ("192.0.2.1/32", "198.51.100.1/32"):
        _ip("-n", client, "addr", "add", addr, "dev", "lo")
        _ip("-n", name, "route", "add", addr, "dev", "eth0")
    for addr in ("10.96.0.10/32", "203.0.113.5/32"):
        _ip("-n", client, "route", "add", addr, "dev", "eth0")
    yield name
    for ns in (name, client):
        _ip("netns", "del", ns)


def probe(netns: str, listen: list[tuple[str, int]], connect: list[tuple[str, str, int]]) -> dict[str, str]:
    """Listen on each address:port in the node namespace, connect from the client namespace; report outcomes."""
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(f"""
        import socket, sys, time
        servers = []
        for host, port in {listen!r}:
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port)); s.listen(); servers.append(s)
        print("ready", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return _connect(netns.replace("node", "client"), connect)
    finally:
        server.kill()
        server.wait()


def _connect(client: str, connect: list[tuple[str, str, int]]) -> dict[str, str]:
    script = textwrap.dedent(f"""
        import json, socket
        out = {{}}
        for src, host, port in {connect!r}:
            c = socket.socket(); c.settimeout(1.0); c.bind((src, 0))
            try:
                c.connect((host, port)); out[f"{{src}}->{{host}}:{{port}}"] = "connected"
            except ConnectionRefusedError:
                out[f"{{src}}->{{host}}:{{port}}"] = "refused"
            except (TimeoutError, OSError):
                out[f"{{src}}->{{host}}:{{port}}"] = "dropped"
            c.close()
        print(json.dumps(out))
    """)
    result = subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c", script], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout)


async def test_table_installs_atomically_and_reads_back(netns: str) -> None:
    rules = NftRules(RulesConfig(cluster_cidrs=("10.244.0.0/16",)), netns=netns)
    await rules.check()
    await rules.install(MEMBERS)
    got = await rules.members()
    assert {k: v for k, v in got.items() if v} == MEMBERS
    await rules.apply([AddEntry("KUBE-CLUSTER-IP", "10.96.0.11,udp:53"), DelEntry("KUBE-NODE-PORT-TCP", "30080")])
    got = await rules.members()
    assert got["KUBE-CLUSTER-IP"] == {"10.96.0.10,tcp:80", "10.96.0.11,udp:53"} and got["KUBE-NODE-PORT-TCP"] == set()
    await rules.install(MEMBERS)  # re-install is a flush + define in one transaction: no duplicates, no error
    assert {k: v for k, v in (await rules.members()).items() if v} == MEMBERS
    await rules.remove()
    listed = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"], capture_output=True, text=True)
    assert "kipvs" not in listed.stdout


async def test_vip_port_filter_rejects_new_connections_to_other_ports(netns: str) -> None:
    rules = NftRules(RulesConfig(), netns=netns)
    listen = [("10.96.0.10", 80), ("10.96.0.10", 9999)]
    connect = [("192.0.2.1", "10.96.0.10", 80), ("192.0.2.1", "10.96.0.10", 9999)]
    assert probe(netns, listen, connect) == {"192.0.2.1->10.96.0.10:80": "connected",
                                             "192.0.2.1->10.96.0.10:9999": "connected"}
    await rules.install(MEMBERS)
    assert probe(netns, listen, connect) == {"192.0.2.1->10.96.0.10:80": "connected",
                                             "192.0.2.1->10.96.0.10:9999": "refused"}


async def test_load_balancer_source_ranges(netns: str) -> None:
    rules = NftRules(RulesConfig(), netns=netns)
    await rules.install(MEMBERS)
    clients = [("192.0.2.1", "203.0.113.5", 80), ("198.51.100.1", "203.0.113.5", 80)]
    result = probe(netns, [("203.0.113.5", 80)], clients)
    assert result == {"192.0.2.1->203.0.113.5:80": "connected", "198.51.100.1->203.0.113.5:80": "dropped"}


def test_ruleset_is_deterministic_and_names_fit_nftables() -> None:
    text = ruleset(RulesConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/56")), MEMBERS)
    assert text == ruleset(RulesConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/56")), MEMBERS)
    assert "delete table inet kipvs" in text and "ip saddr != { 10.244.0.0/16 }" in text
    assert "ip6 saddr != { fd00:244::/56 }" in text


async def test_health_check_node_port_passes_the_vip_port_filter(netns: str) -> None:
    """A cloud load balancer probes healthCheckNodePort on the LB address (kubernetes PR 117723)."""
    rules = NftRules(RulesConfig(), netns=netns)
    await rules.install({**MEMBERS, "KUBE-HEALTH-CHECK-NODE-PORT": {"32210"}})
    listen = [("203.0.113.5", 32210), ("203.0.113.5", 32211)]
    connect = [("192.0.2.1", "203.0.113.5", 32210), ("192.0.2.1", "203.0.113.5", 32211)]
    assert probe(netns, listen, connect) == {"192.0.2.1->203.0.113.5:32210": "connected",
                                             "192.0.2.1->203.0.113.5:32211": "refused"}
    await rules.apply([DelEntry("KUBE-HEALTH-CHECK-NODE-PORT", "32210")])
    assert probe(netns, listen, connect)["192.0.2.1->203.0.113.5:32210"] == "refused"
