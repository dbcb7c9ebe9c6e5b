"""The planner's own truth about its progress (issue 21, "Green only when true").

- **Publishing**: while the plan stream refuses the planner's deltas (a full store, a payload over the
  server's limit, a fence, a timeout), the planner is not ready (``/readyz`` 503 with the reason) and
  ``kipvs_planner_unpublished_deltas`` stays above 0; ``kipvs_planner_publish_errors_total`` counts the failed
  flushes. Readiness comes back with the first flush that goes through.
- **Position against the log**: every ``period`` seconds, KIPVS_KUBE's last sequence
  (``kipvs_planner_log_last_seq``) against the planner's position (``kipvs_planner_source_seq``: the last
  record planned, or the consumer's ack floor when that is further: a parked record plans nothing but is
  passed). ``kipvs_planner_behind_seconds`` is how long the log has been ahead without the planner reaching
  what it held then (0 when caught up): a record in flight shows a second or two, a planner that cannot
  plan shows a clock that keeps running. Measured on this process's monotonic clock, never a server's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import topology
from shared.messaging import bus
from shared.service import runtime
from shared.service.metrics import Registry

log = logging.getLogger("kipvs.planner")

CHECK_PERIOD_S = 5.0


@dataclass
class LagClock:
    """Pure: how long the log's head has been ahead of a position. ``observe`` each check; the gap's start
    is when a head was first seen that the position has not reached since (late by at most one period)."""

    since: float | None = None
    target: int = 0

    def observe(self, head: int, position: int, now: float) -> float:
        """Seconds behind now (0 when ``position`` has reached ``head``)."""
        if position >= head:
            self.since = None
            return 0.0
        if self.since is None or position >= self.target:
            self.since, self.target = now, head  # a new gap: what was seen before is planned
        return now - self.since


class Progress:
    """The planner's publish health and position gauges; ``position()`` is the core's last planned log
    sequence, ``unpublished()`` the outbox's length."""

    def __init__(self, ctx: runtime.ServiceContext, metrics: Registry, position: Callable[[], int],
                 unpublished: Callable[[], int]) -> None:
        self.ctx = ctx
        self.position = position
        self.floor = 0  # the planner consumer's ack floor at the last check
        self.head = 0
        self.behind = 0.0
        self.clock = LagClock()
        self.blocked = ""  # the not-ready reason this module set, while publishing fails
        self.errors = metrics.counter("kipvs_planner_publish_errors_total",
                                      "flushes of planned deltas the plan stream refused or did not acknowledge")
        metrics.gauge("kipvs_planner_unpublished_deltas", "deltas planned but not yet acknowledged by the plan stream",
                      read=lambda: unpublished())
        metrics.gauge("kipvs_planner_log_last_seq", "KIPVS_KUBE's last sequence at the last check",
                      read=lambda: self.head)
        metrics.gauge("kipvs_planner_source_seq", "the last Kubernetes log sequence planned (or passed, if parked)",
                      read=lambda: self.planned())
        metrics.gauge("kipvs_planner_behind_seconds",
                      "seconds the log has been ahead of what is planned (0: caught up)", read=lambda: self.behind)

    def planned(self) -> int:
        return max(self.position(), self.floor)

    async def publish(self, flush: Callable[[], Awaitable[int]], pending: int) -> int:
        """``flush()``; when it fails: not ready, with the reason, and counted; the error is raised again."""
        try:
            sent = await flush()
        except Exception as exc:
            self.errors.inc()
            self.blocked = f"cannot publish {pending} planned deltas: {type(exc).__name__}: {exc}"
            self.ctx.set_not_ready(self.blocked)
            raise
        if self.blocked:
            if self.ctx.ready_reason == self.blocked:
                self.ctx.set_ready()
            log.info("the plan stream takes deltas again")
            self.blocked = ""
        return sent

    async def check(self, js: JetStreamContext) -> None:
        """One look at the log's head and the consumer's ack floor. nats-py's errors when the bus fails."""
        try:
            self.floor = (await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)).ack_floor.stream_seq
        except NotFoundError:
            self.floor = 0
        self.head = (await js.stream_info(topology.KUBE_STREAM)).state.last_seq
        self.behind = self.clock.observe(self.head, self.planned(), time.monotonic())

    async def watch(self, js: JetStreamContext, period: float = CHECK_PERIOD_S) -> None:
        """Check every ``period`` seconds until cancelled; a failing bus leaves the last values."""
        while True:
            try:
                await self.check(js)
            except bus.INFRASTRUCTURE_ERRORS:
                # The bus cannot answer: the last head seen is still unplanned, so the clock keeps running.
                self.behind = self.clock.observe(self.head, self.planned(), time.monotonic())
            await asyncio.sleep(period)
