"""NodePort: one virtual service per node address of the family and nodePort (not on kube-ipvs0).

Node addresses are the node's InternalIP addresses from its Node object (``NodeFacts.addresses``).
TCP and UDP node ports go into bitmap:port sets; SCTP into a hash:ip,port set per node address, as
kube-proxy does.
"""

from __future__ import annotations

from shared.contract.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, family_of, ipset_name
from .common import entry, virtual_service


def program(plan: ServicePlan, port: PortPlan, family: int, node: NodeFacts | None,
            endpoints: tuple[Endpoint, ...], out: Contribution) -> None:
    if not port.node_port or node is None:
        return
    addresses = [ip for ip in node.addresses if family_of(ip) == family]
    for ip in addresses:
        out.virtual_services.append(virtual_service(plan, port.protocol, ip, port.node_port, endpoints))
    if not addresses:
        return
    local = plan.external_policy_local
    if port.protocol == "SCTP":
        for ip in addresses:
            out.ipset_entries.add((ipset_name("KUBE-NODE-PORT-SCTP-HASH", family), entry(ip, "SCTP", port.node_port)))
            if local:
                out.ipset_entries.add((ipset_name("KUBE-NODE-PORT-LOCAL-SCTP-HASH", family),
                                       entry(ip, "SCTP", port.node_port)))
    else:
        out.ipset_entries.add((ipset_name(f"KUBE-NODE-PORT-{port.protocol}", family), str(port.node_port)))
        if local:
            out.ipset_entries.add((ipset_name(f"KUBE-NODE-PORT-LOCAL-{port.protocol}", family), str(port.node_port)))
