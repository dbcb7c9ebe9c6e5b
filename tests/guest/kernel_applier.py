"""Applier tests that need a real IPVS kernel. They run INSIDE the QEMU guest (services.harness.guest.vm),
driven by tests/test_kernel.py; on the host they would fail (no IPVS), so the host never collects them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from services.applier import inspect, node_settings, takeover
from services.applier.core import ApplierCore
from services.applier.drain import Drainer
from services.applier.exclude import ExcludeCIDRs
from services.applier.exclude import parse as parse_cidrs
from services.applier.kernel.backend import MemoryKernel
from services.applier.kernel.netlink_writer import NetlinkKernel
from services.applier.ops import AddAddress, AddEntry, AddReal, AddService, DesiredState, EditService, Op, diff
from services.planner.core import Planner
from services.planner.log_replay import plan_events, read_events
from services.planner.render import ipvsadm
from shared.plan.divergence import divergences
from shared.plan.node_state import NodeState, VirtualService
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_node, resolve_service
from tests.golden.regenerate import EVENTS

NODE = "node-a"


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture
async def kernel():
    k = NetlinkKernel()
    await k.cleanup()
    sh("ipvsadm -C")
    await k.check()
    await k.setup()
    yield k
    await k.cleanup()
    await k.close()


def planned(events_file: Path = EVENTS) -> Planner:
    with events_file.open() as f:
        return plan_events(read_events(f, events_file.name), Planner().config)


def desired_ops(planner: Planner, node: str = NODE) -> tuple[DesiredState, list[Op]]:
    desired, ops = DesiredState(), []
    facts = planner.nodes.get(node)
    for key in sorted(planner.plans):
        ops += desired.update(key, resolve_service(planner.plans[key], facts))
    return desired, ops


def kernel_table() -> list[str]:
    return sorted(sh("ipvsadm -S -n").splitlines())


async def test_applied_table_equals_kipvs_plan(kernel: NetlinkKernel) -> None:
    planner = planned()
    desired, ops = desired_ops(planner)
    await kernel.apply(ops)
    expected = ipvsadm(desired.state())
    assert kernel_table() == sorted(expected.splitlines())
    observed = await kernel.observe()
    want = desired.state()
    assert observed.state.addresses == want.addresses
    assert observed.state.ipsets == want.ipsets
    assert observed.owned == set(want.ipvs)
    assert set(sh("ip -o addr show dev kube-ipvs0").split()) >= {f"{ip}/32" for ip in want.addresses}


async def test_drift_is_repaired_and_foreign_services_are_left_alone(kernel: NetlinkKernel) -> None:
    desired, ops = desired_ops(planned())
    await kernel.apply(ops)
    sh("ipvsadm -A -t 192.0.2.99:8443 -s wlc")  # someone else's service
    sh("ipvsadm -D -t 10.96.0.10:80")  # ours, deleted behind our back
    sh("ipvsadm -a -t 10.96.0.20:8080 -r 10.244.9.9:8080 -m -w 1")  # an intruder real server
    sh("ip addr del 10.96.0.40/32 dev kube-ipvs0")
    observed = await kernel.observe()
    repair = diff(desired.state(), observed.state, observed.owned)
    assert {type(op).__name__ for op in repair} == {"AddService", "AddReal", "DelReal", "AddAddress"}
    await kernel.apply(repair)
    table = kernel_table()
    assert "-A -t 192.0.2.99:8443 -s wlc" in table
    table.remove("-A -t 192.0.2.99:8443 -s wlc")
    assert table == sorted(ipvsadm(desired.state()).splitlines())
    again = await kernel.observe()
    assert diff(desired.state(), again.state, again.owned) == []


async def test_memory_backend_agrees_with_the_kernel(kernel: NetlinkKernel) -> None:
    memory = MemoryKernel()
    await memory.setup()
    planner = planned()
    desired, ops = desired_ops(planner)
    # Then a few changes: a Service deleted, a node's view changed.
    later = [desired.update("default/web", None), desired.update("default/api", None)]
    for batch in (ops, *later):
        await kernel.apply(batch)
        await memory.apply(batch)
        k, m = await kernel.observe(), await memory.observe()
        assert k.state.ipvs == m.state.ipvs
        assert k.state.addresses == m.state.addresses
        assert k.state.ipsets == m.state.ipsets
        assert k.owned == m.owned


async def test_cleanup_removes_what_kipvs_owns_and_nothing_else(kernel: NetlinkKernel) -> None:
    _, ops = desired_ops(planned())
    await kernel.apply(ops)
    sh("ipvsadm -A -u 192.0.2.99:53 -s rr")
    await kernel.cleanup()
    assert kernel_table() == ["-A -u 192.0.2.99:53 -s rr"]
    assert "kube-ipvs0" not in sh("ip -o link")


async def test_changes_apply_in_place(kernel: NetlinkKernel) -> None:
    desired, ops = desired_ops(planned())
    await kernel.apply(ops)
    before = set(sh("ipvsadm -S -n").splitlines())
    svc = planned().plans["default/session"]
    from dataclasses import replace

    changed = msgspec.structs.replace(svc, scheduler="sh", persistence_timeout=0)
    _ = replace
    step = desired.update("default/session", resolve_service(changed, planned().nodes[NODE]))
    assert [type(op).__name__ for op in step] == ["EditService"]
    await kernel.apply(step)
    after = set(sh("ipvsadm -S -n").splitlines())
    assert before - after == {"-A -t 10.96.0.40:80 -s rr -p 600"}
    assert after - before == {"-A -t 10.96.0.40:80 -s sh"}


async def test_removed_tcp_real_server_drains_then_is_deleted_within_the_bound(kernel: NetlinkKernel,
                                                                               tmp_path: Path) -> None:


    desired, ops = desired_ops(planned())
    await kernel.apply(ops)
    vip = ("TCP", "10.96.0.40", 80)  # default/session -> 10.244.2.41:8080 (one real server)
    real = ("10.244.2.41", 8080)
    sh("sysctl -qw net.ipv4.vs.conntrack=1; ip netns add pod; ip link add v-pod type veth peer name eth0 netns pod;"
       "ip -n pod addr add 10.244.2.41/32 dev eth0; ip -n pod link set eth0 up; ip -n pod link set lo up;"
       "ip -n pod route add default dev eth0; ip link set v-pod up; ip route add 10.244.2.41/32 dev v-pod")
    server = subprocess.Popen(["ip", "netns", "exec", "pod", sys.executable, "-c",
                               "import socket,time\ns=socket.socket();s.bind(('10.244.2.41',8080));s.listen()\n"
                               "print('ready',flush=True)\nc,_=s.accept();time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        held = socket.create_connection(("10.96.0.40", 80), timeout=10)  # an open connection to the pod
        drainer = Drainer(timeout=3)
        session = planned().plans["default/session"]  # its one endpoint leaves; the Service stays
        no_endpoints = msgspec.structs.replace(
            session, ports=tuple(msgspec.structs.replace(p, endpoints=()) for p in session.ports))
        removal = desired.update("default/session", resolve_service(no_endpoints, planned().nodes[NODE]))
        step = drainer.rewrite([op for op in removal if type(op).__name__ == "DelReal"], time.monotonic())
        assert [type(op).__name__ for op in step] == ["EditReal"]
        await kernel.apply(step)
        assert "-a -t 10.96.0.40:80 -r 10.244.2.41:8080 -m -w 0" in sh("ipvsadm -S -n")
        connections = await kernel.connections({vip})
        assert connections[(vip, real)] >= 1
        assert drainer.due(connections, time.monotonic()) == [], "deleted while a connection is open"
        await asyncio.sleep(3.1)
        done = drainer.due(await kernel.connections({vip}), time.monotonic())
        assert [type(op).__name__ for op in done] == ["DelReal"], "the drain is bounded"
        await kernel.apply(done)
        assert "10.244.2.41" not in sh("ipvsadm -S -n")
        held.close()
    finally:
        server.kill()
        sh("ip netns del pod")


async def test_ipv6_services_real_servers_addresses_and_sets(kernel: NetlinkKernel) -> None:
    svc = ("TCP", "fd00::a", 80)
    ops = [AddAddress("fd00::a"), AddService(svc, "rr", 600), AddReal(svc, ("fd00:244::5", 8080), 1),
           AddEntry("KUBE-6-CLUSTER-IP", "fd00::a,tcp:80"), AddEntry("KUBE-6-LOAD-BALANCER-SOURCE-CID",
                                                                    "fd00::b,tcp:80,2001:db8::/64")]
    sh("ip -6 route add fd00:244::/64 dev lo")  # a masquerade real server needs a route
    await kernel.apply(ops)
    table = sh("ipvsadm -S -n")
    assert "-A -t [fd00::a]:80 -s rr -p 600" in table
    assert "-a -t [fd00::a]:80 -r [fd00:244::5]:8080 -m -w 1" in table
    observed = await kernel.observe()
    assert "fd00::a" in observed.state.addresses and svc in observed.owned
    assert observed.state.ipsets["KUBE-6-CLUSTER-IP"] == {"fd00::a,tcp:80"}
    assert observed.state.ipsets["KUBE-6-LOAD-BALANCER-SOURCE-CID"] == {"fd00::b,tcp:80,2001:db8::/64"}


async def test_node_addresses_are_the_hosts_own_minus_kube_ipvs0_loopback_and_link_local(
        kernel: NetlinkKernel) -> None:
    await kernel.apply([AddAddress("10.96.0.10")])
    sh("ip link add nic0 type dummy; ip link set nic0 up; ip addr add 192.168.50.11/24 dev nic0;"
       "ip addr add 2001:db8::11/64 dev nic0")
    try:
        got = await kernel.node_addresses()
        assert "192.168.50.11" in got and "2001:db8::11" in got
        assert "10.96.0.10" not in got and "127.0.0.1" not in got and not any(a.startswith("fe80") for a in got)
    finally:
        sh("ip link del nic0")


async def test_node_facts_see_ipvs_and_kipvs_owned_link_and_follow_link_changes(kernel: NetlinkKernel) -> None:
    from services.applier.node_facts import NodeProbe, Observation, watch

    probe = NodeProbe(proc=None)
    assert await probe.observe() == Observation(ipvs_available=True, kube_ipvs0="kipvs"), "setup made it, with alias"
    seen: list[Observation] = []
    stop = asyncio.Event()
    task = asyncio.create_task(watch(probe, lambda o: _append(seen, o), stop, recheck=3600, settle=0.05))
    try:
        await _wait_for(lambda: len(seen) == 1)
        sh("ip link del kube-ipvs0")
        await _wait_for(lambda: seen[-1].kube_ipvs0 == "absent")
        sh("ip link add kube-ipvs0 type dummy")  # as kube-proxy would: a dummy without kipvs's alias
        await _wait_for(lambda: seen[-1].kube_ipvs0 == "other")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _append(seen: list, item: object) -> None:
    seen.append(item)


async def _wait_for(predicate, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_mh_scheduler_is_written_with_mh_port_and_repaired_without_it(kernel: NetlinkKernel) -> None:
    """kube-proxy sets IP_VS_SVC_F_SCHED_MH_PORT with mh (kubernetes#115526): ipvsadm shows ``mh-port``."""
    key = ("TCP", "10.96.7.7", 80)
    await kernel.apply([AddService(key, "mh", 0), AddService(("TCP", "10.96.7.8", 80), "mh", 600)])
    listing = sh("ipvsadm -Ln")
    lines = [line for line in listing.splitlines() if "10.96.7.7:80" in line or "10.96.7.8:80" in line]
    assert len(lines) == 2 and all("mh-port" in line for line in lines), listing
    sh("ipvsadm -E -t 10.96.7.7:80 -s mh")  # rewritten by hand without the flag
    assert "mh-port" not in next(line for line in sh("ipvsadm -Ln").splitlines() if "10.96.7.7:80" in line)
    want = NodeState()
    want.ipvs[key] = VirtualService("TCP", "10.96.7.7", 80, "mh")
    want.ipvs[("TCP", "10.96.7.8", 80)] = VirtualService("TCP", "10.96.7.8", 80, "mh", 600)
    observed = await kernel.observe()
    repair = [op for op in diff(want, observed.state, observed.owned) if isinstance(op, EditService)]
    assert repair == [EditService(key, "mh", 0)]
    await kernel.apply(repair)
    assert "mh-port" in next(line for line in sh("ipvsadm -Ln").splitlines() if "10.96.7.7:80" in line)


async def test_conn_reuse_mode_is_written_on_the_kernels_kube_proxy_sets_it_on(kernel: NetlinkKernel) -> None:
    sh("sysctl -w net.ipv4.vs.conn_reuse_mode=1")
    current = kernel.sysctls(list(node_settings.KEYS))
    assert current[node_settings.OSRELEASE].startswith("6."), "this guest's kernel is 6.x"
    assert node_settings.sysctls_to_set(False, current) == {}, "5.9 and newer: left as it is"
    # The same read-back with the release of RHEL 8's kernel: written, to the real sysctl.
    changes = node_settings.sysctls_to_set(False, {**current, node_settings.OSRELEASE: "4.18.0-305.el8.x86_64"})
    kernel.set_sysctls(changes)
    assert sh("sysctl -n net.ipv4.vs.conn_reuse_mode").strip() == "0"
    assert kernel.sysctls([node_settings.CONN_REUSE_MODE]) == {node_settings.CONN_REUSE_MODE: "0"}


LB_CLIENT = ("import socket, sys\n"
             "s = socket.socket(); s.settimeout(3)\n"
             "try:\n"
             "    s.connect((sys.argv[1], 80)); s.sendall(b'hi'); print(s.recv(10).decode() or 'closed')\n"
             "except ConnectionRefusedError: print('refused')\n"
             "except OSError as e: print('dropped', e.errno)\n")
POD_SERVER = ("import socket\n"
              "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', 8080)); s.listen(); print('ready', flush=True)\n"
              "while True:\n"
              "    c, _ = s.accept(); c.recv(10); c.sendall(b'pod'); c.close()\n")


async def test_source_ranges_hold_for_a_connection_from_the_node_itself(kernel: NetlinkKernel) -> None:
    """IPVS takes the node's own connection to a load-balancer IP at LOCAL_OUT, past the input hook
    (kubernetes#119656): kipvs's output hook drops it unless the node may reach the address (-SOURCE-IP)."""
    from services.applier.kernel.rules import NftRules, RulesConfig

    vip, key = "198.51.100.77", ("TCP", "198.51.100.77", 80)
    sh("ip netns add lbpod; ip link add lbh type veth peer name lbp; ip link set lbp netns lbpod; "
       "ip addr add 10.250.0.1/24 dev lbh; ip link set lbh up; "
       "ip -n lbpod addr add 10.250.0.2/24 dev lbp; ip -n lbpod link set lbp up; ip -n lbpod link set lo up; "
       "ip -n lbpod route add default via 10.250.0.1")
    server = subprocess.Popen(["ip", "netns", "exec", "lbpod", sys.executable, "-c", POD_SERVER],
                              stdout=subprocess.PIPE, text=True)
    rules = NftRules(RulesConfig())
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        entry = f"{vip},tcp:80"
        await kernel.apply([AddAddress(vip), AddService(key, "rr", 0), AddReal(key, ("10.250.0.2", 8080), 1),
                            AddEntry("KUBE-IPVS-IPS", vip), AddEntry("KUBE-LOAD-BALANCER", entry),
                            AddEntry("KUBE-LOAD-BALANCER-FW", entry),
                            AddEntry("KUBE-LOAD-BALANCER-SOURCE-CIDR", f"{entry},192.0.2.0/24")])
        members = {name: entries for name, entries in (await kernel.observe()).state.ipsets.items()}
        await rules.install(members)
        assert sh(f"{sys.executable} -c \"{LB_CLIENT}\" {vip}").startswith("dropped"), "no node address in range"
        members["KUBE-LOAD-BALANCER-SOURCE-IP"] = {f"{entry},{vip}"}  # a node address is in a range
        await rules.install(members)
        assert sh(f"{sys.executable} -c \"{LB_CLIENT}\" {vip}").strip() == "pod"
    finally:
        server.kill()
        server.wait()
        await rules.remove()
        sh("ip netns del lbpod; ip link del lbh 2>/dev/null || true")


# --ipvs-exclude-cidrs (issue 23, item 8): web's ClusterIP and shop's load-balancer IP of the golden plan
EXCLUDE_FLAG = "10.96.0.10/32, 198.51.100.0/24"


async def test_excluded_ranges_are_never_written_deleted_adopted_nor_reported(kernel: NetlinkKernel) -> None:
    """kube-proxy's --ipvs-exclude-cidrs (proxier.go ``cleanLegacyService`` / ``isIPInExcludeCIDRs``), kipvs
    stricter (services/applier/exclude.py): another program's virtual service in a range, one kipvs's plan
    also holds, and its address on kube-ipvs0 are left as they are through takeover, bootstrap and a drift
    repair; kipvs writes nothing there itself; ``kipvs ipvs --diff``'s comparison is quiet about them."""
    excluded = ExcludeCIDRs(parse_cidrs([EXCLUDE_FLAG]))
    planner = planned()
    plan = SharedPlan(services=dict(planner.plans), nodes=dict(planner.nodes))
    core = ApplierCore(NODE, exclude=excluded)
    core.reset(plan)
    others = ["-A -t 198.51.100.7:80 -s wlc", "-a -t 198.51.100.7:80 -r 10.244.9.9:80 -m -w 3",  # shop's LB IP
              "-A -t 10.96.0.10:80 -s wlc", "-a -t 10.96.0.10:80 -r 10.244.9.8:80 -m -w 2",  # web's ClusterIP
              "-A -t 192.0.2.99:8443 -s wlc"]  # outside the ranges, not planned: left alone as always
    for line in others:
        sh(f"ipvsadm {line}")
    sh("ipvsadm -A -t 10.96.0.20:8080 -s rr")  # api, as kube-proxy left it: planned, outside: adopted
    sh("ip addr add 198.51.100.7/32 dev kube-ipvs0")
    assert await takeover.adopt(kernel, core.desired.state(), excluded) == 1
    assert (await kernel.observe()).owned == {("TCP", "10.96.0.20", 8080)}, "never adopted in the ranges"
    await kernel.apply(core.converge(await kernel.observe(), time.monotonic()))
    table = kernel_table()
    assert set(others) <= set(table), table
    assert [line for line in table if "10.96.0.10:" in line or "198.51.100." in line] == sorted(others[:4]), \
        "nothing written, edited nor deleted in the ranges"
    bound = sh("ip -o addr show dev kube-ipvs0")
    assert "198.51.100.7/32" in bound and "10.96.0.10/32" not in bound, "neither unbound nor bound"
    assert not [e for e in sh("ipset list KUBE-CLUSTER-IP").splitlines() if e.startswith("10.96.0.10,")]
    sh("ipvsadm -e -t 198.51.100.7:80 -r 10.244.9.9:80 -m -w 5; ipvsadm -D -t 10.96.0.40:80")  # drift
    repair = core.repair(core.desired.state(), await kernel.observe())
    assert repair and not [op for op in repair if "10.96.0.10'" in repr(op) or "198.51.100." in repr(op)], repair
    await kernel.apply(repair)
    assert "-a -t 198.51.100.7:80 -r 10.244.9.9:80 -m -w 5" in kernel_table()
    # kipvs ipvs --diff: the applier's reply carries its ranges; the tool's comparison leaves them out
    reply = await inspect.answer(NODE, kernel, lambda: ("apply", 1, ()), None, b"",
                                 tuple(map(str, excluded.networks)))
    assert reply.table is not None and reply.exclude_cidrs == ("10.96.0.10/32", "198.51.100.0/24")
    want = resolve_node(plan.services.values(), plan.nodes.get(NODE))
    assert divergences(reply.table, want, reply.exclude_cidrs) == ["virtual server TCP 192.0.2.99:8443 extra "
                                                                  "(wlc, 0 real servers)"]
    unfiltered = divergences(reply.table, want)
    assert any("198.51.100.7:80" in line for line in unfiltered), "the ranges are what keeps it quiet"


MH_VIP = "10.96.8.8"
NAMED_SERVER = ("import socket, sys\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('0.0.0.0', 8080)); s.listen(64); print('ready', flush=True)\n"
                "while True:\n"
                "    c, _ = s.accept(); c.sendall(sys.argv[1].encode()); c.close()\n")


def _mh_answers(count: int) -> list[str]:
    """Which pod answers each of ``count`` new connections from this node (one client IP, a new source
    port each) to the mh Service."""
    names = []
    for _ in range(count):
        with socket.create_connection((MH_VIP, 80), timeout=5) as c:
            names.append(c.recv(10).decode())
    return names


def _mh_destinations() -> set[str]:
    """The real servers ``ipvsadm -Lnc`` lists connections to for the mh Service."""
    lines = [line.split() for line in sh("ipvsadm -Lnc").splitlines()]
    return {f[5] for f in lines if len(f) >= 6 and f[4] == f"{MH_VIP}:80"}


async def test_mh_spreads_one_clients_connections_by_source_port(kernel: NetlinkKernel) -> None:
    """kube-proxy sets IP_VS_SVC_F_SCHED_MH_PORT with mh (kubernetes#115526, PR 115527): the source port is
    hashed too, so one client's connections land on more than one pod. Without the flag (the control at the
    end, written by hand) all of them land on one."""
    key, pods = ("TCP", MH_VIP, 80), {"mha": "10.244.3.1", "mhb": "10.244.3.2"}
    servers = []
    try:
        for name, ip in pods.items():
            sh(f"ip netns add {name}; ip link add v-{name} type veth peer name eth0 netns {name}; "
               f"ip -n {name} addr add {ip}/32 dev eth0; ip -n {name} link set eth0 up; "
               f"ip -n {name} link set lo up; ip -n {name} route add default dev eth0; ip link set v-{name} up; "
               f"ip route add {ip}/32 dev v-{name}")
            server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", NAMED_SERVER, name],
                                      stdout=subprocess.PIPE, text=True)
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        await kernel.apply([AddAddress(MH_VIP), AddService(key, "mh", 0),
                            *(AddReal(key, (ip, 8080), 1) for ip in pods.values())])
        assert "mh-port" in next(line for line in sh("ipvsadm -Ln").splitlines() if f"{MH_VIP}:80" in line)
        answers = _mh_answers(24)
        assert set(answers) == set(pods), f"one client's connections all on one pod: {answers}"
        assert _mh_destinations() == {f"{ip}:8080" for ip in pods.values()}, sh("ipvsadm -Lnc")
        sh(f"ipvsadm -E -t {MH_VIP}:80 -s mh")  # the control: mh without the port flag
        assert len(set(_mh_answers(24))) == 1, "without mh-port the source address alone picks the pod"
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for name in pods:
            sh(f"ip netns del {name} 2>/dev/null || true; ip link del v-{name} 2>/dev/null || true")
