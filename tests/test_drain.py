"""Bounded graceful termination of removed TCP real servers (pure)."""

from __future__ import annotations

from services.applier.drain import Drainer
from services.applier.ops import AddReal, DelReal, DelService, EditReal

TCP = ("TCP", "10.96.0.10", 80)
UDP = ("UDP", "10.96.0.53", 53)
A, B = ("10.244.1.5", 8080), ("10.244.1.6", 8080)


def test_tcp_removal_drains_udp_goes_at_once() -> None:
    d = Drainer(timeout=30)
    assert d.rewrite([DelReal(TCP, A), DelReal(UDP, B)], now=0) == [EditReal(TCP, A, 0), DelReal(UDP, B)]
    assert d.services() == {TCP}


def test_deleted_when_connections_reach_zero_or_the_deadline_passes() -> None:
    d = Drainer(timeout=30)
    d.rewrite([DelReal(TCP, A), DelReal(TCP, B)], now=0)
    assert d.due({(TCP, A): 3, (TCP, B): 1}, now=10) == []
    assert d.due({(TCP, A): 0, (TCP, B): 1}, now=11) == [DelReal(TCP, A)]
    assert d.due({(TCP, B): 1}, now=29.9) == []
    assert d.due({(TCP, B): 1}, now=30) == [DelReal(TCP, B)], "bounded: kube-proxy would wait forever"
    assert d.services() == set()


def test_back_in_the_plan_while_draining_is_a_weight_change() -> None:
    d = Drainer(timeout=30)
    d.rewrite([DelReal(TCP, A)], now=0)
    assert d.rewrite([AddReal(TCP, A, 1)], now=5) == [EditReal(TCP, A, 1)]
    assert d.due({}, now=100) == []


def test_drift_repair_leaves_draining_servers_alone_and_service_deletion_ends_the_drain() -> None:
    d = Drainer(timeout=30)
    d.rewrite([DelReal(TCP, A)], now=0)
    assert d.keep_draining([DelReal(TCP, A), EditReal(TCP, A, 1), DelReal(TCP, B)]) == [DelReal(TCP, B)]
    assert d.rewrite([DelService(TCP)], now=1) == [DelService(TCP)]
    assert d.services() == set()


def test_zero_timeout_removes_at_once() -> None:
    assert Drainer(timeout=0).rewrite([DelReal(TCP, A)], now=0) == [DelReal(TCP, A)]


def test_a_restarted_applier_resumes_drains_it_finds_at_weight_zero() -> None:
    from services.applier.ops import DelReal
    from shared.plan.node_state import NodeState, VirtualService

    tcp, udp = ("TCP", "10.96.0.10", 80), ("UDP", "10.96.0.53", 53)
    observed = NodeState()
    observed.ipvs = {tcp: VirtualService("TCP", "10.96.0.10", 80, "rr", reals={("10.244.1.5", 8080): 0,
                                                                               ("10.244.1.6", 8080): 1}),
                     udp: VirtualService("UDP", "10.96.0.53", 53, "rr", reals={("10.244.1.7", 53): 0})}
    drainer = Drainer(timeout=30)
    ops = [DelReal(tcp, ("10.244.1.5", 8080)), DelReal(tcp, ("10.244.1.6", 8080)), DelReal(udp, ("10.244.1.7", 53))]
    left = drainer.resume(ops, observed, now=100.0)
    assert left == ops[1:], "only the TCP server already at weight 0 was draining: it drains again"
    assert drainer.deadlines == {(tcp, ("10.244.1.5", 8080)): 130.0}
    assert drainer.due({(tcp, ("10.244.1.5", 8080)): 2}, now=129.0) == []
    assert drainer.due({(tcp, ("10.244.1.5", 8080)): 2}, now=130.0) == [DelReal(tcp, ("10.244.1.5", 8080))]
    assert Drainer(timeout=0).resume(ops, observed, now=0.0) == ops, "--drain-timeout 0: removed at once"
