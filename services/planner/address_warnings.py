"""The planner's warnings about a Service's addresses and node ports, kept incrementally. Pure.

Rules of this room: a warning is set when its condition starts, changed when its text would change and
cleared when it ends, each as a plan operation on the shared subject (``SetWarning`` / ``ClearWarning``);
never a warning for a condition that no longer holds, and the same input always gives the same text.
The indexes it reads (Services by virtual service, by external address; nodes by InternalIP) belong to
the :class:`~.core.Planner` that mixes this in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from shared.contract.events import ClearWarning, PlanOp, PlanWarning, ServicePlan, SetWarning
from shared.plan.node_state import family_of

from .calico import CalicoState, nodeport_problem


class AddressWarnings:
    """address-conflict, service-address-is-node-address, nodeport-outside-ranges, legacy-address,
    invalid-address and stale-load-balancer-status, for the Planner."""

    warnings: dict[str, PlanWarning]
    calico: CalicoState
    node_ports: dict[str, tuple[int, ...]]
    vip_services: defaultdict[tuple[str, str, int], set[str]]
    service_vips: dict[str, frozenset[tuple[str, str, int]]]
    external_services: defaultdict[str, set[str]]
    service_externals: dict[str, frozenset[str]]
    address_nodes: defaultdict[str, set[str]]

    def _check_node_ports(self, key: str, ops: list[PlanOp]) -> None:
        """The shared nodeport-outside-ranges warning of one Service (set, changed or cleared)."""
        warning_id = f"Service/{key}/nodeport-outside-ranges"
        ports = self.node_ports.get(key, ())
        problem = nodeport_problem(key, ports, self.calico.range_groups()) if ports else ""
        if problem:
            self._warn(ops, warning_id, "nodeport-outside-ranges", "Service", key, problem)
        else:
            self._clear(ops, warning_id)

    def _index_addresses(self, key: str, plan: ServicePlan | None, ops: list[PlanOp]) -> None:
        """Keep the address indexes for one Service and re-check the warnings its change can move."""
        externals = frozenset(_served_externals(plan)) if plan else frozenset()
        vips = frozenset((p.protocol, ip, p.port) for p in plan.ports
                         for ip in (*plan.cluster_ips, *externals)) if plan else frozenset()
        old_vips = _reindex(self.service_vips, self.vip_services, key, vips)
        if vips != old_vips:
            sharing = {key}.union(*(self.vip_services.get(vip, ()) for vip in old_vips | vips))
            for other in sorted(sharing):
                self._check_shared_vips(other, ops)
        if _reindex(self.service_externals, self.external_services, key, externals) != externals:
            self._check_node_addresses(key, ops)

    def _check_shared_vips(self, key: str, ops: list[PlanOp]) -> None:
        """address-conflict: two Services on one address, protocol and port. Every node programs the
        Service first by namespace/name (resolve.py); the warning names the one not honoured and its owner."""
        lost = sorted((vip, min(self.vip_services[vip])) for vip in self.service_vips.get(key, ())
                      if min(self.vip_services[vip]) != key)
        warning_id = f"Service/{key}/address-conflict"
        if not lost:
            self._clear(ops, warning_id)
            return
        taken = "; ".join(f"{proto} {_hostport(ip, port)} belongs to Service {owner}"
                          for (proto, ip, port), owner in lost)
        self._warn(ops, warning_id, "address-conflict", "Service", key,
                   f"Service {key} is not programmed where another Service holds the same address and port "
                   f"(the first by namespace/name owns it on every node): {taken}")

    def _check_node_addresses(self, key: str, ops: list[PlanOp]) -> None:
        """service-address-is-node-address: an external or load-balancer address that is a node's
        InternalIP. That node keeps it unbound (it owns it); every other node binds it on kube-ipvs0 and
        from then on reaches the Service, not that node, at that address."""
        clashes = sorted((ip, sorted(self.address_nodes[ip])) for ip in self.service_externals.get(key, ())
                         if self.address_nodes.get(ip))
        warning_id = f"Service/{key}/node-address"
        if not clashes:
            self._clear(ops, warning_id)
            return
        detail = "; ".join(f"{ip} is the InternalIP of {', '.join(nodes)}" for ip, nodes in clashes)
        self._warn(ops, warning_id, "service-address-is-node-address", "Service", key,
                   f"Service {key} uses a node's own address: {detail}. That node leaves it unbound; every "
                   "other node binds it on kube-ipvs0 and can no longer reach that node at it")

    def _warn(self, ops: list[PlanOp], id: str, code: str, kind: str, obj: str, message: str) -> None:
        warning = PlanWarning(id=id, code=code, kind=kind, object=obj, message=message)
        if self.warnings.get(id) != warning:
            self.warnings[id] = warning
            ops.append(SetWarning(warning))

    def _legacy(self, ops: list[PlanOp], kind: str, key: str, notes: tuple[str, ...]) -> None:
        """legacy-address: the object is planned, its addresses read as kube-proxy reads legacy ones
        (leading zeros: CVE-2021-29923); the message names each field, so it can be fixed."""
        warning_id = f"{kind}/{key}/legacy-address"
        if notes:
            self._warn(ops, warning_id, "legacy-address", kind, key, f"{kind} {key}: " + "; ".join(notes))
        else:
            self._clear(ops, warning_id)

    def _skipped(self, ops: list[PlanOp], key: str, notes: tuple[str, ...]) -> None:
        """invalid-address: the Service is planned without the list entries kube-proxy cannot read either
        (an external IP, a load-balancer ingress IP, a source range: parse.py ``_each``); the message names
        each field and value, so it can be fixed."""
        warning_id = f"Service/{key}/invalid-address"
        if notes:
            self._warn(ops, warning_id, "invalid-address", "Service", key, f"Service {key}: " + "; ".join(notes))
        else:
            self._clear(ops, warning_id)

    def _stale_status(self, ops: list[PlanOp], key: str, ingress: tuple[str, ...]) -> None:
        """stale-load-balancer-status: a Service no longer a LoadBalancer whose status still lists ingress
        addresses; kipvs does not serve them (docs/plan-format.md, parity notes)."""
        warning_id = f"Service/{key}/stale-load-balancer-status"
        if ingress:
            self._warn(ops, warning_id, "stale-load-balancer-status", "Service", key,
                       f"Service {key} is no LoadBalancer but its status still lists {', '.join(ingress)}: not "
                       "served (kube-proxy serves it until the load-balancer controller clears the status)")
        else:
            self._clear(ops, warning_id)

    def _clear(self, ops: list[PlanOp], id: str) -> None:
        if self.warnings.pop(id, None) is not None:
            ops.append(ClearWarning(id))


def _served_externals(plan: ServicePlan) -> tuple[str, ...]:
    """The external and load-balancer IPs a Service is programmed on: those of a family it has a cluster IP
    in. kube-proxy runs one proxier per family, and a proxier skips a Service
    without a cluster IP of its family (serviceport.go ``newBaseServiceInfo`` takes
    ``GetClusterIPByFamily``; servicechangetracker.go ``serviceToServiceMap`` returns nothing for it), so
    an IPv6 external IP of an IPv4-only Service is served nowhere (shared/plan/resolve.py, likewise), and
    a Service that really holds that address is no conflict."""
    families = {family_of(ip) for ip in plan.cluster_ips}
    return tuple(ip for ip in (*plan.external_ips, *plan.load_balancer_ips) if family_of(ip) in families)


def _reindex(forward: dict[str, frozenset[Any]], reverse: dict[Any, set[str]], key: str,
             values: frozenset[Any]) -> frozenset[Any]:
    """Set ``forward[key]`` to ``values`` (dropped when empty) and keep ``reverse`` (value -> keys) in
    step; returns the values ``key`` had before."""
    old = forward.get(key, frozenset())
    for value in old - values:
        reverse[value].discard(key)
        if not reverse[value]:
            del reverse[value]
    for value in values - old:
        reverse[value].add(key)
    if values:
        forward[key] = values
    else:
        forward.pop(key, None)
    return old


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
