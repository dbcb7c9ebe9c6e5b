"""Apply and drift reports: the manager that tells the bus what the kernel holds (``report``).

Each report goes to ``kipvs.status.<node>.applied`` or ``.drift``. It is published off the consume loop,
so the next delta is not held up by the STATUS stream, which takes one report per node per batch: with a
thousand nodes that fan-in, not the apply, sets the pace (issue 17, docs/architecture.md "Scale"). Reports
queued while one is being published are coalesced: the newest of each kind goes next. The kernel is
already written: a report the bus refuses (a full store, a timeout) is logged and the newest of its kind
goes out with the next report or drift check, never a reason to redo or park the delta it describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext

from kipvs.shared import bus, events, topology

log = logging.getLogger("kipvs.applier")


class Reports:
    """The newest unsent report of each kind, and the task publishing them."""

    def __init__(self, js: JetStreamContext, node: str) -> None:
        self.js = js
        self.node = node
        self.unsent: dict[str, events.Envelope] = {}  # the newest report of each kind not yet on the bus
        self.sender: asyncio.Task | None = None

    def report(self, record: events.ApplyReport | events.DriftReport) -> None:
        """Queue a report; it is published in the background (:meth:`send`)."""
        what = "applied" if isinstance(record, events.ApplyReport) else "drift"
        self.unsent[what] = events.Envelope(id=f"{what}/{self.node}/{record.plan_seq}/{time.time_ns()}",
                                            time_ns=time.time_ns(), producer=f"applier/{self.node}", record=record)
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self.send())

    async def send(self) -> None:
        """Publish the newest report of each kind until none is left, or until the bus refuses one."""
        while self.unsent:
            kind = min(self.unsent)
            pending = self.unsent[kind]
            try:
                await bus.publish(self.js, topology.status_subject(self.node, kind), pending)
            except bus.INFRASTRUCTURE_ERRORS as exc:
                log.warning("status report %s not published (%s: %s); it goes out with the next one",
                            pending.id, type(exc).__name__, exc or "")
                return
            if self.unsent.get(kind) is pending:  # else a newer one came meanwhile: it goes next
                del self.unsent[kind]

    async def flush(self, within: float = 10.0) -> None:
        """Wait (bounded, seconds) for the queued reports: at stop, the last one says what the kernel holds."""
        if self.sender is not None and not self.sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.sender), within)
