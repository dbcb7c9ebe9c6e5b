"""Shadow mode and ``kipvs ipvs`` in a real IPVS kernel, inside the QEMU guest (driven by tests/test_kernel.py).

The Kubernetes API simulator (the small cluster, without its timed steps), the real watcher and planner
and nats-server run as processes. The kernel is first written as kube-proxy would write it (``ipvsadm``,
``ip addr add ... dev kube-ipvs0``, ``ipset``) with one deliberate difference; the applier in shadow mode
must report exactly that one divergence and write nothing. Then a real applier programs the node and
``kipvs ipvs --node`` must print what ``ipvsadm -Ln`` prints, and ``--diff`` must see a change made behind
its back with ``ipvsadm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import yaml

from shared.contract import events, topology
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.plan.node_state import IPSET_TYPES
from shared.service import cli
from tests.golden.regenerate import SCENARIO

KIPVS = str(Path(sys.executable).parent / "kipvs")
MISSING = ("10.96.0.10", 80, "10.244.2.11", 8080)  # the real server "kube-proxy" leaves out


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


def kipvs(*args: str) -> subprocess.CompletedProcess:
    """A kipvs tool, in this process: a new Python process costs seconds under TCG."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(["kipvs", *args], code, out.getvalue(), err.getvalue())


def wait_for(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def clean_kernel() -> None:
    """Nothing of kube-proxy's or kipvs's left from another guest test."""
    sh("ipvsadm -C; ip link del kube-ipvs0 2>/dev/null || true; nft delete table inet kipvs 2>/dev/null || true")
    for name in sh("ipset list -n").split():
        if name.startswith(("KUBE-", "KIPVS-")):
            sh(f"ipset destroy {name}")


def kernel_snapshot() -> str:
    return "\n".join([sh("ipvsadm -S -n"), sh("ip -o addr show dev kube-ipvs0"), sh("ipset save | sort"),
                      sh("nft list ruleset")])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """nats-server, the simulator, the watcher (recording) and the planner; yields (nats url, node-a's plan)."""
    tmp = tmp_path_factory.mktemp("shadow")
    clean_kernel()
    scenario = yaml.safe_load(SCENARIO.read_text())
    scenario.pop("steps", None)  # a still cluster: the comparison must not race the scenario's changes
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(scenario))
    port = free_loopback_port()
    url = f"nats://127.0.0.1:{port}"
    procs = [subprocess.Popen([server_binary(), "-js", "-sd", str(tmp / "js"), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    kubeconfig, record = tmp / "kubeconfig", tmp / "events.jsonl"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs.append(subprocess.Popen([KIPVS, "simulate", "--scenario", str(tmp / "cluster.yaml"),
                                   "--kubeconfig-out", str(kubeconfig)], **quiet))
    try:
        wait_for(kubeconfig.exists, 60, "the simulator")
        procs.append(subprocess.Popen([KIPVS, "watcher", "--nats-url", url, "--kubeconfig", str(kubeconfig),
                                       "--record", str(record), "--http-listen", ""], **quiet))
        procs.append(subprocess.Popen([KIPVS, "planner", "--nats-url", url, "--http-listen", ""], **quiet))
        objects = len(scenario["objects"])
        wait_for(lambda: record.exists() and len(record.read_text().splitlines()) >= objects, 90, "the watcher")
        plan = json.loads(kipvs("plan", "--events", str(record), "--node", "node-a", "--format", "json").stdout)
        assert len(plan["ipvs"]) >= 5, plan
        yield url, plan
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        clean_kernel()
        sh("ip link del pods0 2>/dev/null || true")


def write_as_kube_proxy(plan: dict) -> None:
    """The node's plan as kube-proxy programs it, minus one real server (the deliberate difference)."""
    # A masquerade real server needs a unicast route to its address.
    sh("ip link add pods0 type dummy 2>/dev/null || true; ip link set pods0 up;"
       "ip route replace 10.244.0.0/16 dev pods0")
    rules = []
    for vs in plan["ipvs"]:
        flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs["protocol"]]
        head = f"-A {flag} {vs['address']}:{vs['port']} -s {vs['scheduler']}"
        rules.append(head + (f" -p {vs['persistence_timeout']}" if vs["persistence_timeout"] else ""))
        for rs in vs["real_servers"]:
            if (vs["address"], vs["port"], rs["address"], rs["port"]) != MISSING:
                rules.append(f"-a {flag} {vs['address']}:{vs['port']} -r {rs['address']}:{rs['port']} -m "
                             f"-w {rs['weight']}")
    subprocess.run(["ipvsadm", "-R"], input="\n".join(rules) + "\n", text=True, check=True)
    sh("ip link add kube-ipvs0 type dummy")
    for ip in plan["addresses"]:
        sh(f"ip addr add {ip}/32 dev kube-ipvs0")
    for name, kind in IPSET_TYPES.items():  # single-stack kube-proxy: the IPv4 sets only
        extra = " range 0-65535" if kind == "bitmap:port" else ""
        sh(f"ipset create {name} {kind}{extra}")
        for entry in plan["ipsets"].get(name, []):
            sh(f"ipset add {name} {entry}")


async def last_shadow_report(url: str) -> events.ShadowReport | None:
    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_last_msg(topology.STATUS_STREAM, topology.status_subject("node-a", "shadow"))
        record = events.decode(msg.data).record
        assert isinstance(record, events.ShadowReport)
        return record
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


def test_shadow_mode_reports_the_one_difference_from_kube_proxy_and_writes_nothing(cluster) -> None:
    url, plan = cluster
    write_as_kube_proxy(plan)
    before = kernel_snapshot()
    applier = subprocess.Popen([KIPVS, "applier", "--node", "node-a", "--nats-url", url, "--shadow",
                                "--shadow-sync-period", "1", "--http-listen", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        vip, port, ip, rport = MISSING
        expected = (f"real server {ip}:{rport} of TCP {vip}:{port} missing (planned weight 1)",)
        reports: list[events.ShadowReport | None] = [None]

        def reported() -> bool:  # the first comparisons may run before the planner has published everything
            reports[0] = asyncio.run(last_shadow_report(url))
            return reports[0] is not None and reports[0].divergences == expected

        try:
            wait_for(reported, 90, "the shadow report")
        except AssertionError:
            raise AssertionError(f"last shadow report: {reports[0]}") from None

        status = kipvs("status", "--nats-url", url, "--node", "node-a")
        assert status.returncode == 1, status.stdout + status.stderr
        row = status.stdout.splitlines()[2]
        assert row.split()[6] == "1" and "shadow: 1 divergences" in row, status.stdout

        # kipvs ipvs answers from the shadow applier with kube-proxy's table, exactly as ipvsadm prints it.
        for flags in ((), ("--stats",), ("--rate",)):
            shown = kipvs("ipvs", "--node", "node-a", "--nats-url", url, *flags)
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout == sh("ipvsadm -Ln " + " ".join(flags)), flags

        time.sleep(2)  # more comparisons
        assert kernel_snapshot() == before, "shadow mode changed the kernel"
        assert asyncio.run(last_shadow_report(url)).divergences == expected  # type: ignore[union-attr]
        assert "KIPVS-" not in sh("ipset list -n") and "kipvs" not in sh("nft list tables")
    finally:
        applier.send_signal(signal.SIGTERM)
        assert applier.wait(30) == 0, applier.stderr.read().decode()[-2000:] if applier.stderr else ""
        clean_kernel()


def test_kipvs_ipvs_shows_a_real_appliers_kernel_and_diffs_it_with_the_plan(cluster) -> None:
    url, plan = cluster
    applier = subprocess.Popen([KIPVS, "applier", "--node", "node-a", "--nats-url", url, "--rules", "none",
                                "--drift-period", "600", "--http-listen", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        programmed = len(plan["ipvs"])
        wait_for(lambda: sh("ipvsadm -S -n").count("-A ") == programmed, 90, "the applier to program node-a")
        shown = kipvs("ipvs", "--node", "node-a", "--nats-url", url)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == sh("ipvsadm -Ln")
        same = kipvs("ipvs", "--node", "node-a", "--nats-url", url, "--diff")
        assert (same.returncode, same.stdout) == (0, ""), same.stderr

        sh("ipvsadm -e -t 10.96.0.10:80 -r 10.244.1.11:8080 -m -w 7")  # behind the applier's back
        changed = kipvs("ipvs", "--node", "node-a", "--nats-url", url, "--diff")
        assert changed.returncode == 1, changed.stderr
        assert changed.stdout == "real server 10.244.1.11:8080 of TCP 10.96.0.10:80 weight 7, planned 1\n"

        # Traffic moves the counters the kernel view reads over netlink.
        with contextlib.suppress(OSError):  # nothing serves behind the real server: the SYN is what counts
            socket.create_connection(("10.96.0.10", 80), timeout=1).close()

        def counted() -> bool:  # the kernel folds its per-CPU counters in with its rate estimator, every 2 s
            table = json.loads(kipvs("ipvs", "--node", "node-a", "--nats-url", url, "--json").stdout)["table"]
            web = next(vs for vs in table["virtual_servers"] if vs.get("address") == "10.96.0.10")
            return web.get("stats", {}).get("conns", 0) >= 1 and web.get("stats", {}).get("inpkts", 0) >= 1

        wait_for(counted, 30, "IPVS counters of 10.96.0.10:80 after a connection")
    finally:
        applier.send_signal(signal.SIGTERM)
        assert applier.wait(30) == 0, applier.stderr.read().decode()[-2000:] if applier.stderr else ""
        subprocess.run([KIPVS, "applier", "--node", "node-a", "--cleanup", "--rules", "none"], capture_output=True)
        clean_kernel()
