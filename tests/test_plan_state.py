"""The consumer side of the plan: deltas in order, redeliveries skipped, gaps detected, snapshots."""

from __future__ import annotations

import pytest

from shared.contract.events import NodeFacts, PlanDelta, PlanSnapshot, RemoveNode, SetNode
from shared.plan.plan_state import SequenceGap, SharedPlan


def delta(seq: int, *ops) -> PlanDelta:
    return PlanDelta(scope="all", seq=seq, source_seq=seq, ops=tuple(ops))


def test_in_order_redelivery_and_gap() -> None:
    plan = SharedPlan()
    assert plan.apply(delta(1, SetNode(NodeFacts(name="a"))))
    assert not plan.apply(delta(1, RemoveNode("a"))), "a redelivered delta must not apply twice"
    assert plan.nodes == {"a": NodeFacts(name="a")}
    with pytest.raises(SequenceGap, match="have delta 1, got 3"):
        plan.apply(delta(3, RemoveNode("a")))
    assert plan.seq == 1


def test_snapshot_then_deltas_after_it() -> None:
    snap = PlanSnapshot(scope="all", seq=5, source_seq=9, plan_stream_seq=5, services=(),
                        nodes=(NodeFacts(name="a"),), warnings=())
    plan = SharedPlan.from_snapshot(snap)
    assert not plan.apply(delta(4, RemoveNode("a"))), "deltas the snapshot already holds are skipped"
    assert plan.apply(delta(6, RemoveNode("a")))
    assert plan.nodes == {} and plan.seq == 6
