"""Graceful termination of removed real servers. Pure.

A TCP real server that leaves the plan is not deleted at once: it is set to weight 0 (no new connections)
and deleted when its connections (active + inactive) reach zero, or when ``timeout`` seconds have passed.
kube-proxy waits without bound (a long-standing complaint); kipvs bounds the wait (``--drain-timeout``,
0 removes at once). UDP and SCTP real servers are removed at once, as kube-proxy does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.plan.node_state import NodeState, RealKey, VSKey

from .ops import AddReal, DelReal, DelService, EditReal, Op

Draining = tuple[VSKey, RealKey]


@dataclass
class Drainer:
    timeout: float
    deadlines: dict[Draining, float] = field(default_factory=dict)

    def rewrite(self, ops: list[Op], now: float) -> list[Op]:
        """Turn removals of TCP real servers into weight 0 + tracking; undo a drain the plan takes back."""
        out: list[Op] = []
        for op in ops:
            if isinstance(op, DelReal) and op.service[0] == "TCP" and self.timeout > 0:
                self.deadlines[(op.service, op.real)] = now + self.timeout
                out.append(EditReal(op.service, op.real, 0))
            elif isinstance(op, AddReal) and (op.service, op.real) in self.deadlines:
                del self.deadlines[(op.service, op.real)]  # back in the plan while draining: it still exists
                out.append(EditReal(op.service, op.real, op.weight))
            elif isinstance(op, DelReal) and (op.service, op.real) in self.deadlines:
                continue
            else:
                if isinstance(op, DelService):
                    for key in [k for k in self.deadlines if k[0] == op.key]:
                        del self.deadlines[key]
                out.append(op)
        return out

    def resume(self, ops: list[Op], observed: NodeState, now: float) -> list[Op]:
        """After a restart: a TCP real server found at weight 0 that the plan no longer has was draining when
        the applier stopped (drains are not persisted). It drains again, with a fresh timeout, rather than
        being cut at once."""
        out: list[Op] = []
        for op in ops:
            vs = observed.ipvs.get(op.service) if isinstance(op, DelReal) else None
            if (isinstance(op, DelReal) and op.service[0] == "TCP" and self.timeout > 0 and vs is not None
                    and vs.reals.get(op.real) == 0):
                self.deadlines[(op.service, op.real)] = now + self.timeout
            else:
                out.append(op)
        return out

    def keep_draining(self, ops: list[Op]) -> list[Op]:
        """A drift repair must not delete or re-weight a server that is draining."""
        if not self.deadlines:
            return ops  # nothing drains (a cold start's tens of thousands of additions: no walk)
        return [op for op in ops
                if not (isinstance(op, DelReal | EditReal) and (op.service, op.real) in self.deadlines)]

    def services(self) -> set[VSKey]:
        return {service for service, _ in self.deadlines}

    def due(self, connections: dict[Draining, int], now: float) -> list[Op]:
        """Deletions for drained servers: no connections left, or past the deadline."""
        done = [key for key, deadline in self.deadlines.items()
                if connections.get(key, 0) == 0 or now >= deadline]
        for key in done:
            del self.deadlines[key]
        return [DelReal(service, real) for service, real in sorted(done)]
