"""The applier's kube-proxy-style metrics: the network-programming SLI, the sync (apply) duration and
timestamp, Services with a Local traffic policy and no local endpoint, what is programmed, and the
node's Calico endpoint marks.

Sources followed: kubernetes pkg/proxy/metrics/metrics.go (names, buckets, meanings),
pkg/proxy/endpointschangetracker.go (a trigger time before the proxy started is not measured) and the
proxiers' syncProxyRules (``sync_proxy_rules_no_local_endpoints_total``: a gauge recounted every sync,
per Service port, of ``internal`` / ``external`` traffic policy Local with no local endpoint, a ready
one or else a serving-terminating one); the changes counters and the last-queued timestamp
(``sync_proxy_rules_service_changes_total`` / ``..._endpoint_changes_total``: each Service / endpoints
change the proxy takes in, servicechangetracker.go and endpointschangetracker.go;
``sync_proxy_rules_last_queued_timestamp_seconds``: when a sync was last asked for, so a value well past
``..._last_timestamp_seconds`` means a hung proxy); ``proxy_healthz_total`` / ``proxy_livez_total`` by
``code`` (proxier_health.go).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec

from shared.contract import events
from shared.contract.events import ServicePlan
from shared.service.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_PROXY_RULES_BUCKETS, Registry

TRAFFIC_POLICIES = ("internal", "external")
HTTP_CODES = ("200", "503")


def health_counters(m: Registry) -> tuple[object, object]:
    """(healthz, livez) answer counters of the node health server, by HTTP status, both codes from 0."""
    return (m.counter("kipvs_proxy_healthz_total", "node health server /healthz answers, by HTTP status",
                      labels={"code": HTTP_CODES}),
            m.counter("kipvs_proxy_livez_total", "node health server /livez answers, by HTTP status",
                      labels={"code": HTTP_CODES}))


def _without_endpoints(plan: ServicePlan | None) -> ServicePlan | None:
    if plan is None:
        return None
    return msgspec.structs.replace(plan, ports=tuple(msgspec.structs.replace(p, endpoints=()) for p in plan.ports))


def _endpoints(plan: ServicePlan | None) -> tuple[tuple[str, str, events.Endpoint], ...]:
    """Each endpoint with the port (name, protocol) it serves: a Service without endpoints has none."""
    return tuple((p.name, p.protocol, ep) for p in plan.ports for ep in p.endpoints) if plan is not None else ()


def change_kinds(before: ServicePlan | None, after: ServicePlan | None) -> tuple[bool, bool]:
    """(the Service changed, its endpoints changed) from one plan of it to the next (None: absent); a
    Service added or removed with endpoints changes both, as kube-proxy sees its Service and its slices."""
    return _without_endpoints(before) != _without_endpoints(after), _endpoints(before) != _endpoints(after)


def service_keys(delta: events.PlanDelta) -> list[str]:
    """The Services a shared delta sets or removes."""
    return [op.service.key if isinstance(op, events.SetService) else op.key
            for op in delta.ops if isinstance(op, events.SetService | events.RemoveService)]


def no_local_endpoints(plan: ServicePlan, node: str) -> tuple[int, int]:
    """(internal, external): the Service's ports whose internal / external traffic policy is Local and
    that have no endpoint on ``node`` (ready, or else serving and terminating), as kube-proxy counts
    them. ``external_policy_local`` is only set for an externally reachable Service (parse.py)."""
    if not (plan.internal_policy_local or plan.external_policy_local):
        return 0, 0
    missing = sum(1 for port in plan.ports if not _has_local(port.endpoints, node))
    return (missing if plan.internal_policy_local else 0), (missing if plan.external_policy_local else 0)


def _has_local(endpoints: Iterable[events.Endpoint], node: str) -> bool:
    local = [ep for ep in endpoints if ep.node == node]
    return any(ep.ready for ep in local) or any(ep.serving and ep.terminating for ep in local)


def mark_capacity(calico: events.SetNodeCalico | None) -> int:
    """Endpoints the node's endpoint mask can mark: 2^bits positions minus "no mark" and the non-Calico
    one (Felix's markbits allocator; services/planner/endpoint_marks.py MarkLayout.capacity)."""
    if calico is None or not calico.layout.endpoint_mask:
        return 0
    return max((1 << bin(calico.layout.endpoint_mask).count("1")) - 2, 0)


class ProgrammingMetrics:
    """Declared at the applier's start, every series with a sample from then on.

    ``programmed`` reports one applied batch: each shared delta in it gets one
    ``network_programming_duration_seconds`` sample, from its EndpointSlice's trigger time when it has
    one, else from the record time of the Kubernetes change it came from (its envelope's time), to now,
    the moment the kernel write completed. Changes from before this process started are not measured."""

    def __init__(self, m: Registry, node: str, counts: Callable[[], tuple[int, int]],
                 calico: Callable[[], events.SetNodeCalico | None], pending: Callable[[], int]) -> None:
        self.node = node
        self.started_ns = time.time_ns()
        self.by_service: dict[str, tuple[int, int]] = {}
        self.no_local_totals = (0, 0)  # (internal, external): by_service summed, kept per change
        self.programming = m.histogram(
            "kipvs_network_programming_duration_seconds",
            "from a change (the EndpointSlice's last-change-trigger-time, else the log's record time) to this "
            "node's kernel write for it, per plan delta", NETWORK_PROGRAMMING_BUCKETS)
        self.sync_duration = m.histogram("kipvs_sync_proxy_rules_duration_seconds",
                                         "time to apply one batch of plan deltas to the kernel",
                                         SYNC_PROXY_RULES_BUCKETS)
        self.last_sync = m.gauge("kipvs_sync_proxy_rules_last_timestamp_seconds",
                                 "Unix time the kernel last matched the plan (a batch applied, or bootstrapped)")
        self.last_queued = m.gauge("kipvs_sync_proxy_rules_last_queued_timestamp_seconds",
                                   "Unix time plan deltas were last taken in to be applied")
        self.service_changes = m.counter("kipvs_sync_proxy_rules_service_changes_total",
                                         "Service changes taken in from plan deltas (endpoints aside)")
        self.endpoint_changes = m.counter("kipvs_sync_proxy_rules_endpoint_changes_total",
                                          "changes of a Service's endpoints taken in from plan deltas")
        self.no_local = m.gauge("kipvs_sync_proxy_rules_no_local_endpoints_total",
                                "Service ports with a Local traffic policy and no local endpoint on this node",
                                labels={"traffic_policy": TRAFFIC_POLICIES})
        m.gauge("kipvs_applier_virtual_services", "IPVS virtual services programmed", read=lambda: counts()[0])
        m.gauge("kipvs_applier_real_servers", "IPVS real servers programmed, over every virtual service",
                read=lambda: counts()[1])
        m.gauge("kipvs_applier_deltas_pending", "plan deltas on this node's subjects not yet taken (consumer lag)",
                read=pending)
        m.gauge("kipvs_applier_endpoint_marks", "Calico endpoint marks in use on this node",
                read=lambda: len(c.endpoint_marks) if (c := calico()) is not None else 0)
        m.gauge("kipvs_applier_endpoint_marks_capacity", "Calico endpoint marks this node's endpoint mask allows",
                read=lambda: mark_capacity(calico()))
        m.gauge("kipvs_applier_endpoints_unmarked", "pods on this node left without an endpoint mark (exhausted)",
                read=lambda: len(c.unmarked) if (c := calico()) is not None else 0)

    def services_changed(self, services: dict[str, ServicePlan], keys: Iterable[str]) -> None:
        """Recount the no-local-endpoints gauge for the Services ``keys`` (present or removed)."""
        for key in keys:
            plan = services.get(key)
            counts = no_local_endpoints(plan, self.node) if plan is not None else (0, 0)
            old = self.by_service.pop(key, (0, 0))
            if counts != (0, 0):
                self.by_service[key] = counts
            # running totals: on a node where most Local-policy Services have no endpoint, a sum over
            # by_service per batch was a walk of thousands of Services for a one-endpoint change
            self.no_local_totals = (self.no_local_totals[0] + counts[0] - old[0],
                                    self.no_local_totals[1] + counts[1] - old[1])
        self.no_local.labels("internal").set(self.no_local_totals[0])
        self.no_local.labels("external").set(self.no_local_totals[1])

    def queued(self) -> None:
        """Plan deltas arrived to be applied (kube-proxy: a sync was queued)."""
        self.last_queued.set(time.time())

    def count_changes(self, before: dict[str, ServicePlan | None], after: dict[str, ServicePlan]) -> None:
        """Count one applied delta's changes: ``before`` its Services' plans before it (service_keys),
        ``after`` the plan's Services once applied."""
        for key, old in before.items():
            service, endpoints = change_kinds(old, after.get(key))
            if service:
                self.service_changes.inc()
            if endpoints:
                self.endpoint_changes.inc()

    def synced(self, seconds: float | None = None) -> None:
        """The kernel matches the plan now; ``seconds``: how long the batch took (None: not a batch)."""
        if seconds is not None:
            self.sync_duration.observe(seconds)
        self.last_sync.set(time.time())

    def programmed(self, deltas: Iterable[events.Envelope]) -> None:
        now = time.time_ns()
        for envelope in deltas:
            delta = envelope.record
            assert isinstance(delta, events.PlanDelta)
            start = delta.trigger_time_ns or envelope.time_ns
            if start >= self.started_ns:
                self.programming.observe(max(now - start, 0) / 1e9)
