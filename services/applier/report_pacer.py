"""Status reports, paced: at most one per kind per interval, only when it says something new.

Every node used to publish one ``ApplyReport`` per batch into the R3 stream KIPVS_STATUS: under churn that
is N replicated writes per change, the largest part of the servers' cost per node (issue 27, measured by
``python -m tests.bench fleet --split``; docs/architecture.md "Scale"). What ``kipvs status`` needs is where
each node is, not every step it took; so the pacer publishes a report at once when none of its kind went
out in the last ``interval`` seconds (a lone change is reported without delay), else holds the newest one and
publishes it when the interval has passed (a burst of changes is one report). Under sustained churn (three
reports in a row held back) the pace widens to ``busy_interval`` (5 s), or a quiet ``interval`` after the newest
offer when the churn ends, until a report goes out at once again:
one report per node per second was still most of what a node cost the servers per change, and
`kipvs status` needs a busy node's position within its --max-lag (30 s), not within a second (issue 27).
An ``ApplyReport`` that says
what the last one said (the same plan delta and desired state, no operations, no errors) is not published
at all. Drift reports (one per drift period) and everything else pass at the same pace.

The kernel is already written when a report is offered: a report the bus refuses (a full store, a timeout)
is logged and kept; the newest of its kind goes out with the next offer or after the interval, never a
reason to redo or park the delta it describes. Upstream analogue: Calico Felix's endpoint status reporter
(``felix/statusrep/status_reporter.go``, ``loopHandlingEndpointStatusUpdates``) writes a status only when it
differs from the last one, rate-limited by a ticker (``reportingDelay``) "to coalesce flapping status
updates and to avoid thundering herd issues"; kube-proxy reports nothing per change at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from shared.contract import events
from shared.messaging import bus

log = logging.getLogger("kipvs.applier")

# Seconds between two reports of one kind from one node. At 5,000 nodes this is at most 5,000 writes a
# second into KIPVS_STATUS whatever the change rate; `kipvs status --max-lag` (default 30 s) is far above it.
REPORT_INTERVAL = 1.0
# Under sustained churn (BUSY_AFTER reports in a row each held back for the interval) the pace widens to this
# until a report goes out at once again (none of its kind for this long): the reports were most of what a
# node still cost the servers per change (issue 27, docs/architecture.md "Scale"). `kipvs status` then sees
# a busy node's position up to this late, far below its --max-lag (30 s); a lone change is still reported at
# once. kubelet's node status has the same shape: 10 s while something changes, else every 5 min
# (pkg/kubelet/kubelet_node_status.go, tryUpdateNodeStatus: computed every nodeStatusUpdateFrequency, posted
# only when changed or nodeStatusReportFrequency has passed).
BUSY_REPORT_INTERVAL = 5.0
BUSY_AFTER = 3

Publish = Callable[[str, events.Envelope], Awaitable[None]]


def same_news(last: events.Envelope | None, new: events.Envelope) -> bool:
    """True when ``new`` is an ApplyReport that tells nothing ``last`` (the last one published) did not:
    the same plan delta and desired state, nothing written, nothing failed."""
    if last is None:
        return False
    a, b = last.record, new.record
    return (isinstance(a, events.ApplyReport) and isinstance(b, events.ApplyReport) and a.plan_seq == b.plan_seq
            and a.desired_digest == b.desired_digest and not b.operations and not b.errors)


class ReportPacer:
    """Publishes offered reports with ``publish(kind, envelope)`` at most once per ``interval`` seconds per
    kind (0: every offer, as before issue 27), the newest one of each kind, skipping repeats
    (:func:`same_news`); once ``BUSY_AFTER`` reports of a kind in a row were held back, at most once per
    ``busy_interval`` (never less than ``interval``) until one goes out at once. ``clock`` is monotonic
    seconds."""

    def __init__(self, publish: Publish, interval: float = REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, busy_interval: float = BUSY_REPORT_INTERVAL) -> None:
        self.publish = publish
        self.interval = interval
        self.busy_interval = max(busy_interval, interval)
        self.clock = clock
        self.unsent: dict[str, events.Envelope] = {}  # the newest report of each kind not yet on the bus
        self.sent: dict[str, events.Envelope] = {}  # the last report of each kind on the bus
        self.sent_at: dict[str, float] = {}
        self.held: set[str] = set()  # kinds whose unsent report was offered before it was due
        self.offered_at: dict[str, float] = {}  # when the newest unsent report of each kind was offered
        self.held_in_a_row: dict[str, int] = {}  # per kind: reports sent in a row that had been held back
        self.published = 0
        self.task: asyncio.Task | None = None

    def offer(self, kind: str, envelope: events.Envelope) -> None:
        """Queue ``envelope`` as the newest report of ``kind``; it goes out at once or after the interval."""
        if kind not in self.unsent and same_news(self.sent.get(kind), envelope):
            return
        self.unsent[kind] = envelope
        self.offered_at[kind] = self.clock()
        if self.due_in(kind) > 0:
            self.held.add(kind)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.send())

    def due_in(self, kind: str) -> float:
        """Seconds until a report of ``kind`` may go out (0: now). A busy kind's report goes out
        ``busy_interval`` after the last one, or sooner once no newer one was offered for ``interval`` (the
        churn ended: its last position is not held back)."""
        last = self.sent_at.get(kind)
        if last is None:
            return 0.0
        due = last + self.interval
        if self.held_in_a_row.get(kind, 0) >= BUSY_AFTER:
            quiet = self.offered_at.get(kind, last) + self.interval
            due = min(last + self.busy_interval, max(due, quiet))
        return max(0.0, due - self.clock())

    async def send(self) -> None:
        """Publish what is due until nothing is left; a failed publish ends the round (kept for the next)."""
        while self.unsent:
            kind = min(self.unsent, key=self.due_in)
            wait = self.due_in(kind)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            pending = self.unsent[kind]
            try:
                await self.publish(kind, pending)
            except bus.INFRASTRUCTURE_ERRORS as exc:
                log.warning("status report %s not published (%s: %s); it goes out with the next one",
                            pending.id, type(exc).__name__, exc or "")
                return
            self.sent[kind], self.sent_at[kind] = pending, self.clock()
            self.held_in_a_row[kind] = self.held_in_a_row.get(kind, 0) + 1 if kind in self.held else 0
            self.published += 1
            if self.unsent.get(kind) is pending:
                del self.unsent[kind]
                self.held.discard(kind)
            else:  # a newer one came meanwhile: it goes next, after the interval
                self.held.add(kind)

    async def flush(self, within: float = 10.0) -> None:
        """Publish what is queued now, without waiting for the interval (at stop: the last report says what
        the kernel holds); bounded by ``within`` seconds."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.sent_at.clear()
        if self.unsent:
            self.task = asyncio.create_task(self.send())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), within)
