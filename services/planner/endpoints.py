"""Which endpoints a node sends a Service port's traffic to: kube-proxy's rules, per node. Pure.

Mirrors kube-proxy's ``CategorizeEndpoints`` (pkg/proxy/topology.go) and the IPVS proxier's use of it:

- cluster endpoints: ready ones, narrowed to the node's zone when topology hints can be used; if none is
  ready anywhere, serving+terminating ones (ignoring topology);
- local endpoints (when a traffic policy is Local): ready ones on this node, else serving+terminating
  ones on this node;
- IPVS mode's fallback: a Local policy with no local endpoint uses the cluster endpoints (kube-proxy PR
  97081: local pods can still reach the Service), unlike iptables mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from kipvs.shared.events import Endpoint, NodeFacts


@dataclass(frozen=True, slots=True)
class Selected:
    internal: tuple[Endpoint, ...]  # for the ClusterIP virtual services
    external: tuple[Endpoint, ...]  # for NodePort, externalIP and load-balancer virtual services


def _can_use_topology(endpoints: tuple[Endpoint, ...], zone: str) -> bool:
    if not zone:
        return False
    has_ready = has_for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.hints:
            return False  # hints must be on every ready endpoint
        if zone in ep.hints:
            has_for_zone = True
    return has_ready and has_for_zone


def select(endpoints: tuple[Endpoint, ...], node: NodeFacts | None, internal_local: bool, external_local: bool,
           externally_accessible: bool) -> Selected:
    name = node.name if node else ""
    zone = node.zone if node else ""
    uses_cluster = not internal_local or (externally_accessible and not external_local)
    uses_local = internal_local or (externally_accessible and external_local)
    cluster: tuple[Endpoint, ...] = ()
    if uses_cluster:
        topology = _can_use_topology(endpoints, zone)
        cluster = tuple(ep for ep in endpoints if ep.ready and (not topology or zone in ep.hints))
        if not cluster:
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
    local: tuple[Endpoint, ...] = ()
    if uses_local and name:
        local = tuple(ep for ep in endpoints if ep.node == name and ep.ready)
        if not local:
            local = tuple(ep for ep in endpoints if ep.node == name and ep.serving and ep.terminating)
    internal = (local or cluster) if internal_local else cluster
    external = (local or cluster) if external_local else cluster
    return Selected(internal, external)
