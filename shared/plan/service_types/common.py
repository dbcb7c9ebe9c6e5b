"""Pieces every Service type's rules share."""

from __future__ import annotations

from shared.contract.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, VirtualService, family_of, ipset_name


def entry(ip: str, protocol: str, port: int) -> str:
    """An ipset hash:ip,port entry as kube-proxy writes it: ``10.96.0.10,tcp:80``."""
    return f"{ip},{protocol.lower()}:{port}"


def external_address(plan: ServicePlan, port: PortPlan, ip: str, node: NodeFacts | None,
                     endpoints: tuple[Endpoint, ...], out: Contribution, set_base: str, local_set_base: str,
                     local_only: bool = False) -> str:
    """An address reachable from outside (an external IP, a load-balancer IP): its virtual service, bound
    on kube-ipvs0 unless the node owns the address (kube-proxy checks every external address against the
    node's before binding: binding a node's own address would put it in KUBE-IPVS-IPS, where the VIP port
    filter refuses ssh and the kubelet on it, kubernetes issue 114815), and its ipset entries: ``set_base``,
    and ``local_set_base`` too with externalTrafficPolicy Local; with ``local_only``, a Local Service's
    entry goes into ``local_set_base`` alone. Returns the entry (``ip,proto:port``)."""
    family = family_of(ip)
    out.virtual_services.append(virtual_service(plan, port.protocol, ip, port.port, endpoints))
    if node is None or ip not in node.addresses:
        out.addresses.add(ip)
    e = entry(ip, port.protocol, port.port)
    if not (local_only and plan.external_policy_local):
        out.ipset_entries.add((ipset_name(set_base, family), e))
    if plan.external_policy_local:
        out.ipset_entries.add((ipset_name(local_set_base, family), e))
    return e


def virtual_service(plan: ServicePlan, protocol: str, ip: str, port: int,
                    endpoints: tuple[Endpoint, ...]) -> VirtualService:
    """Masquerade forwarding, weight 1 for every real server (kube-proxy IPVS mode)."""
    return VirtualService(protocol=protocol, ip=ip, port=port, scheduler=plan.scheduler,
                          persistence_timeout=plan.persistence_timeout,
                          reals={(ep.ip, ep.port): 1 for ep in endpoints}, service=plan.key)
