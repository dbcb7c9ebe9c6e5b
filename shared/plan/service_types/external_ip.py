"""externalIPs: one virtual service each; bound to kube-ipvs0 unless the node already owns the address
(kube-proxy leaves such an address on its interface).

The entry goes into KUBE-EXTERNAL-IP, or, with externalTrafficPolicy Local, into KUBE-EXTERNAL-IP-LOCAL
*only* (pkg/proxy/ipvs/proxier.go ``syncProxyRules``, the external-IP loop: ``if svcInfo.ExternalPolicyLocal()``
the -LOCAL set, else the one that is masqueraded; kubernetes#69811, #97073, fixed by PR 88786). Load-balancer
IPs differ: they go into both sets (``load_balancer``)."""

from __future__ import annotations

from shared.contract.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, family_of
from .common import external_address


def program(plan: ServicePlan, port: PortPlan, family: int, node: NodeFacts | None,
            endpoints: tuple[Endpoint, ...], out: Contribution) -> None:
    for ip in plan.external_ips:
        if family_of(ip) == family:
            external_address(plan, port, ip, node, endpoints, out, "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL",
                             local_only=True)
