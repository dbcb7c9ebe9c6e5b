"""Connection disruption while a node changes hands between kube-proxy and kipvs (run INSIDE the QEMU guest
by tests/test_disruption.py, one boot for the module): every moment an operator fears, measured with
traffic, zero loss required.

One node (network namespace node-a), two echo pods and a client pod on it (namespaces behind Calico-named
veths); the guest's root namespace is the outside world (192.168.50.1, the LB IP routed to node-a). The
real watcher, planner, auth callout and nats-server run; the node is first programmed exactly as
kube-proxy's IPVS mode programs it (``kube_proxy.py``). During each moment ``traffic.py`` runs from the
client pod and from outside: long-lived TCP connections with data flowing through a ClusterIP, a NodePort
and a LoadBalancer IP, new connections to each every 200 ms, UDP exchanges through a ClusterIP and a
NodePort. Per moment: resets, stalls, failed new connections, lost datagrams, printed; any one fails.

The moments, in order (each starts from the state the previous one left): kube-proxy alone (the harness
itself), a source port shared by two Services (the measure's premise: no loss the kernel makes whoever
proxies), takeover in place (``kipvs applier --adopt``), an applier restart (SIGKILL) into a version whose
nftables table changed, a planner failover (two planners with the lease; a Service added meanwhile), a
NATS outage (a Service added meanwhile), a restart from ``--plan-cache`` while NATS is down, a reboot
(the node's kernel state lost, NATS down: new traffic must flow once the cache is restored), hand back to
kube-proxy in place (``--hand-back``), and last the old runbook (``kube-proxy --cleanup`` before the
switch), which must show losses: the measure can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from services.harness.demo import network
from services.harness.demo.cluster import CLUSTER_CIDR, KIPVS, Cluster, _logged_all, active_planner, workdir_for
from services.harness.guest.vm import time_scale
from services.harness.simulator.scenario import Scenario
from tests.guest import kube_proxy

NODE, NODE_IP = "node-a", "192.168.50.11"
LB_IP = "198.51.100.7"
TRAFFIC = str(Path(__file__).with_name("traffic.py"))
EVIDENCE = Path("/run/tmp/disruption-evidence")  # what traffic.py captured at a stall or reset
PLAN_CACHE = Path("/run/tmp/disruption-plan-cache")  # the applier's --plan-cache from the restart moment on
LATE = "echo-late"  # a Service added while NATS is down: the applier must catch up with it
FAILOVER = "echo-failover"  # a Service added while the active planner is dead: the standby must plan it
FROM_POD = ["--long", "10.96.0.10:80", f"{NODE_IP}:30090", f"{LB_IP}:80",
            "--new", "10.96.0.10:80", f"{NODE_IP}:30090", f"{LB_IP}:80",
            "--udp", "10.96.0.53:53"]
FROM_OUTSIDE = ["--long", f"{NODE_IP}:30090", f"{LB_IP}:80",
                "--new", f"{NODE_IP}:30090", f"{LB_IP}:80",
                "--udp", f"{NODE_IP}:30053"]


def _pod(name: str, ip: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "c"}]},
            "status": {"phase": "Running", "podIP": ip}}


def _slice(service: str, port: tuple[str, int, str]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-x1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": port[0], "port": port[1], "protocol": port[2]}],
            "endpoints": [{"addresses": [ip], "nodeName": NODE,
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for ip in ("10.244.1.11", "10.244.1.12")]}


def _service(name: str, kind: str, cluster_ip: str, port: dict, status: dict | None = None) -> dict:
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"selector": {"app": "echo"}, "type": kind, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "ports": [port]}}
    if status:
        obj["status"] = status
    return obj


def _echo_port(target: int) -> dict:
    return {"name": "echo", "port": 80, "targetPort": target, "protocol": "TCP"}


# Each Service its own container port, so no two Services share a real server: IPVS matches a reply to its
# connection by client address:port and real server address:port only, not by virtual service
# (ip_vs_conn.c, ip_vs_conn_out_get; kubernetes#107249, open). With shared real servers, a new connection
# through one Service from the source port of a long-lived one through another, scheduled to the same pod,
# took that connection's replies for as long as its own IPVS entry lived (up to 2 minutes in TIME_WAIT):
# the long-lived one stalled, whichever proxy ran and whatever the moment (test_a_source_port_...).
ECHO_TARGETS = {"echo": 9000, "echo-np": 9001, "echo-lb": 9002}
SCENARIO = Scenario(objects=[
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
     "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
    _service("echo", "ClusterIP", "10.96.0.10", _echo_port(ECHO_TARGETS["echo"])),
    _service("echo-np", "NodePort", "10.96.0.20", {**_echo_port(ECHO_TARGETS["echo-np"]), "nodePort": 30090}),
    _service("echo-lb", "LoadBalancer", "10.96.0.30", {**_echo_port(ECHO_TARGETS["echo-lb"]), "nodePort": 30091},
             {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
    _service("dns", "NodePort", "10.96.0.53", {"name": "dns", "port": 53, "targetPort": 8053, "protocol": "UDP",
                                               "nodePort": 30053}),
    _pod("echo-1", "10.244.1.11", "echo"), _pod("echo-2", "10.244.1.12", "echo"),
    _pod("client-1", "10.244.1.50", "client"),
    *(_slice(s, ("echo", port, "TCP")) for s, port in ECHO_TARGETS.items()),
    _slice("dns", ("dns", 8053, "UDP")),
])

pytestmark = pytest.mark.asyncio(loop_scope="module")


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


def in_node(*argv: str) -> str:
    return sh("ip", "netns", "exec", NODE, *argv)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    cluster = Cluster(workdir_for(Path("/run/tmp/disruption")), "netlink", SCENARIO)
    echo = None
    try:
        await cluster.start_nats()
        await cluster.start_simulator()
        for service in ("watcher", "planner-1", "planner-2"):  # two planners with the lease, as deployed
            await cluster.start(service)
        deadline = asyncio.get_running_loop().time() + 120 * time_scale()
        while not _logged_all(await cluster.planned(), cluster.sim):  # type: ignore[arg-type]
            assert asyncio.get_running_loop().time() < deadline, "the planner did not plan the scenario"
            await asyncio.sleep(0.3)
        cluster.kube_proxy_state = cluster.node_state(await cluster.planned(), NODE)  # type: ignore[attr-defined]
        kube_proxy.start(NODE, cluster.kube_proxy_state, CLUSTER_CIDR)  # type: ignore[attr-defined]
        network.sh("ip", "route", "add", LB_IP, "via", NODE_IP)  # the cloud load balancer sends to node-a
        await cluster.start("auth")  # the applier's identity; started now, so no moment waits for it
        await cluster.auth_listening(within=120 * time_scale())
        echo = await asyncio.create_subprocess_exec(sys.executable, TRAFFIC, "serve", "pod-echo-1", "pod-echo-2",
                                                    stdout=asyncio.subprocess.PIPE)
        assert echo.stdout is not None
        assert (await asyncio.wait_for(echo.stdout.readline(), 60 * time_scale())).strip() == b"ready"
        yield cluster
    finally:
        for traffic in KEPT:
            traffic.kill()
        if echo is not None:
            echo.kill()
            await echo.wait()
        await cluster.stop()


class Traffic:
    """Both traffic sources of one moment. ``long=False``: new connections and datagrams only (a moment
    no established connection can survive: a reboot)."""

    def __init__(self, long: bool = True) -> None:
        self.sources: dict[str, asyncio.subprocess.Process] = {}
        self.long = long
        self.fresh = True  # no moment measured yet: let it flow a while first

    def _argv(self, argv: list[str]) -> list[str]:
        if self.long:
            return argv
        cut = argv.index("--new")
        return argv[cut:]

    async def start(self) -> None:
        evidence = ["--evidence", str(EVIDENCE), NODE, "pod-echo-1", "pod-echo-2"]
        for name, argv in (("pod", ["ip", "netns", "exec", "pod-client-1", sys.executable, TRAFFIC, "load",
                                    *self._argv(FROM_POD), *evidence]),
                           ("outside", [sys.executable, TRAFFIC, "load", *self._argv(FROM_OUTSIDE), *evidence])):
            self.sources[name] = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                                      stdout=asyncio.subprocess.PIPE,
                                                                      stderr=asyncio.subprocess.PIPE)
        for name, process in self.sources.items():  # both start at once: a Python start is slow here
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 120 * time_scale())
            if line.strip() != b"ready":
                err = await process.stderr.read() if process.stderr else b""
                raise AssertionError(f"traffic from {name} did not start: {line!r} {err.decode()[-1500:]}")

    async def mark(self) -> None:
        """From now on every failure counts (traffic.py's "mark"); the failures before are counted apart."""
        for process in self.sources.values():
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(b"mark\n")
            await process.stdin.drain()
        for name, process in self.sources.items():
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60 * time_scale())
            assert line.strip() == b"marked", (name, line)

    async def stop(self, moment: str) -> dict[str, dict]:
        """Stop both sources; print and return their counts."""
        results = await self._ask(b"stop", moment)
        for process in self.sources.values():
            await process.wait()
        return results

    async def lap(self, moment: str) -> dict[str, dict]:
        """Both sources' counts since their last lap, printed and returned; the traffic goes on."""
        self.fresh = False
        return await self._ask(b"lap", moment)

    async def _ask(self, command: bytes, moment: str) -> dict[str, dict]:
        results = {}
        for process in self.sources.values():  # both at once: each answers once its pending echoes are in
            assert process.stdin is not None
            process.stdin.write(command + b"\n")
            await process.stdin.drain()
        for name, process in self.sources.items():
            assert process.stdout is not None
            results[name] = json.loads(await asyncio.wait_for(process.stdout.readline(), 60 * time_scale()))
        for name, counts in results.items():
            print(f"DISRUPTION {moment} from {name}: " + json.dumps(counts), flush=True)
        return results

    def kill(self) -> None:
        for process in self.sources.values():
            with contextlib.suppress(ProcessLookupError):
                process.kill()


KEPT: list[Traffic] = []  # the traffic that runs on across consecutive moments (each a lap of it)


async def kept_traffic() -> Traffic:
    """The traffic kept running from one moment to the next, started if none runs: a new one costs two
    Python starts in the guest, and connections that live through several moments prove no less."""
    if not KEPT:
        KEPT.append(Traffic())
        began = time.monotonic()
        await KEPT[0].start()
        print(f"DISRUPTION kept traffic up after {time.monotonic() - began:.0f}s", flush=True)
    return KEPT[0]


async def end_kept_traffic() -> None:
    if KEPT:
        assert_no_loss("between moments", await KEPT.pop().stop("after the last lap"))


def losses(results: dict[str, dict]) -> dict[str, int]:
    return {f"{name} {kind}": counts[kind] for name, counts in results.items()
            for kind in ("resets", "stalls", "new_failed", "udp_lost") if counts[kind]}


def assert_no_loss(moment: str, results: dict[str, dict]) -> None:
    for name, counts in results.items():
        assert counts["long_lived"] >= 2 and counts["new_ok"] > 0 and counts["udp_ok"] > 0, (name, counts)
    lost = losses(results)
    failures = [line for counts in results.values() for line in counts["first_failures"]]
    if lost:
        print_evidence(results)
    assert not lost, f"{moment}: connections lost {lost}: {failures}"


def print_evidence(results: dict[str, dict]) -> None:
    """What traffic.py captured when a connection failed, and the end of the applier's log: to find why."""
    for counts in results.values():
        for path in counts["evidence"]:
            print(f"DISRUPTION evidence {path}:\n{Path(path).read_text()}", flush=True)
    log = Path("/run/tmp/disruption/logs") / f"applier-{NODE}.log"
    if log.exists():
        print(f"DISRUPTION applier log (end):\n{log.read_text()[-6000:]}", flush=True)


async def moment(action, settle: float = 3.0, traffic: Traffic | None = None) -> dict[str, dict]:
    """Run ``action`` under traffic: ``traffic`` not started yet or none (then a new one): started, then
    stopped; a running one: a lap of it. ``settle`` seconds of traffic before (only for traffic just
    started) and after."""
    first = time.monotonic()
    traffic = traffic or Traffic()
    own = not traffic.sources
    if not traffic.sources:
        await traffic.start()
        print(f"DISRUPTION {action.__name__}: traffic up after {time.monotonic() - first:.0f}s", flush=True)
    try:
        if traffic.fresh:
            await asyncio.sleep(settle)
        began = time.monotonic()
        await action()
        print(f"DISRUPTION {action.__name__}: done in {time.monotonic() - began:.0f}s", flush=True)
        await asyncio.sleep(settle)
    finally:
        results = await (traffic.stop(action.__name__) if own else traffic.lap(action.__name__))
    print(f"DISRUPTION {action.__name__}: the moment took {time.monotonic() - first:.0f}s", flush=True)
    return results


def ipvs_table() -> list[str]:
    return sorted(in_node("ipvsadm", "-S", "-n").splitlines())


def service_conns() -> dict[str, int]:
    """Connections each virtual service has counted since it was created (``ipvsadm -Ln --stats``): a
    service deleted and added again starts again from 0."""
    out = {}
    for line in in_node("ipvsadm", "-L", "-n", "--stats").splitlines():
        words = line.split()
        if words and words[0] in ("TCP", "UDP"):
            out[f"{words[0]} {words[1]}"] = int(words[2])
    return out


async def applier_in_step(cluster: Cluster, since: int) -> None:
    deadline = asyncio.get_running_loop().time() + 180 * time_scale()
    while True:
        try:
            planner = await cluster.planned()
            reports = await cluster.report_entries(NODE)
            if reports and reports[-1][0] > since and await cluster.node_in_step(planner, NODE):
                return
        except nats.errors.TimeoutError:  # this test's own look at the bus, on a loaded host: look again
            pass
        process = cluster.processes.get(f"applier-{NODE}")
        if process is not None and process.returncode is not None:
            raise AssertionError(f"the applier exited with {process.returncode}: "
                                 + (cluster.workdir / "logs" / f"applier-{NODE}.log").read_text()[-3000:])
        log = cluster.workdir / "logs" / f"applier-{NODE}.log"
        assert asyncio.get_running_loop().time() < deadline, \
            "the applier did not apply the plan: " + (log.read_text()[-3000:] if log.exists() else "no log")
        await asyncio.sleep(0.3)


async def test_kube_proxy_alone_forwards_everything(cluster: Cluster) -> None:
    async def kube_proxy_alone() -> None:
        pass

    assert kube_proxy.chains(NODE), "kube-proxy's chains were written"
    assert_no_loss("kube-proxy alone", await moment(kube_proxy_alone))


async def test_a_source_port_shared_by_two_services_stalls_no_connection(cluster: Cluster) -> None:
    """The measure's premise: a connection is lost only by what a moment does. A pod's connections to two
    Services may share a source port (connect() picks ports per destination); with the Services' real
    servers shared, IPVS gave the older one's replies to the newer one (ECHO_TARGETS), which stalled
    a long-lived connection through the LB IP at random moments, under kube-proxy as under kipvs."""
    done = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", "pod-client-1", sys.executable, TRAFFIC, "shared-port", NODE, f"{LB_IP}:80",
        "10.96.0.10:80",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(done.communicate(), 120 * time_scale())
    assert done.returncode == 0, err.decode()[-2000:]
    result = json.loads(out)
    print(f"DISRUPTION shared source port: {result}", flush=True)
    assert result["first_echoed"] and result["second_echoed"], result
    assert result["first_pod"] == result["second_pod"], f"round robin was not steered: {result}"
    assert result["first_echoed_after"], f"the LB connection lost its replies to a ClusterIP one: {result}"


async def test_takeover_in_place_loses_no_connection(cluster: Cluster) -> None:
    table, before = ipvs_table(), service_conns()
    started = asyncio.get_running_loop().time()

    async def takeover() -> None:
        cluster.applier_args = ("--adopt",)
        since = time.time_ns()
        await cluster.start(f"applier-{NODE}")
        await applier_in_step(cluster, since)
        deadline = asyncio.get_running_loop().time() + 60 * time_scale()
        while kube_proxy.chains(NODE):  # removed once kipvs's table is in place
            assert asyncio.get_running_loop().time() < deadline, kube_proxy.chains(NODE)
            await asyncio.sleep(0.3)

    results = await moment(takeover, traffic=await kept_traffic())
    print(f"DISRUPTION takeover took {asyncio.get_running_loop().time() - started:.1f}s", flush=True)
    assert_no_loss("takeover", results)
    assert ipvs_table() == table, "the takeover changed IPVS (nothing differed)"
    after = service_conns()
    assert all(after[key] >= count for key, count in before.items()), ("a service was re-created", before, after)
    owned = in_node("ipset", "list", "KIPVS-OWNED-VS")
    state = cluster.kube_proxy_state  # type: ignore[attr-defined]
    assert all(f"{ip},{proto.lower()}:{port}" in owned for proto, ip, port in state.ipvs), owned
    assert "table inet kipvs" in in_node("nft", "list", "tables")
    assert kube_proxy.chains(NODE) == []


def nft_table() -> str:
    return in_node("nft", "list", "table", "inet", "kipvs")


def table_shape(listing: str) -> list[str]:
    """The sets and chains of an ``nft list table`` listing, and whether its masquerade is fully random."""
    return [*sorted(re.findall(r"^\s*((?:set|chain) \S+)", listing, re.MULTILINE)), str("fully-random" in listing)]


# How an older kipvs's table differs from this one's (what an upgrade meets in the kernel): chains named
# otherwise, a masquerade without fully-random, and a set and a base chain this version no longer has.
OLDER_NAMES = (("mark_masq", "masq_mark"), ("nat_postrouting", "nat_post"), (" fully-random", ""))
OLDER_EXTRA = ("\tset legacy_node_ports_v4 {\n\t\ttype inet_service\n\t}\n"
               "\tchain legacy_accounting {\n\t\ttype filter hook prerouting priority raw; policy accept;\n"
               "\t\tcounter\n\t}\n")


def older_table(listing: str) -> str:
    """``listing`` (this kipvs's table) as an older kipvs wrote it, in one transaction as it did."""
    for name, older in OLDER_NAMES:
        listing = listing.replace(name, older)
    head, _, _ = listing.rpartition("}")
    return f"table inet kipvs {{}}\ndelete table inet kipvs\n{head}{OLDER_EXTRA}}}\n"


async def test_applier_restart_into_a_version_whose_table_changed_loses_no_connection(cluster: Cluster) -> None:
    """An applier restart (SIGKILL) that is also an upgrade: the kernel holds the nftables table an older
    kipvs wrote (``older_table``), the new applier replaces it as its bootstrap always installs its table:
    one ``nft -f`` transaction that deletes and defines it (rules.ruleset), so no packet meets a kernel
    without masquerade or the loadBalancerSourceRanges filter."""
    table, listing = ipvs_table(), nft_table()
    log = cluster.workdir / "logs" / f"applier-{NODE}.log"

    async def applier_upgrade() -> None:
        await cluster.kill(f"applier-{NODE}")  # SIGKILL: no goodbye
        subprocess.run(["ip", "netns", "exec", NODE, "nft", "-f", "-"], input=older_table(listing), text=True,
                       check=True, timeout=60)
        assert "legacy_accounting" in nft_table() and "masq_mark" in nft_table()
        since, offset = time.time_ns(), log.stat().st_size
        cluster.applier_args = ("--adopt", "--plan-cache", str(PLAN_CACHE))  # for the moments after this
        await cluster.start(f"applier-{NODE}")
        await applier_in_step(cluster, since)
        assert "bootstrapped" in log.read_text()[offset:]

    assert_no_loss("applier upgrade", await moment(applier_upgrade, traffic=await kept_traffic()))
    assert ipvs_table() == table
    assert table_shape(nft_table()) == table_shape(listing), nft_table()


async def test_planner_failover_loses_no_connection(cluster: Cluster) -> None:
    """Two planners with ``--leader-elect``, as deploy/kubernetes/40-planner.yaml runs them: the active one
    is killed (SIGKILL: the lease is not released) under traffic and a Service added meanwhile; the warm
    standby takes the lease once it expires, plans the Service and the applier programs it. Nothing in
    IPVS is deleted and re-created (each virtual service's connection counter only grows)."""
    table, before = ipvs_table(), service_conns()
    roles: list[str] = []

    async def settled() -> bool:
        active = await active_planner(cluster)
        if active is None:
            return False
        standby = "planner-2" if active == "planner-1" else "planner-1"
        roles[:] = [active, standby]
        return "standby: warm" in (cluster.workdir / "logs" / f"{standby}.log").read_text()

    deadline = asyncio.get_running_loop().time() + 120 * time_scale()
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, f"no active planner with a warm standby: {roles}"
        await asyncio.sleep(0.5)
    active, standby = roles
    wanted = [f"-a -t 10.96.0.50:80 -r {ip}:{ECHO_TARGETS['echo']}" for ip in ("10.244.1.11", "10.244.1.12")]

    async def planner_failover() -> None:
        await cluster.kill(active)
        await cluster.sim.apply(_service(FAILOVER, "ClusterIP", "10.96.0.50", _echo_port(ECHO_TARGETS["echo"])))
        await cluster.sim.apply(_slice(FAILOVER, ("echo", ECHO_TARGETS["echo"], "TCP")))
        await until("the Service added while the active planner was dead did not reach the kernel",
                    lambda: all(line in in_node("ipvsadm", "-S", "-n") for line in wanted))

    assert_no_loss("planner failover", await moment(planner_failover, traffic=await kept_traffic()))
    assert await active_planner(cluster) == standby
    assert "took over from" in (cluster.workdir / "logs" / f"{standby}.log").read_text()
    after = service_conns()
    assert all(after[key] >= count for key, count in before.items()), ("a service was re-created", before, after)
    assert set(table) < set(ipvs_table()), "only the new Service was added"



async def until(what: str, check, within: float = 180.0) -> None:
    deadline = asyncio.get_running_loop().time() + within * time_scale()
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.3)


async def test_nats_outage_loses_no_connection(cluster: Cluster) -> None:
    """NATS stopped for 10 s while traffic flows, a Service added meanwhile: the kernel forwards as it is
    (nothing in it depends on NATS) and, once NATS is back, the applier catches up (the new Service is
    programmed)."""
    server = cluster.nats_server
    assert server is not None and PLAN_CACHE.exists(), "the applier restarted with --plan-cache wrote it"

    async def nats_outage() -> None:
        port = server.port
        await server.stop()
        await cluster.sim.apply(_service(LATE, "ClusterIP", "10.96.0.40", _echo_port(ECHO_TARGETS["echo"])))
        await cluster.sim.apply(_slice(LATE, ("echo", ECHO_TARGETS["echo"], "TCP")))
        await asyncio.sleep(10)
        since = time.time_ns()
        await server.start(port=port)
        await until("the applier did not program the Service added during the outage",
                    lambda: "10.96.0.40:80" in in_node("ipvsadm", "-S", "-n"))
        await applier_in_step(cluster, since)

    assert_no_loss("NATS outage", await moment(nats_outage, traffic=await kept_traffic()))
    assert cluster.processes[f"applier-{NODE}"].returncode is None, "the applier rode the outage out"


async def test_restart_from_plan_cache_while_nats_is_down_loses_no_connection(cluster: Cluster) -> None:
    """A reboot-like restart (SIGKILL) while NATS is down: the applier programs the node from its
    --plan-cache before it can reach NATS (nothing to write: the kernel holds that plan), then catches up
    once NATS is back."""
    server = cluster.nats_server
    assert server is not None
    log = cluster.workdir / "logs" / f"applier-{NODE}.log"
    table = ipvs_table()

    async def restart_from_cache() -> None:
        port = server.port
        await cluster.kill(f"applier-{NODE}")
        await server.stop()
        offset = log.stat().st_size
        since = time.time_ns()
        await cluster.start(f"applier-{NODE}")
        await until("the applier did not restore from its plan cache",
                    lambda: "from the plan cache" in log.read_text()[offset:])
        assert "; 0 kernel writes)" in log.read_text()[offset:], log.read_text()[offset:][-2000:]
        await asyncio.sleep(5)
        await server.start(port=port)
        await applier_in_step(cluster, since)

    assert_no_loss("restart from the plan cache", await moment(restart_from_cache, traffic=await kept_traffic()))
    assert ipvs_table() == table


# What a reboot resets in the node's network namespace besides the tables: the sysctls kipvs sets at setup
# (netlink_writer.SYSCTLS), back to the kernel's defaults.
REBOOT_SYSCTLS = ("net.ipv4.vs.conntrack=0", "net.ipv4.vs.expire_nodest_conn=0",
                  "net.ipv4.vs.expire_quiescent_template=0", "net.ipv4.ip_forward=0")
FLUSH_CONNTRACK = "from pyroute2 import Conntrack; Conntrack().flush()"


def reboot_node() -> None:
    """The node's kernel state as after a reboot: IPVS empty, no kube-ipvs0, no ipsets, no kipvs table, no
    conntrack entries, the sysctls at their defaults. (The pods and their routes stay: the CNI's part.)"""
    in_node("ipvsadm", "-C")
    in_node("ip", "link", "del", "kube-ipvs0")
    in_node("nft", "delete", "table", "inet", "kipvs")
    in_node("ipset", "destroy")  # every set: none is referenced once kipvs's table and kube-proxy's chains are gone
    in_node("sysctl", "-qw", *REBOOT_SYSCTLS)
    in_node(sys.executable, "-c", FLUSH_CONNTRACK)


async def test_a_reboot_then_the_plan_cache_while_nats_is_down_serves_new_traffic(cluster: Cluster) -> None:
    """A reboot loses the node's kernel state (``reboot_node``) and every established connection with it:
    no proxy keeps those, so this moment runs new connections and datagrams only, from the client pod and
    from outside. NATS is down; the applier starts with --plan-cache. Failures count from the moment its
    log says the cache is restored (traffic.py's mark): none may follow, and traffic must flow then. Then
    NATS comes back and the applier catches up."""
    server = cluster.nats_server
    assert server is not None
    log = cluster.workdir / "logs" / f"applier-{NODE}.log"
    await end_kept_traffic()  # no established connection survives a reboot: new traffic only
    table, traffic, took = ipvs_table(), Traffic(long=False), {}

    async def reboot() -> None:
        port = server.port
        await cluster.kill(f"applier-{NODE}")
        await server.stop()
        reboot_node()
        offset, since, began = log.stat().st_size, time.time_ns(), time.monotonic()
        await cluster.start(f"applier-{NODE}")
        await until("the applier did not restore from its plan cache",
                    lambda: "from the plan cache" in log.read_text()[offset:])
        took["restored"] = time.monotonic() - began
        await traffic.mark()
        await asyncio.sleep(5)  # served from the cache alone
        await server.start(port=port)
        await applier_in_step(cluster, since)

    results = await moment(reboot, traffic=traffic)
    print(f"DISRUPTION reboot: node programmed from the plan cache {took['restored']:.1f}s after the applier "
          "started", flush=True)
    for name, counts in results.items():
        assert counts["failed_before_mark"] > 0, (name, "the reboot cut no traffic: the measure sees nothing")
        assert counts["new_ok_after_mark"] > 0 and counts["udp_ok_after_mark"] > 0, (name, counts)
    lost = losses(results)
    if lost:
        print_evidence(results)
    assert not lost, f"reboot: failures after the plan cache was restored {lost}: " + str(
        [line for counts in results.values() for line in counts["first_failures"]])
    assert ipvs_table() == table


async def test_hand_back_to_kube_proxy_in_place_loses_no_connection(cluster: Cluster) -> None:
    table, before = ipvs_table(), service_conns()
    state = cluster.kube_proxy_state  # type: ignore[attr-defined]

    async def hand_back() -> None:
        process = cluster.processes.pop(f"applier-{NODE}")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60 * time_scale()) == 0
        kube_proxy.start(NODE, state, CLUSTER_CIDR)  # kube-proxy starts and adopts the table
        done = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", NODE, KIPVS, "applier", "--node", NODE, "--hand-back",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(done.communicate(), 120 * time_scale())
        assert done.returncode == 0, out.decode()

    assert_no_loss("hand back", await moment(hand_back, traffic=await kept_traffic()))
    assert ipvs_table() == table
    after = service_conns()
    assert all(after[key] >= count for key, count in before.items()), ("a service was re-created", before, after)
    assert "kipvs" not in in_node("nft", "list", "tables")
    assert "KIPVS-" not in in_node("ipset", "list", "-n")
    assert kube_proxy.chains(NODE), "kube-proxy's chains are back"


async def test_the_old_runbook_loses_connections_and_the_harness_sees_it(cluster: Cluster) -> None:
    state = cluster.kube_proxy_state  # type: ignore[attr-defined]

    async def cleanup_then_switch() -> None:
        kube_proxy.cleanup(NODE)  # `kube-proxy --cleanup`, as the runbook used to say
        await asyncio.sleep(2)
        kube_proxy.start(NODE, state, CLUSTER_CIDR)  # the next proxy programs the node again

    lost = losses(await moment(cleanup_then_switch, traffic=await kept_traffic()))
    KEPT.pop().kill()  # its connections are lost: that was the point
    assert any("resets" in kind or "stalls" in kind for kind in lost), lost
