"""An operation the kernel refuses for good (a Service whose scheduler module the node's kernel lacks) costs
that Service only: the applier applies everything else, reports the refusal and keeps running, and each drift
check tries it again and reports it (review: one Service with ``kipvs.io/scheduler: twos`` made every applier
exit). The deltas come from the real planner core, the reports go to a real nats-server; the kernel is the
memory one with the netlink writer's contract for refusals (the guest test of that contract:
tests/guest/kernel_write.py)."""

from __future__ import annotations

import asyncio
import json

from nats.aio.msg import Msg

from services.applier.kernel.backend import MemoryKernel
from services.applier.kernel.netlink_writer import Refused
from services.applier.main import ApplierConfig
from services.applier.ops import AddService, EditService, Op
from services.applier.shell import Applier
from services.planner.core import Planner
from services.planner.log_replay import read_events
from shared.messaging import bus
from shared.service import runtime
from tests import kube

NODE = "node-a"


class KernelWithoutTwos(MemoryKernel):
    """Refuses a virtual service with the ``twos`` scheduler as Linux < 6.7 does (ENOENT), applying every
    other operation, as ``NetlinkKernel.apply`` does."""

    async def apply(self, ops: list[Op]) -> None:
        refused = [op for op in ops if isinstance(op, AddService | EditService) and op.scheduler == "twos"]
        await super().apply([op for op in ops if op not in refused and not _of(op, refused)])
        if refused:
            raise Refused([f"{op}: the kernel has no IPVS scheduler 'twos'" for op in refused])


def _of(op: Op, refused: list[Op]) -> bool:
    return any(getattr(op, "service", None) == r.key for r in refused)  # a real server of a refused service


def _deliveries(planner: Planner) -> list[bus.Delivery]:
    twos = kube.service("odd", cluster_ip="10.96.0.2")
    twos["metadata"]["annotations"] = {"kipvs.io/scheduler": "twos"}
    objects = [kube.node(NODE, "192.0.2.1"), kube.service("web", cluster_ip="10.96.0.1"), twos,
               kube.service("api", cluster_ip="10.96.0.3")]
    lines = [json.dumps({"type": "ADDED", "object": {**o, "metadata": {**o["metadata"], "resourceVersion": "1"}}})
             for o in objects]
    out = []
    for n, envelope in enumerate(read_events(lines, "test")):
        for delta in planner.handle(envelope, n + 1):
            seq = len(out) + 1
            msg = Msg(None, subject="kipvs.plan.all", reply=f"$JS.ACK.KIPVS_PLAN.applier-{NODE}.1.{seq}.{seq}.0.0")
            out.append(bus.Delivery(msg, delta))
    return out


async def test_a_refused_service_leaves_the_others_applied_and_the_applier_running(nc) -> None:
    js = await bus.setup(nc)
    cfg = ApplierConfig(node=NODE, backend="memory", http_listen="", healthz_bind_address="")
    ctx = runtime.ServiceContext(name="applier", config=cfg, nc=nc, js=js, stop=asyncio.Event())
    kernel = KernelWithoutTwos()
    await kernel.setup()
    applier = Applier(ctx, NODE, kernel)
    await applier.handle(_deliveries(Planner()))  # raised (and the applier exited) before
    assert {key[1] for key in kernel.ipvs} == {"10.96.0.1", "10.96.0.3"}
    assert "10.96.0.2" in kernel.addresses, "the refused Service's address and set members are still written"
    await applier.drift_check()
    await applier.drift_check()  # again: the refusal is reported at every check, nothing raised
    assert {key[1] for key in kernel.ipvs} == {"10.96.0.1", "10.96.0.3"}
