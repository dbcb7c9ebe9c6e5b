"""The applier service in a real IPVS kernel, inside the QEMU guest (driven by
tests/test_kernel.py): nats-server, planner and applier as real processes; SIGKILL and restart; and the
data path, with pods as network namespaces serving HTTP behind a ClusterIP and a NodePort."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from services.planner.render import ipvsadm
from shared.contract import topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.plan.resolve import resolve_node
from tests.golden.regenerate import EVENTS

KIPVS = str(Path(sys.executable).parent / "kipvs")
PODS = {"web-1": "10.244.1.11", "web-2": "10.244.2.11", "api-1": "10.244.3.21"}


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def nats_url(tmp_path: Path):
    port = free_loopback_port()
    proc = subprocess.Popen([server_binary(), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60  # the guest is slow to start a process on a loaded machine
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nats-server did not start in the guest") from None
            time.sleep(0.1)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([KIPVS, *args, "--http-listen", ""], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def expected_table(lines: list[str]) -> list[str]:
    planner = plan_events(read_events(lines, "x"), PlannerConfig())
    return sorted(ipvsadm(resolve_node(planner.plans.values(), planner.nodes.get("node-a"))).splitlines())


def kernel_table() -> list[str]:
    return sorted(line for line in sh("ipvsadm -S -n").splitlines())


async def publish(url: str, lines: list[str], source: str) -> None:
    nc = await nats.connect(url)
    js = await bus.setup(nc)
    for env in read_events(lines, source):
        r = env.record
        await bus.publish(js, topology.kube_object_subject(r.kind, r.namespace, r.name), env)
    await nc.close()


def wait_for(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_service_converges_survives_sigkill_and_serves_traffic(nats_url: str, tmp_path: Path) -> None:
    applier_args = ("--nats-url", nats_url, "--node", "node-a", "--drift-period", "2",
                    "--cluster-cidr", "10.244.0.0/16")
    sh("ipvsadm -C")
    # The golden log ends with the scenario's steps: web scaled down to web-1, pod web-2 deleted.
    everything = EVENTS.read_text().splitlines()
    lines, steps = everything[:-2], everything[-2:]
    assert '"web-x1"' in steps[0] and '"MODIFIED"' in steps[0]
    asyncio.run(publish(nats_url, lines, "log"))
    planner = start("planner", "--nats-url", nats_url)
    # With its nftables table (masquerade, VIP port filter): IPVS and the rules in one kernel, as on a node.
    applier = start("applier", *applier_args)
    try:
        want = expected_table(lines)
        wait_for(lambda: kernel_table() == want, 90, "node-a's kernel to match kipvs plan")

        # The data path: pods as network namespaces with HTTP servers, reached through the ClusterIP.
        sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.vs.conntrack=1")
        # node-a's InternalIP (from its Node object) on a NIC of its own, as on a real node.
        sh("ip link add node0 type dummy; ip addr add 192.168.50.11/24 dev node0; ip link set node0 up")
        for pod, ip in PODS.items():
            site = tmp_path / pod
            site.mkdir()
            (site / "index.html").write_text(pod)
            sh(f"ip netns add {pod}; ip link add v-{pod} type veth peer name eth0 netns {pod};"
               f"ip -n {pod} addr add {ip}/32 dev eth0; ip -n {pod} link set eth0 up; ip -n {pod} link set lo up;"
               # An on-link default route: the node answers ARP for its own addresses (the VIPs on kube-ipvs0).
               f"ip -n {pod} route add default dev eth0;"
               f"ip link set v-{pod} up; ip route add {ip}/32 dev v-{pod}")
            subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-m", "http.server", "8080", "-b", ip,
                              "-d", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def get(url: str) -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()

        def answers(url: str) -> bool:
            try:
                get(url)
            except OSError:
                return False
            return True

        for pod, ip in PODS.items():
            wait_for(lambda ip=ip: answers(f"http://{ip}:8080/"), 60, f"pod {pod} to serve")

        answered = {get("http://10.96.0.10:80/") for _ in range(6)}
        assert answered == {"web-1", "web-2"}, answered
        assert get("http://192.168.50.11:30080/") == "api-1", "NodePort on node-a's InternalIP"

        # SIGKILL the applier, change the cluster while it is down, restart: it converges.
        os.kill(applier.pid, signal.SIGKILL)
        applier.wait(10)
        asyncio.run(publish(nats_url, steps, "steps"))
        applier = start("applier", *applier_args)
        want_after = expected_table(everything)
        assert want_after != want
        wait_for(lambda: kernel_table() == want_after, 90, "node-a to converge after SIGKILL and restart")
        assert {get("http://10.96.0.10:80/") for _ in range(4)} == {"web-1"}, "a removed pod still answers"

        # Drift behind its back is repaired by the read-back; a foreign service is left alone.
        sh("ipvsadm -D -t 10.96.0.20:8080; ipvsadm -A -u 192.0.2.99:53 -s rr")
        wait_for(lambda: "-A -t 10.96.0.20:8080 -s rr" in kernel_table(), 30, "drift repair")
        assert "-A -u 192.0.2.99:53 -s rr" in kernel_table()
    finally:
        for proc in (applier, planner):
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
