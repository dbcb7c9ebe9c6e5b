"""The shared plan as a consumer holds it: a snapshot plus deltas applied in order. Pure.

Rules of this room: deltas apply strictly in sequence (a gap is :class:`SequenceGap`: the consumer
re-bootstraps from a snapshot, it never skips) and an old one is a no-op (a redelivery).

The applier keeps one of these (and resolves its node from it); tests use it to check that the deltas
the planner emits rebuild exactly the planner's own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.contract.events import (
    ClearWarning,
    NodeFacts,
    PlanDelta,
    PlanSnapshot,
    PlanWarning,
    RemoveNode,
    RemoveService,
    ServicePlan,
    SetNode,
    SetService,
    SetWarning,
)


class SequenceGap(Exception):
    """A delta is missing: re-bootstrap from a snapshot."""


@dataclass
class SharedPlan:
    services: dict[str, ServicePlan] = field(default_factory=dict)
    nodes: dict[str, NodeFacts] = field(default_factory=dict)
    warnings: dict[str, PlanWarning] = field(default_factory=dict)
    seq: int = 0

    @classmethod
    def from_snapshot(cls, snap: PlanSnapshot) -> SharedPlan:
        return cls(services={s.key: s for s in snap.services}, nodes={n.name: n for n in snap.nodes},
                   warnings={w.id: w for w in snap.warnings}, seq=snap.seq)

    def apply(self, delta: PlanDelta) -> bool:
        """Apply the next delta. False if it is one we already have (a redelivery); SequenceGap if one
        is missing."""
        if delta.seq <= self.seq:
            return False
        if delta.seq != self.seq + 1:
            raise SequenceGap(f"plan {delta.scope}: have delta {self.seq}, got {delta.seq}")
        for op in delta.ops:
            if isinstance(op, SetService):
                self.services[op.service.key] = op.service
            elif isinstance(op, RemoveService):
                self.services.pop(op.key, None)
            elif isinstance(op, SetNode):
                self.nodes[op.node.name] = op.node
            elif isinstance(op, RemoveNode):
                self.nodes.pop(op.name, None)
            elif isinstance(op, SetWarning):
                self.warnings[op.warning.id] = op.warning
            elif isinstance(op, ClearWarning):
                self.warnings.pop(op.id, None)
        self.seq = delta.seq
        return True
