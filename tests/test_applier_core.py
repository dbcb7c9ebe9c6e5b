"""The applier's pure core (services/applier/core.py) and the pure part of its conntrack manager: fast unit
tests, no bus, no kernel (the services around them are tested in test_applier_*.py and the guest)."""

from __future__ import annotations

import gc
import weakref

import msgspec
import pytest

from services.applier import heap
from services.applier.conntrack import stale_flows
from services.applier.core import ApplierCore
from services.applier.ops import AddReal, AddService, DelReal, DelService, EditReal
from shared.contract import events
from shared.plan.plan_state import SequenceGap

NODE = "node-a"
VIP = ("TCP", "10.96.0.10", 80)


def _web(*ips: str, protocol: str = "TCP") -> events.ServicePlan:
    endpoints = tuple(events.Endpoint(ip=ip, port=8080, node=NODE) for ip in ips)
    return events.ServicePlan(key="default/web", cluster_ips=("10.96.0.10",),
                              ports=(events.PortPlan(protocol=protocol, port=80, endpoints=endpoints),))


def _delta(seq: int, *ops: object, scope: str = "all") -> events.PlanDelta:
    return events.PlanDelta(scope=scope, seq=seq, source_seq=seq, ops=tuple(ops))  # type: ignore[arg-type]


def _calico(node: str = NODE) -> events.SetNodeCalico:
    layout = events.MarkLayoutRecord(accept=1, pass_=2, drop=4, scratch0=8, scratch1=16, wireguard=0,
                                     endpoint_mask=0xff00, non_calico=32)
    return events.SetNodeCalico(node=node, layout=layout, nodeport_ranges=((30000, 32767),), endpoint_marks={})


def test_a_delta_is_taken_once_and_in_sequence() -> None:
    core = ApplierCore(NODE)
    assert core.take(_delta(1, events.SetNode(events.NodeFacts(name=NODE)))) == set()
    assert core.take(_delta(2, events.SetService(_web("10.244.0.5")))) == {"default/web"}
    assert core.take(_delta(2, events.SetService(_web("10.244.0.6")))) is None, "a redelivery changes nothing"
    with pytest.raises(SequenceGap):
        core.take(_delta(9))
    assert core.jumps(_delta(9)) and not core.jumps(_delta(3))


def test_a_batch_resolves_only_what_it_touched_and_drains_tcp() -> None:
    core = ApplierCore(NODE, drain_timeout=300.0)
    core.take(_delta(1, events.SetNode(events.NodeFacts(name=NODE))))
    touched = core.take(_delta(2, events.SetService(_web("10.244.0.5", "10.244.0.6"))))
    ops, touched = core.resolve(touched or set(), core.facts(), now=0.0)
    assert AddService(VIP, "rr", 0) in ops and AddReal(VIP, ("10.244.0.5", 8080), 1) in ops
    ops, _ = core.resolve(core.take(_delta(3, events.SetService(_web("10.244.0.5")))) or set(), core.facts(), 1.0)
    reals = [op for op in ops if isinstance(op, AddReal | EditReal | DelReal)]
    assert reals == [EditReal(VIP, ("10.244.0.6", 8080), 0)], "a removed TCP real server drains at weight 0"
    assert core.drainer.deadlines == {(VIP, ("10.244.0.6", 8080)): 301.0}
    assert core.resolve(set(), core.facts(), 2.0)[0] == [], "nothing touched: nothing to do"


def test_new_node_facts_re_resolve_every_service() -> None:
    core = ApplierCore(NODE, interface_addresses=True)
    core.take(_delta(1, events.SetService(_web("10.244.0.5"))))
    before = core.facts()
    assert core.readdress(("192.0.2.10",), 0.0) is not None
    assert core.readdress(("192.0.2.10",), 1.0) is None, "the same addresses: nothing to move"
    _, touched = core.resolve(set(), before, 2.0)
    assert touched == {"default/web"}


def test_the_newest_node_delta_wins() -> None:
    core = ApplierCore(NODE)
    newer, older = _calico(), msgspec.structs.replace(_calico(), nodeport_ranges=((1, 2),))
    assert core.take(_delta(5, newer, scope=NODE)) is None
    core.take(_delta(4, older, scope=NODE))
    assert (core.calico_seq, core.calico) == (5, newer)
    core.take(_delta(6, _calico(), scope="node-b"))
    assert core.calico_seq == 5, "another node's state is not this node's"


def test_stale_flows_are_those_of_datagram_real_servers_that_left_or_came_first() -> None:
    udp = ("UDP", "10.96.0.53", 80)
    core = ApplierCore(NODE)
    core.take(_delta(1, events.SetNode(events.NodeFacts(name=NODE))))
    ops, _ = core.resolve(core.take(_delta(2, events.SetService(
        msgspec.structs.replace(_web("10.244.0.5", protocol="UDP"), cluster_ips=("10.96.0.53",))))) or set(),
        core.facts(), 0.0)
    ops = [op for op in ops if isinstance(op, AddReal)]
    assert stale_flows(ops, {udp: core.desired.services[udp]}) == [(udp, None)], "0 -> N: the node's own flows"
    gone = [DelReal(udp, ("10.244.0.5", 8080)), DelService(("SCTP", "10.96.0.9", 9)), DelReal(VIP, ("1.2.3.4", 1))]
    assert stale_flows(gone, {}) == [(udp, ("10.244.0.5", 8080)), (("SCTP", "10.96.0.9", 9), None)]


def test_a_bootstraps_state_is_frozen_out_of_full_collections_and_older_cycles_still_go() -> None:
    """heap.settle (called at the end of every bootstrap): what is alive is frozen (CPython's full
    collections no longer walk the plan), and a reference cycle frozen by an earlier settle is collected
    by the next one rather than kept for ever."""
    class Node:
        other: object = None

    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        held = {"plan": [Node() for _ in range(1000)]}
        frozen = heap.settle()
        assert frozen >= 1000 and gc.get_freeze_count() == frozen
        assert not any(x is held for x in gc.get_objects())  # the frozen are in no generation
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: a collection does not look at it
        heap.settle()
        assert gone() is None
    finally:
        gc.unfreeze()
