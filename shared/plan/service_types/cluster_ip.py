"""ClusterIP: one virtual service per cluster IP and port, the VIP bound to kube-ipvs0."""

from __future__ import annotations

from shared.contract.events import Endpoint, PortPlan, ServicePlan

from ..node_state import Contribution, family_of, ipset_name
from .common import entry, virtual_service


def program(plan: ServicePlan, port: PortPlan, family: int, endpoints: tuple[Endpoint, ...],
            out: Contribution) -> None:
    for ip in plan.cluster_ips:
        if family_of(ip) != family:
            continue
        out.virtual_services.append(virtual_service(plan, port.protocol, ip, port.port, endpoints))
        out.addresses.add(ip)
        out.ipset_entries.add((ipset_name("KUBE-CLUSTER-IP", family), entry(ip, port.protocol, port.port)))
