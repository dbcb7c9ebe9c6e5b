"""A new node after kube-proxy is gone (issue 21), inside the QEMU guest (driven by tests/test_kernel.py):
real NATS, the simulator, the auth callout, the watcher and the planner; node-c is the new node, a network
namespace with an empty IPVS table, no kube-proxy and no saved plan.

As deploy/kubernetes ships it (05-bootstrap.yaml): NATS is also a Service with a ClusterIP, which nothing has
programmed on node-c, and every kipvs service reaches NATS at a direct address (the NATS node's address in a
cluster, the guest's bridge here) checking the certificate against the Service's name, which is all the
certificate names (KIPVS_NATS_TLS_SERVER_NAME). The applier pointed at the ClusterIP (the old manifests) never
connects; pointed at the direct address it programs the node, after which ClusterIPs answer from node-c,
NATS's own included."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import replace
from pathlib import Path

import nats
import pytest

from services.harness.demo import network
from services.harness.demo.cluster import Cluster, workdir_for
from services.harness.demo.network import NodeSpec
from services.harness.demo.run import SCENARIO
from services.harness.guest.vm import time_scale
from services.harness.simulator import scenario as scenarios
from shared.messaging.embedded_nats import EmbeddedNats

NEW_NODE = "node-c"
TLS_NAME = "nats.kipvs-system.svc"  # deploy/kubernetes/05-bootstrap.yaml's nats-tls-server-name
NATS_VIP = "10.96.0.42"
CONNECT = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3).close()\n"
           " print('connected')\nexcept OSError as e:\n print(f'unreachable ({e})')\n")


async def _start_nats(cluster: Cluster) -> None:
    """Cluster.start_nats, but the server's certificate names none of the addresses the nodes dial: only
    TLS_NAME, as in a cluster where clients connect to the NATS nodes' addresses."""
    cluster.nodes = [NodeSpec(o["metadata"]["name"], o["status"]["addresses"][0]["address"], f"10.244.{i}.0/24")
                     for i, o in enumerate(cluster._objects("Node"), 1)]
    network.build_nodes(cluster.nodes)
    cluster.nats_server = EmbeddedNats(cluster.workdir / "nats", host="0.0.0.0", callout=True, names=(TLS_NAME,))
    await cluster.nats_server.start()
    admin = cluster.nats_server.identity("admin")
    assert admin is not None
    cluster.nc = await nats.connect(cluster.url, **replace(admin, tls_hostname=TLS_NAME).connect_options())
    cluster.js = cluster.nc.jetstream()


def _nats_service(port: int) -> list[dict]:
    """The nats Service of 20-nats.yaml: a ClusterIP in front of the server."""
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nats", "namespace": "kipvs-system"},
             "spec": {"type": "ClusterIP", "clusterIP": NATS_VIP, "clusterIPs": [NATS_VIP],
                      "selector": {"app.kubernetes.io/name": "nats"},
                      "ports": [{"name": "client", "port": 4222, "targetPort": port, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "nats-x1", "namespace": "kipvs-system",
                          "labels": {"kubernetes.io/service-name": "nats"}},
             "addressType": "IPv4", "ports": [{"name": "client", "port": port, "protocol": "TCP"}],
             "endpoints": [{"addresses": [network.BRIDGE_IP],
                            "conditions": {"ready": True, "serving": True, "terminating": False}}]}]


async def _dial(node: str, ip: str, port: int) -> str:
    code, out = await network.in_node(node, sys.executable, "-c", CONNECT, ip, str(port), within=15)
    return out.strip() if code == 0 else f"failed ({code}: {out.strip()})"


async def _log_says(cluster: Cluster, service: str, pattern: str, count: int, within: float) -> None:
    log = cluster.workdir / "logs" / f"{service}.log"
    deadline = asyncio.get_running_loop().time() + within * time_scale()
    while len(re.findall(pattern, log.read_text() if log.exists() else "")) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{service} did not log {pattern!r} {count} times; see {log}")
        await asyncio.sleep(0.2)


async def _programmed(cluster: Cluster, node: str, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within * time_scale()
    while not await cluster.node_in_step(await cluster.planned(), node):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{node} was not programmed within {within:.0f}s; logs in {cluster.workdir / 'logs'}")
        await asyncio.sleep(0.5)


async def test_a_new_node_without_kube_proxy_is_programmed_through_the_direct_nats_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every kipvs service started below checks the certificate against the Service's name, as deployed.
    monkeypatch.setenv("KIPVS_NATS_TLS_SERVER_NAME", TLS_NAME)
    scenario = scenarios.load(str(SCENARIO))
    scenario.steps = []
    cluster = Cluster(workdir_for(Path("/run/tmp/bootstrap")), "netlink", scenario)
    try:
        await _start_nats(cluster)
        assert cluster.nats_server is not None
        port = cluster.nats_server.port
        scenario.objects += _nats_service(port)
        await cluster.start_simulator()
        for service in ("watcher", "planner"):
            await cluster.start(service)

        # The new node: nothing programmed, so the ClusterIP is dead there; the direct address answers.
        assert await cluster.kernel_table(NEW_NODE) == []
        assert (await _dial(NEW_NODE, NATS_VIP, 4222)).startswith("unreachable"), "no ClusterIP yet"
        assert await _dial(NEW_NODE, network.BRIDGE_IP, port) == "connected"

        # The old manifests: the applier dials the ClusterIP and never gets its plan.
        cluster.applier_args = ("--nats-url", f"nats://{NATS_VIP}:4222")
        await cluster.start(f"applier-{NEW_NODE}")
        await _log_says(cluster, f"applier-{NEW_NODE}", rf"cannot reach NATS at nats://{re.escape(NATS_VIP)}", 2, 120)
        assert await cluster.kernel_table(NEW_NODE) == [] and not await cluster.reports(NEW_NODE)
        await cluster.kill(f"applier-{NEW_NODE}")

        # As shipped: the direct address, no --plan-cache (a new node has no saved plan).
        cluster.applier_args = ()
        await cluster.start(f"applier-{NEW_NODE}")
        await _programmed(cluster, NEW_NODE, within=120)
        table = await cluster.kernel_table(NEW_NODE)
        assert any(f"{NATS_VIP}:4222" in line for line in table) and any("10.96.0.10:80" in line for line in table)
        answers = await cluster.requests(NEW_NODE, "10.96.0.10", 80, 4)
        assert set(answers) == {"web-1 on node-a", "web-2 on node-b"}, answers
        assert await _dial(NEW_NODE, NATS_VIP, 4222) == "connected", "NATS's own ClusterIP, now programmed"
    finally:
        await cluster.stop()
