"""Properties of the planner core over random event sequences (hypothesis).

- The state reached incrementally equals the state computed from scratch from the final objects.
- Applying the emitted deltas to an empty shared plan gives the planner's own state, and so the same
  per-node resolution.
- Deletes the planner never saw (a watch outage) are repaired by the resync records.
- Determinism: the same sequence gives the same delta bytes.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.planner.core import Planner
from shared.contract import events
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_node
from tests import kube

NODE_NAMES = ("node-a", "node-b")
IPS = [f"10.244.0.{i}" for i in range(1, 7)]

def _node(name: str, zone: str | None, ip: str, malformed: bool) -> dict[str, Any]:
    obj = kube.node(name, ip, zone=zone)
    if malformed:
        obj["status"] = "Ready"  # an invalid-node warning, and planned as absent
    return obj


node_obj = st.builds(_node, st.sampled_from(NODE_NAMES), st.sampled_from(["z1", "z2", None]),
                     st.sampled_from(["192.0.2.1", "192.0.2.2", "bad-ip"]), st.booleans())


@st.composite
def service_obj(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(["s0", "s1", "s2"]))
    ip = draw(st.sampled_from(["10.96.0.1", "10.96.0.2", "10.96.0.300"]))  # one invalid
    port = draw(st.sampled_from([80, 443, 0]))  # 0 is invalid
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    ports = [{"name": "http", "port": port, "protocol": draw(st.sampled_from(["TCP", "UDP"]))}]
    if kind != "ClusterIP":
        ports[0]["nodePort"] = 30000 + port
    svc = kube.service(name, cluster_ip=ip, ports=ports, type=kind,
                       externalTrafficPolicy=draw(st.sampled_from(["Cluster", "Local"])),
                       internalTrafficPolicy=draw(st.sampled_from(["Cluster", "Local"])))
    if kind == "LoadBalancer":
        # sometimes a node's own address (k3s's service load balancer), sometimes shared by two Services
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": draw(st.sampled_from(["203.0.113.1", "192.0.2.1"]))}]}}
        health_check = draw(st.sampled_from([None, 32210, 70000]))  # 70000: invalid
        if health_check is not None:
            svc["spec"]["healthCheckNodePort"] = health_check
    if draw(st.booleans()):
        svc["metadata"]["annotations"] = {"kipvs.io/scheduler": draw(st.sampled_from(["sh", "nope"]))}
    return svc


@st.composite
def slice_obj(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(["e0", "e1", "e2"]))
    endpoints = [kube.endpoint(draw(st.sampled_from([*IPS, "bogus"])), draw(st.sampled_from(NODE_NAMES)),
                               ready=draw(st.booleans()), terminating=draw(st.booleans()),
                               hints=draw(st.sampled_from([None, ["z1"], ["z2"]])),
                               node_hints=draw(st.sampled_from([None, ["node-a"], ["node-b"]])))
                 for _ in range(draw(st.integers(0, 3)))]
    return kube.endpoint_slice(name, draw(st.sampled_from(["s0", "s1", "s2"])), endpoints,
                               ports=[{"name": "http", "port": draw(st.sampled_from([8080, 9090])),
                                       "protocol": draw(st.sampled_from(["TCP", "UDP"]))}])


# A step: ("put", obj) | ("delete", kind, key, delivered: bool) | ("resync", kind)
step = st.one_of(
    st.tuples(st.just("put"), st.one_of(node_obj, service_obj(), slice_obj())),
    st.tuples(st.just("delete"), st.sampled_from(["Service", "EndpointSlice", "Node"]), st.integers(0, 2),
              st.booleans()),
    st.tuples(st.just("resync"), st.sampled_from(["Service", "EndpointSlice", "Node"])),
)


def _key(kind: str, obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (kind, meta.get("namespace", "") if kind != "Node" else "", meta["name"])


class Driver:
    """Plays steps against a model cluster and a planner; collects the planner's delta envelopes."""

    def __init__(self) -> None:
        self.cluster: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rv = 100
        self.planner = Planner()
        self.deltas: list[events.Envelope] = []
        self.seq = 0

    def feed(self, record: events.AnyRecord) -> None:
        self.seq += 1
        env = events.Envelope(id=f"e{self.seq}", time_ns=self.seq, producer="test", record=record)
        self.deltas.extend(self.planner.handle(env, self.seq))

    def put(self, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        kind = obj["kind"]
        key = _key(kind, obj)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        action = "MODIFIED" if key in self.cluster else "ADDED"
        self.cluster[key] = obj
        self.feed(events.KubeEvent(kind=kind, action=action, namespace=key[1], name=key[2],
                                   resource_version=str(self.rv), object=obj))

    def delete(self, kind: str, index: int, delivered: bool) -> None:
        keys = sorted(k for k in self.cluster if k[0] == kind)
        if not keys:
            return
        key = keys[index % len(keys)]
        obj = self.cluster.pop(key)
        self.rv += 1
        if delivered:
            self.feed(events.KubeEvent(kind=kind, action="DELETED", namespace=key[1], name=key[2],
                                       resource_version=str(self.rv), object=obj))

    def resync(self, kind: str) -> None:
        live = {f"{k[1]}/{k[2]}" if k[1] else k[2]: o["metadata"]["resourceVersion"]
                for k, o in self.cluster.items() if k[0] == kind}
        self.feed(events.KubeResync(kind=kind, resource_version=str(self.rv), live=live))

    def play(self, steps: list[tuple]) -> None:
        for s in steps:
            if s[0] == "put":
                self.put(s[1])
            elif s[0] == "delete":
                self.delete(s[1], s[2], s[3])
            else:
                self.resync(s[1])
        for kind in ("Service", "EndpointSlice", "Node"):  # a final relist of every kind
            self.resync(kind)


def _state(p: Planner | SharedPlan) -> tuple:
    plans = p.plans if isinstance(p, Planner) else p.services
    return (dict(sorted(plans.items())), dict(sorted(p.nodes.items())), dict(sorted(p.warnings.items())))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_incremental_equals_from_scratch_and_deltas_rebuild_it(steps: list[tuple]) -> None:
    d = Driver()
    d.play(steps)

    scratch = Driver()
    for key in sorted(d.cluster):
        obj = d.cluster[key]
        scratch.feed(events.KubeEvent(kind=key[0], action="ADDED", namespace=key[1], name=key[2],
                                      resource_version=obj["metadata"]["resourceVersion"], object=obj))
    assert _state(d.planner) == _state(scratch.planner)

    shared = SharedPlan()
    node_seqs: dict[str, list[int]] = {}
    last_node_state: dict[str, events.SetNodeCalico] = {}
    for env in d.deltas:
        assert isinstance(env.record, events.PlanDelta)
        if env.record.scope == "all":
            assert shared.apply(env.record)
        else:  # node-specific state: its own subject, its own sequence, replaced whole each time
            node_seqs.setdefault(env.record.scope, []).append(env.record.seq)
            (op,) = env.record.ops
            last_node_state[env.record.scope] = op
    assert _state(shared) == _state(d.planner)
    for node, seqs in node_seqs.items():
        assert seqs == list(range(1, len(seqs) + 1))
        assert last_node_state[node] == d.planner.node_calico(node)
    for name in NODE_NAMES:
        a = resolve_node(shared.services.values(), shared.nodes.get(name))
        b = resolve_node(d.planner.plans.values(), d.planner.nodes.get(name))
        assert (a.ipvs, a.addresses, a.ipsets) == (b.ipvs, b.addresses, b.ipsets)

    snap = SharedPlan.from_snapshot(d.planner.snapshot())
    assert _state(snap) == _state(d.planner)


@settings(max_examples=50, deadline=None)
@given(st.lists(step, max_size=30))
def test_same_log_same_delta_bytes(steps: list[tuple]) -> None:
    a, b = Driver(), Driver()
    a.play(steps)
    b.play(steps)
    assert [events.encode(e) for e in a.deltas] == [events.encode(e) for e in b.deltas]
    shared = [e.record.seq for e in a.deltas if e.record.scope == "all"]
    assert shared == list(range(1, len(shared) + 1))
