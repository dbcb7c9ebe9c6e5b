"""The active planner: rebuild, catch up, then consume the Kubernetes event log and publish plan deltas.

Start: rebuild the core's state by replaying the Kubernetes event log up to the durable consumer's ack
floor (deltas are recomputed, not published: they were published before those events were acked), and
read the last delta sequence already in the plan stream. Then consume: each event goes through the core;
the deltas go to the outbox (``publisher.py``) that is flushed before the batch is acked. A delta whose
sequence is already in the stream is never published again, so a crash at any point neither loses nor
duplicates a delta, however long the planner was down. A rebuild that did not read every record up to the
ack floor raises ``bus.IncompleteRead`` before anything is published (from a prefix of the log, the
correction would remove from every node what the rest holds); the runtime marks the planner not ready and
starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext

from shared.contract import events, topology
from shared.messaging import bus, plan_log
from shared.service import runtime

from .core import SHARED_SCOPE, Planner, correction, tune_gc
from .fence import Fence
from .log_replay import replay_log
from .planner_metrics import PlannerMetrics
from .progress import Progress
from .publisher import PlanPublisher, Unpublishable, last_published, park_unpublishable
from .service_config import PlannerServiceConfig

log = logging.getLogger("kipvs.planner")

CATCHING_UP = "catching up with the Kubernetes event log"


async def plan(ctx: runtime.ServiceContext, planner: Planner | None = None, fence: Fence | None = None,
               deposed: asyncio.Event | None = None) -> None:
    """Plan until told to stop. With leader election (see ``failover.py``): ``planner`` is the standby's warm
    core (replayed up to the consumer's ack floor while passive), ``fence`` guards every publish, and
    ``deposed`` is set (by the lease or the fence) when another planner has taken over: then return at once,
    without a final snapshot."""
    active = ActivePlanner(ctx, deposed)
    await active.start(planner, fence)
    await active.consume()


async def reconcile_published(js: JetStreamContext, planner: Planner, publisher: PlanPublisher) -> None:
    """The rebuilt state and the published deltas disagree on their count: records were deleted from the
    log (fewer deltas rebuilt than published: the next real change would reuse a published delta's seq and
    be dropped as a duplicate) or deltas from the plan stream (more). Continue the published sequence with
    one corrective delta: whatever the published plan (snapshot + deltas) holds that the rebuilt state
    does not, set or removed (``core.correction``), so every applier converges to the planner's state."""
    published = await plan_log.published_plan(js, bus.LogReader(topology.PLAN_STREAM))
    ops = correction(published, planner)
    log.error("the log implies plan delta %d but the plan stream holds %d: records were deleted from a stream; "
              "%s", planner.seq, publisher.published_seq,
              f"publishing delta {publisher.published_seq + 1} ({len(ops)} operations) to bring every node to the "
              "state the log gives now" if ops else "the published state is the log's: continuing the sequence")
    planner.seq = publisher.published_seq
    planner.republish_nodes({scope: seq for scope, seq in publisher.published.items() if scope != SHARED_SCOPE})
    envelopes = planner.emit(ops, planner.source_seq, time.time_ns(), "reconcile/published-plan")
    publisher.add(envelopes)
    await publisher.flush()


class ActivePlanner:
    """One active term: the core, its outbox, the durable consumer that feeds it and the snapshots."""

    def __init__(self, ctx: runtime.ServiceContext, deposed: asyncio.Event | None) -> None:
        cfg = ctx.config
        assert isinstance(cfg, PlannerServiceConfig)
        self.ctx, self.cfg, self.deposed = ctx, cfg, deposed
        m = ctx.metrics
        self.processed = m.counter("kipvs_planner_events_total", "Kubernetes records planned")
        self.deltas_published = m.counter("kipvs_planner_deltas_published_total", "plan deltas published")
        self.planning = m.histogram("kipvs_planner_planning_seconds", "core time per record")
        self.snapshots = m.counter("kipvs_planner_snapshots_total", "snapshots written")
        self.planner: Planner = cfg.new_planner()
        self.consumer: bus.DurableConsumer | None = None
        self.publisher: PlanPublisher | None = None
        self.parked: set[str] = set()  # ids of deltas parked as unpublishable (once each)
        self.snapshot_seq, self.snapshot_at = -1, 0.0
        # The log's last sequence when this term began consuming: planned and published up to it, the planner
        # is caught up (ready) even while new records keep coming; None once reached.
        self.catch_up_to: int | None = None

    def _declare_metrics(self, info_pending: int) -> None:
        m = self.ctx.metrics
        # Planning now: 1 (with --leader-elect, failover.py sets it back to 0 when it stands by; the plan gauges
        # of a standby hold what it last planned, so dashboards and alerts select the active planner by this).
        m.gauge("kipvs_planner_leader_election_master_status", "1 while this planner is the active one, 0 while it "
                "stands by (client-go's leader_election_master_status)").set(1)
        # Declared before the rebuild, which can take a while: until the consumer runs, the lag is what the
        # durable consumer had not delivered at start.
        m.gauge("kipvs_planner_delta_seq", "last delta sequence", read=lambda: self.planner.seq)
        m.gauge("kipvs_planner_lag_events", "events in the log not yet planned",
                read=lambda: self.consumer.pending if self.consumer is not None else info_pending)
        m.counter_reading("kipvs_planner_parked_total", "log records the planner parked (undecodable or refused)",
                          lambda: self.consumer.parked if self.consumer is not None else 0)

    async def start(self, warm: Planner | None, fence: Fence | None) -> None:
        """Rebuild (or take the standby's warm core), read what is published, plan what a previous instance
        took but never acked, and reconcile a log and a plan stream that disagree."""
        js = self.ctx.js
        info = await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
        if warm is not None and warm.source_seq > info.ack_floor.stream_seq:
            # Its core is past what was published (the consumer was reset): deltas could be missing. Rebuild.
            log.warning("the warm state is at log seq %d, past the consumer's ack floor %d: rebuilding it",
                        warm.source_seq, info.ack_floor.stream_seq)
            warm = None
        self.planner = warm or self.planner
        self.stage = PlannerMetrics(self.ctx.metrics, lambda: self.planner)
        self._declare_metrics(info.num_pending or 0)
        started = time.perf_counter()
        replayed = await replay_log(js, self.planner, info.ack_floor.stream_seq)
        tune_gc()
        publisher = self.publisher = PlanPublisher(js, await last_published(js), fence, self.deposed, self.ctx.nc)
        await publisher.refresh_limit()
        log.info("rebuilt state from %d logged records in %.2fs (up to log seq %d); %d shared deltas in the plan "
                 "stream", replayed, time.perf_counter() - started, info.ack_floor.stream_seq,
                 publisher.published_seq)
        self.progress = Progress(self.ctx, self.ctx.metrics, lambda: self.planner.source_seq,
                                 lambda: len(publisher.outbox))
        # Events a previous instance took but never acked come back only after ack_wait; plan them now, in
        # log order, and skip them when the durable consumer redelivers them.
        if info.delivered.stream_seq > self.planner.source_seq:
            caught = await replay_log(js, self.planner, info.delivered.stream_seq, publisher.add)
            with contextlib.suppress(Unpublishable):  # parked, not ready: the consumer loop tries it again
                await self.flush()
            log.info("planned %d events a previous instance had taken but not acked", caught)
        # The log and the plan stream disagree (records were deleted) unless deltas wait in the outbox.
        if not publisher.outbox and self.planner.seq != publisher.published_seq:
            await reconcile_published(js, self.planner, publisher)
        self.store = await js.object_store(topology.SNAPSHOT_BUCKET)

    async def flush(self) -> None:
        """Publish the outbox; an unpublishable delta is parked once and raised (never skipped)."""
        assert self.publisher is not None
        outgoing = list(self.publisher.outbox)
        try:
            self.deltas_published.inc(await self.progress.publish(self.publisher.flush, len(outgoing)))
        except Unpublishable as exc:
            # Never skipped (every node would miss it): parked once with the reason, and not ready (progress
            # says why) until an operator makes room for it: the publish is tried at every batch and idle.
            if exc.delta.id not in self.parked:
                with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                    await park_unpublishable(self.ctx.js, exc)
                    self.parked.add(exc.delta.id)
            raise
        self.stage.published(outgoing)

    async def snapshot(self, force: bool = False) -> None:
        """Write the shared snapshot when due (``--snapshot-every`` deltas, or ``--snapshot-interval`` with
        changes), never with deltas still in the outbox (it would cover deltas not in the stream) nor deposed."""
        assert self.publisher is not None
        planner = self.planner
        due = planner.seq - self.snapshot_seq >= self.cfg.snapshot_every or (
            planner.seq != self.snapshot_seq and time.monotonic() - self.snapshot_at >= self.cfg.snapshot_interval)
        if not (force or due) or self.publisher.outbox or (self.deposed is not None and self.deposed.is_set()):
            return
        snap = planner.snapshot(plan_stream_seq=self.publisher.stream_seq)
        envelope = events.Envelope(id=f"snapshot/{SHARED_SCOPE}/{snap.seq}", time_ns=time.time_ns(),
                                   producer="planner", record=snap)
        await self.store.put(topology.snapshot_object(SHARED_SCOPE), events.encode(envelope))
        self.snapshot_seq, self.snapshot_at = planner.seq, time.monotonic()
        self.snapshots.inc()

    async def handle(self, batch: list[bus.Delivery]) -> None:
        """A batch from the durable consumer: each record through the core, in log order; flushed before it
        is acked."""
        assert self.publisher is not None
        for d in batch:
            seq = d.stream_sequence
            if seq <= self.planner.source_seq:
                continue  # redelivered: planned already, its deltas are in the outbox or the stream
            if seq > self.planner.source_seq + 1:
                # Records this consumer was not handed in order (a deposed planner fetched them before it
                # knew; they come back only after ack_wait) or that were parked: read them from the log,
                # so the core sees every record in log order whoever fetched it.
                await replay_log(self.ctx.js, self.planner, seq - 1, self.publisher.add)
            t0 = time.perf_counter()
            self.publisher.add(self.planner.handle(d.envelope, seq))
            self.planning.observe(time.perf_counter() - t0)
            self.processed.inc()
        await self.flush()
        self._check_caught_up(batch[-1] if batch else None)
        await self.snapshot()

    def _check_caught_up(self, last: bus.Delivery | None) -> None:
        """Ready once what the log held when this term began is planned and published (the outbox was just
        flushed), or once a batch left nothing pending in the consumer: "caught up" is a position, not "a
        fetch came back empty", which never happens while the cluster keeps changing (a restarted planner
        stayed not ready for a whole churn). As the applier does: it is caught up once it has read the plan
        stream up to where it stood at start (``plan_log.catch_up_to``). Only this transition: once caught up,
        readiness follows the publishing (``progress.py``)."""
        if self.catch_up_to is None or (self.publisher is not None and self.publisher.outbox):
            return
        if self.planner.source_seq >= self.catch_up_to or (last is not None and last.msg.metadata.num_pending == 0):
            self.catch_up_to = None
            if self.ctx.ready_reason == CATCHING_UP:
                self.ctx.set_ready()

    async def idle(self) -> None:
        assert self.publisher is not None
        if self.publisher.outbox:  # planned but not yet on the bus (it refused them): not caught up
            try:
                await self.flush()
            except bus.Retry as exc:
                self.ctx.set_not_ready(f"{len(self.publisher.outbox)} planned deltas not yet published: {exc}")
                return
        self.catch_up_to = None
        self.ctx.set_ready()
        await self.snapshot()

    async def consume(self) -> None:
        """Consume until told to stop or deposed; a last snapshot unless deposed or the streams were replaced."""
        ctx = self.ctx
        consumer = self.consumer = bus.DurableConsumer(ctx.js, topology.planner_consumer(), "planner", self.handle,
                                                       batch=self.cfg.batch, idle=self.idle)
        ctx.queued_since = consumer.queued_since
        ctx.set_not_ready(CATCHING_UP)
        self.catch_up_to = (await ctx.js.stream_info(topology.KUBE_STREAM)).state.last_seq
        await self.snapshot(force=True)
        runner = asyncio.create_task(consumer.run())
        checker = asyncio.create_task(self.progress.watch(ctx.js))
        stopping = asyncio.create_task(ctx.stop.wait())
        waits = {runner, stopping}
        if self.deposed is not None:
            waits.add(asyncio.create_task(self.deposed.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        consumer.stop()
        try:
            await runner
        finally:
            checker.cancel()
        for task in waits - {runner}:
            task.cancel()
        ctx.queued_since = None
        if not ctx.replaced:  # else this state belongs to the old streams: no snapshot of it in the new bucket
            await self.snapshot(force=True)
