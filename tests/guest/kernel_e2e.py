"""End to end, inside the QEMU guest (driven by tests/test_kernel.py): real NATS, the simulator,
the watcher, the planner and one applier per node in its own network namespace with real IPVS; pods as
namespaces serving HTTP. A scenario of Kubernetes changes flows through all three services and every
node's kernel ends in exactly the planned state with the data path answering; then the same after each
service in turn is killed (SIGKILL) mid-scenario and restarted."""

from __future__ import annotations

import collections
from pathlib import Path

from services.harness.demo.cluster import Cluster, workdir_for
from services.harness.demo.run import SCENARIO, _pod, _slice, _with_endpoints
from services.harness.simulator import scenario as scenarios


def _endpoint(pod: dict) -> dict:
    return {"addresses": [pod["status"]["podIP"]], "nodeName": pod["spec"]["nodeName"],
            "conditions": {"ready": True, "serving": True, "terminating": False}}


async def _answers(cluster: Cluster, node: str, ip: str, port: int, count: int) -> collections.Counter:
    return collections.Counter(await cluster.requests(node, ip, port, count))


async def test_changes_flow_through_every_service_and_survive_each_restart() -> None:
    scenario = scenarios.load(str(SCENARIO))
    scenario.steps = []
    cluster = Cluster(workdir_for(Path("/run/tmp/e2e")), "netlink", scenario)
    try:
        await cluster.start_nats()
        await cluster.start_simulator()
        for service in ("watcher", "planner", *(f"applier-{n}" for n in cluster.node_names())):
            await cluster.start(service)
        await cluster.converged(within=120)  # every node's kernel == the plan (ipvsadm -S), reports in step
        assert await _answers(cluster, "node-a", "10.96.0.10", 80, 4) == {"web-1 on node-a": 2, "web-2 on node-b": 2}
        assert await _answers(cluster, "node-b", "192.168.50.12", 30080, 2) == {"api-1 on node-c": 2}

        web = _slice(cluster, "web-x1")
        endpoints = list(web["endpoints"])
        assert cluster.sim is not None
        # Each service in turn is SIGKILLed, the cluster changes while it is down, it comes back.
        for i, victim in enumerate(("watcher", "planner", "applier-node-b")):
            await cluster.kill(victim)
            pod = _pod(f"web-{10 + i}", "node-c" if i % 2 else "node-b", f"10.244.{3 if i % 2 else 2}.{50 + i}")
            await cluster.add_pod(pod)
            await cluster.sim.apply(pod)
            endpoints.append(_endpoint(pod))
            await cluster.sim.apply(_with_endpoints(web, endpoints))
            await cluster.start(victim)
            await cluster.converged(within=120)
            seen = await _answers(cluster, "node-b", "10.96.0.10", 80, 3 * len(endpoints))
            assert set(seen) == {f"{p} on {n}" for p, n in _owners(cluster, endpoints)}, (victim, seen)

        # A Service goes away: every node's kernel loses it.
        await cluster.sim.delete("Service", "default", "session")
        await cluster.converged(within=60)
        for node in cluster.node_names():
            assert not any("10.96.0.40:80" in line for line in await cluster.kernel_table(node)), node
    finally:
        await cluster.stop()


def _owners(cluster: Cluster, endpoints: list[dict]) -> list[tuple[str, str]]:
    by_ip = {p.ip: (p.name, p.node) for p in cluster.pods.values()}
    return [by_ip[e["addresses"][0]] for e in endpoints]
