"""The applier's core: plan deltas and this node's state in, kernel operations out. Pure: no I/O, no clock.

Rules (what the shell, ``shell.py``, may rely on; the kernel and the bus are the shell's):

- State: the shared plan (every Service and Node, at delta ``plan.seq``), this node's Calico state (the
  newest node delta's ``SetNodeCalico``, at ``calico_seq``), the desired kernel state (``ops.DesiredState``,
  kept per Service) and the real servers draining (``drain.Drainer``). Nothing else.
- A shared delta is applied once and in sequence: one the plan already has is skipped; one past the next
  raises ``SequenceGap`` (the shell re-bootstraps from the snapshot; if the jump stays, :meth:`jumps` says
  so and the shell parks the delta).
- A node delta holds the node's whole Calico state: the newest wins, an older one changes nothing.
- A chunked delta is taken whole or not at all (``delta_chunks``); a broken one raises ``ChunkGap``.
- A batch re-resolves only the Services its deltas touched; every Service when this node's facts changed
  (its addresses: NodePorts and local endpoints follow them).
- Every operation list leaving here went through the drainer: a removed TCP real server drains (weight 0)
  before it is deleted.
- Times are passed in (``now``: monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from shared.contract import delta_chunks, events
from shared.plan.node_state import NodeState, VSKey
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_service

from . import nodeport_addresses
from .drain import Drainer
from .exclude import ExcludeCIDRs
from .kernel.backend import Observed
from .ops import DesiredState, Op, diff


class ApplierCore:
    """One node's plan and desired kernel state; :meth:`take` a delta, :meth:`resolve` the batch's ops."""

    def __init__(self, node: str, drain_timeout: float = 300.0, interface_addresses: bool = False,
                 nodeport_cidrs: tuple[str, ...] = (), exclude: ExcludeCIDRs | None = None) -> None:
        self.node = node
        self.nodeport_cidrs = nodeport_cidrs  # --nodeport-cidrs: only the addresses inside serve NodePorts
        self.exclude = exclude or ExcludeCIDRs()  # --ipvs-exclude-cidrs: never programmed, read back as absent
        self.use_interfaces = interface_addresses  # --node-addresses interfaces: NodePorts on this host's own
        self.local_addresses: tuple[str, ...] = ()
        self.plan = SharedPlan()
        self.calico: events.SetNodeCalico | None = None  # this node's Calico state, as planned
        self.calico_seq = 0
        self.desired = DesiredState(only=self.exclude.contribution)
        self.drainer = Drainer(drain_timeout)
        self.chunks = delta_chunks.Assembler()  # chunked deltas in progress, kept across re-bootstraps

    def facts(self) -> events.NodeFacts | None:
        """This node's facts from the plan; with --node-addresses interfaces, its addresses are its own;
        with --nodeport-cidrs, only those inside them."""
        facts = self.plan.nodes.get(self.node)
        if self.use_interfaces:
            facts = msgspec.structs.replace(facts or events.NodeFacts(name=self.node), addresses=self.local_addresses)
        return nodeport_addresses.filtered(facts, self.nodeport_cidrs)

    def programmed_counts(self) -> tuple[int, int]:
        """(virtual services, real servers) the node's kernel is meant to hold now."""
        services = self.desired.services
        return len(services), sum(len(vs.reals) for vs in services.values())

    def reset(self, plan: SharedPlan) -> None:
        """A bootstrap's plan (snapshot + catch-up): the desired state is computed again from all of it."""
        self.plan = plan
        self.desired = DesiredState.of(plan.services, self.facts(), self.exclude.contribution)

    def converge(self, observed: Observed, now: float) -> list[Op]:
        """What makes a read-back kernel the desired state at bootstrap: drains found in the kernel (weight 0)
        resume, with their deadline counted from ``now``."""
        observed = self.exclude.hide(observed)
        ops = diff(self.desired.state(), observed.state, observed.owned)
        return self.drainer.keep_draining(self.drainer.resume(ops, observed.state, now))

    def repair(self, want: NodeState, observed: Observed,
               reals_read: Callable[[VSKey], bool] | None = None) -> list[Op]:
        """What makes a read-back kernel ``want`` (``desired.state()``) again (drift); a drain in progress is
        left alone. ``reals_read``: whose real servers were read (``ops.diff``; default every service's)."""
        observed = self.exclude.hide(observed)
        return self.drainer.keep_draining(diff(want, observed.state, observed.owned, reals_read))

    def whole(self, envelope: events.Envelope) -> events.Envelope | None:
        """The delta a message completes: itself, or the chunked delta whose last part it is; None for a part
        that completes nothing or one the plan already has. Raises ``delta_chunks.ChunkGap``."""
        chunk = envelope.record
        if not isinstance(chunk, events.PlanDeltaChunk):
            if isinstance(chunk, events.PlanDelta):
                self.chunks.settled(chunk.scope, chunk.seq)
            return envelope
        have = self.plan.seq if chunk.scope == "all" else self.calico_seq if chunk.scope == self.node else 0
        return self.chunks.feed(envelope, have)

    def take(self, record: events.PlanDelta) -> set[str] | None:
        """Apply one whole delta: the keys of the Services a shared delta touched, or None when nothing of the
        shared plan changed (a node delta, or a shared one already applied). Raises ``SequenceGap``."""
        if record.scope != "all":
            if record.scope == self.node and record.seq > self.calico_seq:
                for op in record.ops:  # each node delta holds the node's whole state: the last one wins
                    if isinstance(op, events.SetNodeCalico):
                        self.calico, self.calico_seq = op, record.seq
            return None
        if not self.plan.apply(record):
            return None
        return {op.service.key if isinstance(op, events.SetService) else op.key
                for op in record.ops if isinstance(op, events.SetService | events.RemoveService)}

    def jumps(self, record: events.PlanDelta) -> bool:
        """Whether a shared delta still lies past the next one (after a re-bootstrap: nothing explains it)."""
        return record.seq > self.plan.seq + 1

    def resolve(self, touched: set[str], facts_before: events.NodeFacts | None,
                now: float) -> tuple[list[Op], set[str]]:
        """(operations, Services touched) for a batch: ``touched`` re-resolved for this node, or every Service
        when the node's facts differ from ``facts_before``."""
        if self.facts() != facts_before:
            touched = set(self.desired.contributions) | set(self.plan.services)
        return self._resolved(sorted(touched), now), touched

    def readdress(self, addresses: tuple[str, ...], now: float) -> list[Op] | None:
        """This host's addresses read again (--node-addresses interfaces): the operations that move the
        NodePorts, or None when they are the same."""
        if addresses == self.local_addresses:
            return None
        self.local_addresses = addresses
        return self._resolved(sorted(self.plan.services), now)

    def _resolved(self, keys: list[str], now: float) -> list[Op]:
        facts = self.facts()
        ops: list[Op] = []
        for key in keys:
            plan = self.plan.services.get(key)
            ops += self.desired.update(key, resolve_service(plan, facts) if plan else None)
        return self.drainer.rewrite(ops, now)
