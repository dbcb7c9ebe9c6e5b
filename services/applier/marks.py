"""Calico endpoint marks: the manager that follows this node's Calico state (``on_calico_changed``).

The node subject ``kipvs.plan.node.<node>`` carries the node's whole Calico state in each delta
(``SetNodeCalico``). ``--endpoint-marks`` decides who writes the marking rules (``kernel/
endpoint_mark_rules.resolve_mode``): kipvs (enforce, in the nftables table), Felix (observe), or auto. A
change of mode is published with the node's facts; in enforce mode a change of state rewrites the marks
(only the marks when the frame is the same, else the whole table with its set members).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus, plan_log

from .kernel.endpoint_mark_rules import EndpointMarks, Mode, resolve_mode
from .kernel.rules import NftRules
from .ops import DesiredState

log = logging.getLogger("kipvs.applier")

Flag = Literal["auto", "observe", "enforce"]


class EndpointMarkRules:
    """Who writes the marks (``mode``: (mode, reason)) and, in enforce mode, the marks the rules hold."""

    def __init__(self, flag: Flag, rules: NftRules | None, mode_changed: Callable[[], Awaitable[None]]) -> None:
        self.flag = flag
        self.rules = rules
        self.mode_changed = mode_changed  # publishes the node's facts, which carry the mode
        self.mode: tuple[Mode, str] = resolve_mode(flag, None, rules is not None)

    def bootstrap(self, calico: events.SetNodeCalico | None) -> None:
        self.mode = resolve_mode(self.flag, calico, self.rules is not None)

    def marks(self, calico: events.SetNodeCalico | None) -> EndpointMarks | None:
        """The marks the rules must hold: the node's, in enforce mode; else none."""
        if self.mode[0] != "enforce" or calico is None:
            return None
        return EndpointMarks.from_plan(calico)

    async def on_calico_changed(self, calico: events.SetNodeCalico | None, desired: DesiredState) -> None:
        mode = resolve_mode(self.flag, calico, self.rules is not None)
        if mode != self.mode:
            log.info("endpoint marks: %s (%s)", *mode)
            self.mode = mode
            await self.mode_changed()
        if self.rules is not None:
            marks = self.marks(calico)
            members = None if marks is not None and marks.same_frame(self.rules.marks) else desired.state().ipsets
            await self.rules.set_endpoint_marks(marks, members)


async def last_node_state(js: JetStreamContext, reader: bus.LogReader,
                          node: str) -> tuple[int, events.SetNodeCalico] | None:
    """(delta seq, Calico state) from the node subject's last message, which is the node's whole state. If
    that message is unusable (it was parked when consumed), the subject is read back to the last usable one:
    never a crash loop. None: the node has no Calico state yet. ``reader``: the node's plan reader (its
    permissions allow no other name)."""
    subject = topology.plan_node_subject(node)
    try:
        msg = await js.get_last_msg(topology.PLAN_STREAM, subject)
        found = _node_state(msg.data or b"")
        if found is None:
            # unusable, or a part of a chunked delta: read back whole deltas, chunked ones put together
            log.warning("the last message on %s is not a whole delta; reading the subject back", subject)
            async for _, delta in plan_log.complete_deltas(bus.read_stream(js, reader, subject)):
                found = _calico_of(delta) or found
    except NotFoundError:
        return None
    return found


def _node_state(data: bytes) -> tuple[int, events.SetNodeCalico] | None:
    """(delta seq, Calico state) of a node-subject message; None when it is not a usable one."""
    try:
        record = events.decode(data).record
    except events.ContractError:
        return None
    return _calico_of(record) if isinstance(record, events.PlanDelta) else None


def _calico_of(record: events.PlanDelta) -> tuple[int, events.SetNodeCalico] | None:
    if record.ops and isinstance(record.ops[-1], events.SetNodeCalico):
        return record.seq, record.ops[-1]
    return None
