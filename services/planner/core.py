"""The planner's core: a state machine from Kubernetes events to plan deltas. No I/O.

Rules of this room:
- No I/O, no clock, no randomness: the same records in the same order give the same deltas, byte for byte
  (ids, times and causation come from the records). ``kipvs replay`` gates upgrades on exactly this.
- Records arrive in log order, each once (``log_replay.py`` feeds every replay, the service's included);
  ``source_seq`` is the last record's KIPVS_KUBE sequence, ``seq`` the last delta's.
- Bad input never raises: an object kube-proxy would ignore is ignored, one it would reject becomes a
  warning in the plan (``SetWarning``), never an exception out of ``handle``.
- State is held once for every node; what differs per node is resolved by ``shared/plan/resolve.py``.
- A delta is emitted only when the published plan changes; ``correction`` is the one way to compare the
  state with a published plan read back.

``Planner.handle(envelope, source_seq)`` takes one record from the Kubernetes event log and returns the
deltas it causes (usually one, or none). Deterministic: the same records in the same order give the same
deltas, byte for byte (delta ids and times come from the input, never from the clock).

Incremental: a Service or EndpointSlice event recomputes that one Service's plan; a Node event touches
that node's facts. State is held once (not per node); per-node state is resolved from it by
``resolve.py`` where it is needed.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.contract import events
from shared.contract.events import (
    ClearWarning,
    Endpoint,
    NodeFacts,
    PlanDelta,
    PlanOp,
    PlanSnapshot,
    PlanWarning,
    PortPlan,
    RemoveNode,
    RemoveService,
    ServicePlan,
    SetNode,
    SetNodeCalico,
    SetService,
    SetWarning,
)
from shared.plan.plan_state import SharedPlan

from . import parse
from .address_warnings import AddressWarnings
from .calico import CalicoState
from .trigger_time import trigger_time_ns

SHARED_SCOPE = "all"
PRODUCER = "planner"


@dataclass
class PlannerConfig:
    default_scheduler: str = "rr"

    def __post_init__(self) -> None:
        if self.default_scheduler not in parse.SCHEDULERS:
            raise ValueError(f"default scheduler {self.default_scheduler!r} is not an IPVS scheduler "
                             f"({', '.join(sorted(parse.SCHEDULERS))})")


def tune_gc() -> None:
    """The planner holds a large, long-lived, acyclic state (its structs are gc=False) and allocates many
    short-lived dicts per event; collect the young generation less often and move what exists at start
    (the rebuilt state) out of the collector's sight. Measured in `make bench`: about 1.3x more events/s."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _rv_not_newer(rv: str, than: str) -> bool:
    try:
        return int(rv) <= int(than)
    except ValueError:
        return True


@dataclass
class Planner(AddressWarnings):
    config: PlannerConfig = field(default_factory=PlannerConfig)
    services: dict[str, parse.ServiceSpec] = field(default_factory=dict)
    slices: dict[str, parse.SliceSpec] = field(default_factory=dict)
    slices_by_service: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    versions: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, key) -> rv of what we hold
    held_seq: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, key) -> KUBE seq of that record
    plans: dict[str, ServicePlan] = field(default_factory=dict)
    nodes: dict[str, NodeFacts] = field(default_factory=dict)
    warnings: dict[str, PlanWarning] = field(default_factory=dict)
    seq: int = 0  # deltas emitted on the shared subject
    source_seq: int = 0  # last input handled
    calico: CalicoState = field(default_factory=CalicoState)
    node_seq: dict[str, int] = field(default_factory=dict)  # deltas emitted on each node's subject
    node_published: dict[str, SetNodeCalico] = field(default_factory=dict)
    node_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)  # Service key -> its node ports
    # Indexes for the address warnings, kept incrementally: (protocol, ip, port) -> Services holding that
    # virtual service on every node; external/LB address -> Services; node InternalIP -> nodes.
    vip_services: dict[tuple[str, str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    service_vips: dict[str, frozenset[tuple[str, str, int]]] = field(default_factory=dict)
    external_services: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    service_externals: dict[str, frozenset[str]] = field(default_factory=dict)
    address_nodes: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _dirty: set[str] = field(default_factory=set)

    # --- input --------------------------------------------------------------------------------

    def handle(self, envelope: events.Envelope, source_seq: int) -> list[events.Envelope]:
        """One record in, the delta envelopes it causes out."""
        record = envelope.record
        ops: list[PlanOp] = []
        if isinstance(record, events.KubeEvent):
            self._on_event(record.kind, record.action, record.object, record.resource_version, ops, source_seq)
        elif isinstance(record, (events.KubeResync, events.KubeResyncRange)):
            self._on_resync(record, ops)
        self.source_seq = source_seq
        trigger = 0
        if isinstance(record, events.KubeEvent) and record.kind == "EndpointSlice":
            trigger = trigger_time_ns(record.object)
        return self.emit(ops, source_seq, envelope.time_ns, envelope.id, trigger_time_ns=trigger)

    def emit(self, ops: list[PlanOp], source_seq: int, time_ns: int, cause: str,
             trigger_time_ns: int = 0) -> list[events.Envelope]:
        """The delta envelopes for ``ops`` (the shared subject's next delta, if any) and for every node whose
        Calico state changed; ``cause`` is the id of the record they follow from, ``trigger_time_ns`` the
        EndpointSlice's last-change-trigger-time it carried (0: none), kept on the shared delta."""
        out = []
        if ops:
            self.seq += 1
            delta = PlanDelta(scope=SHARED_SCOPE, seq=self.seq, source_seq=source_seq, ops=tuple(ops),
                              trigger_time_ns=trigger_time_ns)
            out.append(events.Envelope(id=f"plan/{SHARED_SCOPE}/{self.seq}", time_ns=time_ns,
                                       producer=PRODUCER, causation=(cause,), record=delta))
        for node in sorted(self._dirty):
            state = self.node_calico(node)
            if self.node_published.get(node) == state:
                continue
            self.node_published[node] = state
            self.node_seq[node] = seq = self.node_seq.get(node, 0) + 1
            delta = PlanDelta(scope=node, seq=seq, source_seq=source_seq, ops=(state,))
            out.append(events.Envelope(id=f"plan/node/{node}/{seq}", time_ns=time_ns, producer=PRODUCER,
                                       causation=(cause,), record=delta))
        self._dirty.clear()
        return out

    def republish_nodes(self, published: dict[str, int]) -> None:
        """Continue each node subject after ``published`` (node -> last delta seq on its subject) and
        publish every node's whole state again with the next :meth:`emit`."""
        for node, seq in published.items():
            self.node_seq[node] = max(self.node_seq.get(node, 0), seq)
        self.node_published.clear()
        self._dirty |= set(published) | set(self.node_seq)

    def node_calico(self, node: str) -> SetNodeCalico:
        """The node's Calico state (node-specific: published on that node's subject only)."""
        return self.calico.state(node)

    def _on_event(self, kind: str, action: str, obj: dict[str, Any], rv: str, ops: list[PlanOp],
                  seq: int = 0) -> None:
        key = parse.object_key(obj)
        if action == "DELETED":
            self.versions.pop((kind, key), None)
            self.held_seq.pop((kind, key), None)
        else:
            self.versions[(kind, key)] = rv
            self.held_seq[(kind, key)] = seq
        if kind == "Service":
            self._on_service(key, None if action == "DELETED" else obj, ops)
        elif kind == "EndpointSlice":
            self._on_slice(key, None if action == "DELETED" else obj, ops)
        elif kind == "Node":
            self._on_node(key, None if action == "DELETED" else obj, ops)
            if action != "DELETED" and key not in self.calico.settings:
                self.calico.ensure_node(key)
                self._dirty.add(key)
                for service in sorted(self.node_ports):  # a node with its own ranges may change the verdict
                    self._check_node_ports(service, ops)
        elif kind == "Pod":
            self._dirty |= self.calico.on_pod(key, None if action == "DELETED" else obj)
        elif kind == "FelixConfiguration":
            spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
            changed = self.calico.on_felix(key, None if action == "DELETED" else spec)
            for node in changed:
                self.calico.ensure_node(node)  # settings now, for the range check below
            self._dirty |= changed
            for service in sorted(self.node_ports):  # ranges may have moved: a rare event, O(NodePort Services)
                self._check_node_ports(service, ops)

    def _on_resync(self, resync: events.KubeResync | events.KubeResyncRange, ops: list[PlanOp]) -> None:
        """Delete what we hold of the kind (in the record's key range) that the live set lacks and that is not
        newer than the list. After a restore of the API server (``restored``) versions order nothing: what
        we took from the log before the list was requested (``listed_after_seq``) and the list lacks is gone,
        whatever its version."""
        low, high = ((resync.key_from, resync.key_to) if isinstance(resync, events.KubeResyncRange) else ("", ""))
        held = [(key, rv) for (kind, key), rv in self.versions.items() if kind == resync.kind
                and key not in resync.live and key >= low and (not high or key < high)]
        if resync.restored:
            gone = sorted(key for key, _ in held if self.held_seq.get((resync.kind, key), 0) <= resync.listed_after_seq)
        else:
            gone = sorted(key for key, rv in held if _rv_not_newer(rv, resync.resource_version))
        for key in gone:
            namespace, _, name = key.rpartition("/")
            stub = {"metadata": {"name": name, **({"namespace": namespace} if namespace else {})}}
            self._on_event(resync.kind, "DELETED", stub, resync.resource_version, ops)

    def _on_service(self, key: str, obj: dict[str, Any] | None, ops: list[PlanOp]) -> None:
        warning_id = f"Service/{key}"
        spec = None
        if obj is not None:
            try:
                spec = parse.service(obj, self.config.default_scheduler)
            except parse.Invalid as exc:
                self._warn(ops, warning_id, "invalid-service", "Service", key, f"Service {key} skipped: {exc}")
                obj = None
            else:
                self._clear(ops, warning_id)
        else:
            self._clear(ops, warning_id)
        scheduler_warning = f"Service/{key}/scheduler"
        if spec is not None and spec.scheduler_problem:
            self._warn(ops, scheduler_warning, "invalid-scheduler", "Service", key, spec.scheduler_problem)
        else:
            self._clear(ops, scheduler_warning)
        self._legacy(ops, "Service", key, spec.legacy if spec is not None else ())
        self._skipped(ops, key, spec.skipped if spec is not None else ())
        self._stale_status(ops, key, spec.stale_ingress if spec is not None else ())
        if spec is None:
            self.services.pop(key, None)
        else:
            self.services[key] = spec
        self._replan(key, ops)

    def _on_slice(self, key: str, obj: dict[str, Any] | None, ops: list[PlanOp]) -> None:
        warning_id = f"EndpointSlice/{key}"
        before = self.slices.pop(key, None)
        if before is not None:
            self.slices_by_service[before.service_key].discard(key)
        spec = None
        if obj is not None:
            try:
                spec = parse.endpoint_slice(obj)
            except parse.Invalid as exc:
                self._warn(ops, warning_id, "invalid-endpointslice", "EndpointSlice", key,
                           f"EndpointSlice {key} skipped: {exc}")
            else:
                if spec is not None and spec.problems:
                    self._warn(ops, warning_id, "invalid-endpointslice", "EndpointSlice", key,
                               f"EndpointSlice {key}: skipped endpoints: " + "; ".join(spec.problems))
                else:
                    self._clear(ops, warning_id)
        else:
            self._clear(ops, warning_id)
        self._legacy(ops, "EndpointSlice", key, spec.legacy if spec is not None else ())
        if spec is not None:
            self.slices[key] = spec
            self.slices_by_service[spec.service_key].add(key)
        affected = {s.service_key for s in (before, spec) if s is not None}
        for service_key in sorted(affected):
            self._replan(service_key, ops)

    def _on_node(self, name: str, obj: dict[str, Any] | None, ops: list[PlanOp]) -> None:
        warning_id = f"Node/{name}"
        facts, legacy = None, ()
        if obj is not None:
            try:
                facts, problems, legacy = parse.node(obj)
            except parse.Invalid as exc:  # skipped like an invalid Service: as if absent, and said so
                self._warn(ops, warning_id, "invalid-node", "Node", name, f"Node {name} skipped: {exc}")
            else:
                if problems:
                    self._warn(ops, warning_id, "invalid-node", "Node", name,
                               f"Node {name}: skipped addresses: " + "; ".join(problems))
                else:
                    self._clear(ops, warning_id)
        else:
            self._clear(ops, warning_id)
        self._legacy(ops, "Node", name, legacy)
        current = self.nodes.get(name)
        if facts is None:
            if current is not None:
                del self.nodes[name]
                ops.append(RemoveNode(name))
        elif facts != current:
            self.nodes[name] = facts
            ops.append(SetNode(facts))
        before = set(current.addresses) if current else set()
        after = set(facts.addresses) if facts else set()
        if before != after:
            for ip in before - after:
                self.address_nodes[ip].discard(name)
                if not self.address_nodes[ip]:
                    del self.address_nodes[ip]
            for ip in after - before:
                self.address_nodes[ip].add(name)
            affected = set().union(*(self.external_services.get(ip, ()) for ip in before ^ after))
            for key in sorted(affected):
                self._check_node_addresses(key, ops)

    def _replan(self, key: str, ops: list[PlanOp]) -> None:
        spec = self.services.get(key)
        plan = None if spec is None else build_plan(spec, [self.slices[k] for k in sorted(self.slices_by_service[key])])
        current = self.plans.get(key)
        if plan is None:
            if current is not None:
                del self.plans[key]
                ops.append(RemoveService(key))
        elif plan != current:
            self.plans[key] = plan
            ops.append(SetService(plan))
        self._index_addresses(key, plan, ops)
        ports = tuple(p.node_port for p in plan.ports if p.node_port) if plan else ()
        if ports != self.node_ports.get(key, ()):
            if ports:
                self.node_ports[key] = ports
            else:
                self.node_ports.pop(key, None)
            self._check_node_ports(key, ops)

    # --- output -------------------------------------------------------------------------------

    def snapshot(self, plan_stream_seq: int = 0) -> PlanSnapshot:
        return PlanSnapshot(scope=SHARED_SCOPE, seq=self.seq, source_seq=self.source_seq,
                            plan_stream_seq=plan_stream_seq,
                            services=tuple(self.plans[k] for k in sorted(self.plans)),
                            nodes=tuple(self.nodes[k] for k in sorted(self.nodes)),
                            warnings=tuple(self.warnings[k] for k in sorted(self.warnings)))


def _rank(ep: Endpoint) -> tuple[bool, bool, bool, str, str, tuple[str, ...], tuple[str, ...]]:
    """Lower is better: of two copies of one address, the non-terminating one wins, then the ready one,
    then the serving one (kube-proxy's endpoint slice cache, kubernetes PR 135593); the rest only makes
    the choice independent of the order the copies are met in."""
    return (ep.terminating, not ep.ready, not ep.serving, ep.node, ep.zone, ep.hints, ep.node_hints)


def build_plan(spec: parse.ServiceSpec, slices: list[parse.SliceSpec]) -> ServicePlan:
    """A Service's plan: its ports with their endpoints, matched by port name and protocol over every
    slice (in slice-name order), each ip:port once. An address listed twice (in one slice or in two: a
    pod stuck terminating and its successor with the same IP) keeps its best copy by :func:`_rank`, so the
    order of slices and of endpoints never changes the result."""
    ports = []
    for sp in spec.ports:
        endpoints: dict[tuple[str, int], Endpoint] = {}
        for sl in slices:
            for slice_port in sl.ports:
                if slice_port.name != sp.name or slice_port.protocol != sp.protocol:
                    continue
                for ep in sl.endpoints:
                    key = (ep.ip, slice_port.port)
                    held = endpoints.get(key)
                    if held is None or _rank(ep) < _rank(held):
                        endpoints[key] = ep if ep.port == slice_port.port else _with_port(ep, slice_port.port)
        ports.append(PortPlan(name=sp.name, protocol=sp.protocol, port=sp.port, node_port=sp.node_port,
                              endpoints=tuple(endpoints[k] for k in sorted(endpoints))))
    return ServicePlan(key=spec.key, cluster_ips=spec.cluster_ips, external_ips=spec.external_ips,
                       load_balancer_ips=spec.load_balancer_ips,
                       load_balancer_source_ranges=spec.load_balancer_source_ranges, scheduler=spec.scheduler,
                       persistence_timeout=spec.persistence_timeout, external_policy_local=spec.external_policy_local,
                       internal_policy_local=spec.internal_policy_local, ports=tuple(ports),
                       health_check_node_port=spec.health_check_node_port)


def _with_port(ep: Endpoint, port: int) -> Endpoint:
    return msgspec.structs.replace(ep, port=port)


def correction(published: SharedPlan, planner: Planner) -> list[PlanOp]:
    """The operations that turn the published shared plan (snapshot + deltas, as read back from the plan
    stream) into the planner's state: set what differs, remove what the planner lacks; services, then nodes,
    then warnings, each in key order (deterministic, as every delta)."""
    return [*_changes(published.services, planner.plans, SetService, RemoveService),
            *_changes(published.nodes, planner.nodes, SetNode, RemoveNode),
            *_changes(published.warnings, planner.warnings, SetWarning, ClearWarning)]


def _changes(have: dict[str, Any], want: dict[str, Any], set_op: Callable[[Any], PlanOp],
             remove_op: Callable[[str], PlanOp]) -> list[PlanOp]:
    """Set what differs, remove what ``want`` lacks, in key order."""
    ops: list[PlanOp] = []
    for key in sorted(set(have) | set(want)):
        if key not in want:
            ops.append(remove_op(key))
        elif have.get(key) != want[key]:
            ops.append(set_op(want[key]))
    return ops
