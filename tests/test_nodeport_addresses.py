"""kube-proxy's --nodeport-addresses CIDRs (kipvs --nodeport-cidrs): only the node's addresses inside them
serve NodePorts and health-check node ports. The deltas come from the real planner core, the applier
reports to a real nats-server, the kernel is the memory one."""

from __future__ import annotations

import asyncio
import json

from nats.aio.msg import Msg

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, settings_of
from services.applier.nodeport_addresses import within
from services.applier.shell import Applier
from services.planner.core import Planner
from services.planner.log_replay import read_events
from shared.messaging import bus
from shared.service import config, runtime
from tests import kube

NODE = "node-a"


def test_within_keeps_the_addresses_inside_the_cidrs_in_order() -> None:
    addresses = ("10.1.0.5", "192.168.7.5", "fd00::5", "2001:db8::5")
    assert within(addresses, ()) == addresses
    assert within(addresses, ("10.0.0.0/8", "fd00::/8")) == ("10.1.0.5", "fd00::5")
    assert within(addresses, ("0.0.0.0/0",)) == ("10.1.0.5", "192.168.7.5")  # a family's CIDR keeps only it


def _deliveries(objects: list[dict]) -> list[bus.Delivery]:
    lines = [json.dumps({"type": "ADDED", "object": {**o, "metadata": {**o["metadata"], "resourceVersion": "1"}}})
             for o in objects]
    planner, out = Planner(), []
    for n, env in enumerate(read_events(lines, "test")):
        for delta in planner.handle(env, n + 1):
            seq = len(out) + 1
            msg = Msg(None, subject="kipvs.plan.all", reply=f"$JS.ACK.KIPVS_PLAN.applier-{NODE}.1.{seq}.{seq}.0.0")
            out.append(bus.Delivery(msg, delta))
    return out


async def _nodeport_addresses(nc, flags: dict[str, str]) -> set[str]:
    """The addresses node-a programs a NodePort Service on, with these applier flags."""
    cfg = config.load(ApplierConfig, {"node": NODE, "backend": "memory", "http_listen": "",
                                      "healthz_bind_address": "", **flags}, {})
    ctx = runtime.ServiceContext(name="applier", config=cfg, nc=nc, js=await bus.setup(nc), stop=asyncio.Event())
    kernel = MemoryKernel(interface_addresses=("10.1.0.5", "192.168.7.5"))
    await kernel.setup()
    applier = Applier(ctx, NODE, kernel, settings=settings_of(cfg))
    applier.core.local_addresses = await kernel.node_addresses()
    port = {"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}
    try:
        await applier.handle(_deliveries([
            kube.node(NODE, "10.1.0.5"), kube.service("web", ports=[port], type="NodePort"),
            kube.endpoint_slice("web-x", "web", [kube.endpoint("10.244.0.9", NODE)])]))
        return {ip for (_, ip, p) in kernel.ipvs if p == 30080}
    finally:
        await applier.reports.flush()
        await applier.health.close()


async def test_nodeport_addresses_cidrs_filter_the_interfaces(nc) -> None:
    assert await _nodeport_addresses(nc, {"node_addresses": "interfaces"}) == {"10.1.0.5", "192.168.7.5"}
    # kube-proxy's flag: interfaces, filtered
    flags = {"kube-proxy:nodeport-addresses": "192.168.0.0/16"}
    assert await _nodeport_addresses(nc, flags) == {"192.168.7.5"}
    assert await _nodeport_addresses(nc, {"kube-proxy:nodeport-addresses": "primary"}) == {"10.1.0.5"}
