"""Per-node resolution: the shared plan plus a node's name gives that node's kernel state. Pure.

Rules of this room: the output depends only on the plan and the node's facts (no clock, no kernel
read); the same inputs give the same :class:`NodeState`, whichever process resolves it.

The one function both the applier (which knows its node) and ``kipvs plan --node`` use, so a node's
state is never computed two ways. Shared state is published once for every node; what differs per node
(NodePort addresses, Local traffic policies, topology hints, hairpin entries) is decided here.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.contract.events import NodeFacts, PortPlan, ServicePlan

from .endpoints import select
from .node_state import Contribution, NodeState, family_of, ipset_name
from .service_types import cluster_ip, external_ip, load_balancer, node_port


def externally_accessible(plan: ServicePlan, port: PortPlan, family: int) -> bool:
    """Whether this port takes traffic from outside in this family: a node port, or an external or
    load-balancer IP *of the family*. kube-proxy runs one proxier per family and hands each the
    Service's addresses of its family only (serviceport.go ``newBaseServiceInfo``), so its
    ``BaseServicePortInfo.ExternallyAccessible`` (and so ``UsesClusterEndpoints`` / ``UsesLocalEndpoints``)
    is per family: an IPv4-only external IP does not make the IPv6 side reachable from outside."""
    return bool(port.node_port or any(family_of(ip) == family for ip in plan.external_ips)
                or any(family_of(ip) == family for ip in plan.load_balancer_ips))


def resolve_service(plan: ServicePlan, node: NodeFacts | None) -> Contribution:
    """What one Service programs on one node (``node`` None: a node the plan has no facts for yet)."""
    out = Contribution()
    families = sorted({family_of(ip) for ip in plan.cluster_ips})
    for port in plan.ports:
        for family in families:
            endpoints = tuple(ep for ep in port.endpoints if family_of(ep.ip) == family)
            chosen = select(endpoints, node, plan.internal_policy_local, plan.external_policy_local,
                            externally_accessible(plan, port, family))
            cluster_ip.program(plan, port, family, chosen.internal, out)
            node_port.program(plan, port, family, node, chosen.external, out)
            external_ip.program(plan, port, family, node, chosen.external, out)
            load_balancer.program(plan, port, family, node, chosen.external, out)
            if node is not None:
                for ep in endpoints:  # hairpin: a pod reaching itself through its Service is SNATed
                    if ep.node == node.name:
                        out.ipset_entries.add((ipset_name("KUBE-LOOP-BACK", family),
                                               f"{ep.ip},{port.protocol.lower()}:{ep.port},{ep.ip}"))
    if plan.health_check_node_port:
        # every node, as kube-proxy: the load balancer's probe must pass the VIP port filter (kubernetes
        # PR 117723), whether or not this node has a local endpoint (the answer says which)
        for family in families:
            out.ipset_entries.add((ipset_name("KUBE-HEALTH-CHECK-NODE-PORT", family), str(plan.health_check_node_port)))
    return out


def resolve_node(services: Iterable[ServicePlan], node: NodeFacts | None) -> NodeState:
    state = NodeState()
    for plan in sorted(services, key=lambda p: p.key):
        state.add(resolve_service(plan, node))
    return state.finish()
