"""The applier's work per change is O(change), not O(Services) (issue 17): with 600 Services on the node, one
endpoint change resolves one Service, recounts one Service's health-check endpoints and never copies the
node's whole desired state. Work is counted, not timed. The deltas come from the real planner core; the
applier reports to a real nats-server; the kernel is the memory one (the kernel is not what is measured)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from services.applier import core as applier_core
from services.applier import health_check, ops
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig
from services.applier.shell import Applier, ApplierSettings
from services.planner.core import Planner
from services.planner.log_replay import read_events
from shared.messaging import bus
from shared.service import runtime
from tests import kube

NODE = "node-a"


def _objects(services: int, version: int = 0, changed: int = -1) -> Iterator[dict]:
    yield kube.node(NODE, "192.0.2.1")
    for i in range(services):
        kind = ("ClusterIP", "NodePort", "LoadBalancer")[i % 3]
        protocol = "UDP" if i % 2 else "TCP"
        port = {"name": "p", "port": 53, "protocol": protocol, "targetPort": 53}
        spec = {"type": kind}
        if kind != "ClusterIP":
            port["nodePort"] = 30000 + i
        if kind == "LoadBalancer":  # externalTrafficPolicy Local: a health-check node port per Service
            spec |= {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000 + i}
        svc = kube.service(f"s{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}", ports=[port], **spec)
        yield svc
        count = 3 if i == changed else 2  # the changed Service gains an endpoint (a UDP real server added)
        yield kube.endpoint_slice(f"s{i}-x", f"s{i}", [kube.endpoint(f"10.244.{i // 250}.{i % 250 * 4 + k}", NODE)
                                                       for k in range(count)],
                                  ports=[{"name": "p", "port": 53, "protocol": protocol}])


def _deliveries(planner: Planner, objects: Iterator[dict], first_seq: int, source: str) -> list[bus.Delivery]:
    lines = [json.dumps({"type": "ADDED", "object": {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}})
             for obj in objects]
    out = []
    for n, env in enumerate(read_events(lines, source)):
        for delta in planner.handle(env, first_seq + n):
            seq = first_seq + len(out)
            msg = Msg(None, subject="kipvs.plan.all", reply=f"$JS.ACK.KIPVS_PLAN.applier-{NODE}.1.{seq}.{seq}.0.0")
            out.append(bus.Delivery(msg, delta))
    return out


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    calls: Counter[str] = Counter()

    def counting(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(applier_core, "resolve_service", counting("resolve_service", applier_core.resolve_service))
    monkeypatch.setattr(health_check, "local_endpoints", counting("local_endpoints", health_check.local_endpoints))
    monkeypatch.setattr(ops.DesiredState, "state", counting("desired_state", ops.DesiredState.state))
    return calls


async def test_one_endpoint_change_costs_one_service_not_all_of_them(nc, counted: Counter[str]) -> None:
    services = 600
    js = await bus.setup(nc)
    cfg = ApplierConfig(node=NODE, backend="memory", http_listen="", healthz_bind_address="")
    ctx = runtime.ServiceContext(name="applier", config=cfg, nc=nc, js=js, stop=asyncio.Event())
    kernel = MemoryKernel()
    await kernel.setup()
    applier = Applier(ctx, NODE, kernel, settings=ApplierSettings(conntrack_cleanup=True))
    planner = Planner()
    try:
        build = _deliveries(planner, _objects(services), 1, "build")
        await applier.handle(build)
        assert len(applier.core.desired.contributions) == services
        assert len(applier.health_checks.wanted) == services // 3
        assert counted["resolve_service"] >= services  # the build resolves every Service once

        counted.clear()
        changed = 301  # a UDP NodePort: its new real server makes the applier clear stale UDP flows
        change = _deliveries(planner, (o for o in _objects(services, changed=changed)
                                       if o["metadata"]["name"] == f"s{changed}-x"), 10_000, "change")
        assert len(change) == 1
        await applier.handle(change)
        assert ("UDP", "10.96.1.52", 53) in kernel.ipvs and len(kernel.ipvs[("UDP", "10.96.1.52", 53)].reals) == 3
        assert counted["resolve_service"] == 1, counted
        assert counted["local_endpoints"] <= 1, counted
        assert counted["desired_state"] == 0, counted

        counted.clear()  # a LoadBalancer with a health-check node port: one Service's endpoints recounted
        lb = 302
        change = _deliveries(planner, (o for o in _objects(services, changed=lb)
                                       if o["metadata"]["name"] == f"s{lb}-x"), 20_000, "lb")
        await applier.handle(change)
        assert applier.health_checks.wanted[f"default/s{lb}"] == (32000 + lb, 3)
        assert counted == Counter(resolve_service=1, local_endpoints=1), counted
    finally:
        await applier.reports.flush()
        await applier.health.close()
