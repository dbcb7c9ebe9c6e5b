"""Apply and drift reports: the manager that tells the bus what the kernel holds (``report``).

Each report goes to ``kipvs.status.<node>.applied`` or ``.drift``, published off the consume loop and paced
(:mod:`.report_pacer`, issue 27): at most one per kind per ``--report-interval`` (1 s; under sustained churn
``--busy-report-interval``, 5 s), the newest, at once after a quiet interval, and none that says what the
last one said. One report per node per batch into the
R3 STATUS stream was half of what a node cost the servers per change (docs/architecture.md "Scale"). The
kernel is already written: a report the bus refuses (a full store, a timeout) is logged and the newest of
its kind goes out with the next report or drift check, never a reason to redo or park the delta it
describes.
"""

from __future__ import annotations

import time

from nats.js import JetStreamContext

from shared.contract import events, topology
from shared.messaging import bus

from .report_pacer import BUSY_REPORT_INTERVAL, REPORT_INTERVAL, ReportPacer


class Reports:
    """The node's reports, paced by a :class:`~.report_pacer.ReportPacer` (``interval`` seconds; 0: each
    one)."""

    def __init__(self, js: JetStreamContext, node: str, interval: float = REPORT_INTERVAL,
                 busy_interval: float = BUSY_REPORT_INTERVAL) -> None:
        self.js = js
        self.node = node
        self.pacer = ReportPacer(self.publish, interval, busy_interval=busy_interval)

    @property
    def unsent(self) -> dict[str, events.Envelope]:
        """The newest report of each kind not yet on the bus."""
        return self.pacer.unsent

    def report(self, record: events.ApplyReport | events.DriftReport) -> None:
        """Queue a report; it is published in the background, paced."""
        what = "applied" if isinstance(record, events.ApplyReport) else "drift"
        self.pacer.offer(what, events.Envelope(id=f"{what}/{self.node}/{record.plan_seq}/{time.time_ns()}",
                                               time_ns=time.time_ns(), producer=f"applier/{self.node}",
                                               record=record))

    async def publish(self, kind: str, envelope: events.Envelope) -> None:
        await bus.publish(self.js, topology.status_subject(self.node, kind), envelope)

    async def flush(self, within: float = 10.0) -> None:
        """Publish the queued reports now (bounded, seconds): at stop, the last one says what the kernel holds."""
        await self.pacer.flush(within)
