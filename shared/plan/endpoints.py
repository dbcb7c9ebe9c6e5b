"""Which endpoints a node sends a Service port's traffic to: kube-proxy's rules, per node. Pure.

Mirrors kube-proxy's ``CategorizeEndpoints`` (pkg/proxy/topology.go, 1.35) and the IPVS proxier's use of it:

- cluster endpoints, computed when the Service uses them (serviceport.go ``UsesClusterEndpoints``:
  internalTrafficPolicy is not Local, or the Service is reachable from outside): the ready ones, narrowed
  by topology hints (below); if none is ready anywhere, the serving+terminating ones (ignoring hints);
- local endpoints (when a traffic policy is Local): ready ones on this node, else serving+terminating ones
  on this node;
- IPVS mode's fallback: a Local policy with no local endpoint uses the cluster endpoints (kube-proxy PR
  97081: local pods can still reach the Service), unlike iptables mode. A ClusterIP-only Service with
  internalTrafficPolicy Local computes no cluster endpoints, so it stays empty on a node without a pod.

Topology (``topologyModeFromHints``), over the ready endpoints: when every one carries node hints
(``hints.forNodes``, trafficDistribution PreferSameNode) and one is hinted for this node, only those hinted
for this node; otherwise, when every one carries zone hints and one is hinted for this node's zone, only
those hinted for the zone; otherwise all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.contract.events import Endpoint, NodeFacts

TopologyMode = Literal["", "node", "zone"]


@dataclass(frozen=True, slots=True)
class Selected:
    internal: tuple[Endpoint, ...]  # for the ClusterIP virtual services
    external: tuple[Endpoint, ...]  # for NodePort, externalIP and load-balancer virtual services


def topology_mode(endpoints: tuple[Endpoint, ...], node: str, zone: str) -> TopologyMode:
    """kube-proxy's topologyModeFromHints: which hints this node follows ("" for none)."""
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.node_hints:
            all_node_hints = False
        elif node in ep.node_hints:
            for_node = True
        if not ep.hints:
            all_zone_hints = False
        elif zone in ep.hints:
            for_zone = True
    if all_node_hints and for_node and node:
        return "node"
    if all_zone_hints and for_zone and zone:
        return "zone"
    return ""


def _available(ep: Endpoint, mode: TopologyMode, node: str, zone: str) -> bool:
    if mode == "node":
        return node in ep.node_hints
    if mode == "zone":
        return zone in ep.hints
    return True


def select(endpoints: tuple[Endpoint, ...], node: NodeFacts | None, internal_local: bool, external_local: bool,
           externally_accessible: bool) -> Selected:
    name = node.name if node else ""
    zone = node.zone if node else ""
    uses_cluster = not internal_local or externally_accessible
    uses_local = internal_local or (externally_accessible and external_local)
    cluster: tuple[Endpoint, ...] = ()
    if uses_cluster:
        mode = topology_mode(endpoints, name, zone)
        cluster = tuple(ep for ep in endpoints if ep.ready and _available(ep, mode, name, zone))
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
