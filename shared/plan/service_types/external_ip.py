"""externalIPs: one virtual service each; bound to kube-ipvs0 unless the node already owns the address
(kube-proxy leaves such an address on its interface)."""

from __future__ import annotations

from kipvs.shared.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, family_of
from .common import external_address


def program(plan: ServicePlan, port: PortPlan, family: int, node: NodeFacts | None,
            endpoints: tuple[Endpoint, ...], out: Contribution) -> None:
    for ip in plan.external_ips:
        if family_of(ip) == family:
            external_address(plan, port, ip, node, endpoints, out, "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL")
