"""externalIPs: one virtual service each; bound to kube-ipvs0 unless the node already owns the address
(kube-proxy leaves such an address on its interface)."""

from __future__ import annotations

from kipvs.shared.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, family_of, ipset_name
from .common import entry, virtual_service


def program(plan: ServicePlan, port: PortPlan, family: int, node: NodeFacts | None,
            endpoints: tuple[Endpoint, ...], out: Contribution) -> None:
    own = set(node.addresses) if node else set()
    for ip in plan.external_ips:
        if family_of(ip) != family:
            continue
        out.virtual_services.append(virtual_service(plan, port.protocol, ip, port.port, endpoints))
        if ip not in own:
            out.addresses.add(ip)
        e = entry(ip, port.protocol, port.port)
        out.ipset_entries.add((ipset_name("KUBE-EXTERNAL-IP", family), e))
        if plan.external_policy_local:
            out.ipset_entries.add((ipset_name("KUBE-EXTERNAL-IP-LOCAL", family), e))
