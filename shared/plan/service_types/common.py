"""Pieces every Service type's rules share."""

from __future__ import annotations

from kipvs.shared.events import Endpoint, ServicePlan

from ..node_state import VirtualService


def entry(ip: str, protocol: str, port: int) -> str:
    """An ipset hash:ip,port entry as kube-proxy writes it: ``10.96.0.10,tcp:80``."""
    return f"{ip},{protocol.lower()}:{port}"


def virtual_service(plan: ServicePlan, protocol: str, ip: str, port: int,
                    endpoints: tuple[Endpoint, ...]) -> VirtualService:
    """Masquerade forwarding, weight 1 for every real server (kube-proxy IPVS mode)."""
    return VirtualService(protocol=protocol, ip=ip, port=port, scheduler=plan.scheduler,
                          persistence_timeout=plan.persistence_timeout,
                          reals={(ep.ip, ep.port): 1 for ep in endpoints}, service=plan.key)
