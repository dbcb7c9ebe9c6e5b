"""``kipvs planner``: the planner's NATS shell around the pure core.

Start: rebuild the core's state by replaying the Kubernetes event log up to the durable consumer's ack
floor (deltas are recomputed, not published: they were published before those events were acked), and
read the last delta sequence already in the plan stream. Then consume: each event goes through the core;
the deltas go to an outbox that is flushed (pipelined publishes, deterministic ids) before the batch is
acked. A delta whose sequence is already in the stream is never published again, so a crash at any point
neither loses nor duplicates a delta, however long the planner was down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kipvs.shared import bus, config, events, plan_log, runtime, topology
from kipvs.shared.config import describe
from kipvs.shared.plan.plan_state import SharedPlan

from . import parse
from .core import SHARED_SCOPE, Planner, PlannerConfig, tune_gc
from .planner_metrics import PlannerMetrics

log = logging.getLogger("kipvs.planner")
PUBLISH_TIMEOUT = 10.0  # seconds for the server to acknowledge a flush of the outbox


class PlannerServiceConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    scheduler: Annotated[str, describe("cluster default IPVS scheduler (kube-proxy's --ipvs-scheduler)")] = "rr"
    batch: Annotated[int, describe("events fetched per batch"), msgspec.Meta(ge=1, le=10_000)] = 500
    snapshot_every: Annotated[int, describe("write a snapshot after this many deltas"), msgspec.Meta(ge=1)] = 2000
    snapshot_interval: Annotated[float, describe("...or after this many seconds with changes"),
                                 msgspec.Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheduler not in parse.SCHEDULERS:
            known = ", ".join(sorted(parse.SCHEDULERS))
            raise ValueError(f"scheduler {self.scheduler!r} is not an IPVS scheduler ({known})")


async def replay_log(js: JetStreamContext, planner: Planner, upto: int,
                     deltas: Callable[[list[events.Envelope]], None] | None = None) -> int:
    """Feed the log's records after the planner's position up to ``upto`` through the core; hand the deltas
    to ``deltas`` (None: discard them, they were published before). Returns the records replayed."""
    if upto <= planner.source_seq:
        return 0
    count = 0
    async for msg in bus.read_stream(js, topology.KUBE_STREAM, "kipvs.kube.>", start_seq=planner.source_seq + 1,
                                     upto=upto):
        seq = msg.metadata.sequence.stream
        try:
            envelope = events.decode(msg.data)
        except events.ContractError:
            planner.source_seq = seq  # parked when it was first consumed
            continue
        produced = planner.handle(envelope, seq)
        if deltas is not None:
            deltas(produced)
        count += 1
    return count


async def reconcile_published(js: JetStreamContext, planner: Planner, publisher: PlanPublisher) -> None:
    """The rebuilt state and the published deltas disagree on their count: records were deleted from the
    log (fewer deltas rebuilt than published: the next real change would reuse a published delta's seq and
    be dropped as a duplicate) or deltas from the plan stream (more). Continue the published sequence with
    one corrective delta: whatever the published plan (snapshot + deltas) holds that the rebuilt state
    does not, set or removed, so every applier converges to the planner's state."""
    published = await plan_log.published_plan(js)
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


def correction(published: SharedPlan, planner: Planner) -> list[events.PlanOp]:
    """The operations that turn the published shared plan into the planner's."""
    return [*_changes(published.services, planner.plans, events.SetService, events.RemoveService),
            *_changes(published.nodes, planner.nodes, events.SetNode, events.RemoveNode),
            *_changes(published.warnings, planner.warnings, events.SetWarning, events.ClearWarning)]


def _changes(have: dict[str, Any], want: dict[str, Any], set_op: Callable[[Any], events.PlanOp],
             remove_op: Callable[[str], events.PlanOp]) -> list[events.PlanOp]:
    """Set what differs, remove what ``want`` lacks, in key order."""
    ops: list[events.PlanOp] = []
    for key in sorted(set(have) | set(want)):
        if key not in want:
            ops.append(remove_op(key))
        elif have.get(key) != want[key]:
            ops.append(set_op(want[key]))
    return ops


def subject_for(scope: str) -> str:
    return topology.PLAN_ALL_SUBJECT if scope == SHARED_SCOPE else topology.plan_node_subject(scope)


async def last_published(js: JetStreamContext) -> dict[str, tuple[int, int]]:
    """Per plan subject in the stream: (last delta seq, its stream seq), keyed by scope."""
    out: dict[str, tuple[int, int]] = {}
    try:
        info = await js.stream_info(topology.PLAN_STREAM, subjects_filter="kipvs.plan.>")
    except NotFoundError:
        return out
    for subject in (info.state.subjects or {}):
        raw = await js.get_last_msg(topology.PLAN_STREAM, subject)
        found = _delta_position(raw.data, raw.seq)
        if found is None:
            # Not a delta (garbage or an empty message someone published): the last usable one counts.
            log.warning("the last message on %s (stream seq %d) is not a plan delta; reading the subject back",
                        subject, raw.seq)
            async for msg in bus.read_stream(js, topology.PLAN_STREAM, subject):
                found = _delta_position(msg.data, msg.metadata.sequence.stream) or found
        if found is not None:
            scope, seq, stream_seq = found
            out[scope] = (seq, stream_seq)
    return out


def _delta_position(data: bytes | None, stream_seq: int) -> tuple[str, int, int] | None:
    """(scope, delta seq, stream seq) of a usable plan delta message, else None."""
    try:
        record = events.decode(data or b"").record
    except events.ContractError:
        return None
    if not isinstance(record, events.PlanDelta):
        return None
    return record.scope, record.seq, stream_seq


class PlanPublisher:
    """The outbox: deltas leave in order, exactly once, each on its scope's subject."""

    def __init__(self, js: JetStreamContext, published: dict[str, tuple[int, int]]) -> None:
        self.js = js
        self.published = {scope: seq for scope, (seq, _) in published.items()}  # highest delta seq per scope
        self.stream_seq = published.get(SHARED_SCOPE, (0, 0))[1]  # stream seq of the last shared delta
        self.outbox: list[events.Envelope] = []

    @property
    def published_seq(self) -> int:
        return self.published.get(SHARED_SCOPE, 0)

    def add(self, deltas: list[events.Envelope]) -> None:
        for d in deltas:
            record = d.record
            assert isinstance(record, events.PlanDelta)
            if record.seq > self.published.get(record.scope, 0):
                self.outbox.append(d)

    async def flush(self) -> int:
        if not self.outbox:
            return 0
        futures = [await self.js.publish_async(subject_for(env.record.scope), events.encode(env),  # type: ignore[union-attr]
                                               headers=bus.msg_id_header(env)) for env in self.outbox]
        try:
            # publish_async's futures never resolve if the server goes away before it acks: bounded wait
            acks = await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT)
        except Exception as exc:
            for future in futures:
                future.cancel()
            raise bus.Retry(f"publishing {len(self.outbox)} deltas failed: {type(exc).__name__}: {exc}") from exc
        for env, ack in zip(self.outbox, acks, strict=True):
            record = env.record
            assert isinstance(record, events.PlanDelta)
            self.published[record.scope] = record.seq
            if record.scope == SHARED_SCOPE:
                self.stream_seq = ack.seq
        sent = len(self.outbox)
        self.outbox.clear()
        return sent


async def plan(ctx: runtime.ServiceContext) -> None:
    cfg = ctx.config
    assert isinstance(cfg, PlannerServiceConfig)
    m = ctx.metrics
    processed = m.counter("kipvs_planner_events_total", "Kubernetes records planned")
    published = m.counter("kipvs_planner_deltas_published_total", "plan deltas published")
    planning = m.histogram("kipvs_planner_planning_seconds", "core time per record")
    snapshots = m.counter("kipvs_planner_snapshots_total", "snapshots written")
    planner = Planner(PlannerConfig(default_scheduler=cfg.scheduler))
    stage = PlannerMetrics(m, lambda: planner)
    info = await ctx.js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
    consumer: bus.DurableConsumer | None = None
    # Declared before the rebuild, which can take a while: until the consumer runs, the lag is what the
    # durable consumer had not delivered at start.
    m.gauge("kipvs_planner_delta_seq", "last delta sequence", read=lambda: planner.seq)
    m.gauge("kipvs_planner_lag_events", "events in the log not yet planned",
            read=lambda: consumer.pending if consumer is not None else info.num_pending or 0)
    m.counter_reading("kipvs_planner_parked_total", "log records the planner parked (undecodable or refused)",
                      lambda: consumer.parked if consumer is not None else 0)
    started = time.perf_counter()
    replayed = await replay_log(ctx.js, planner, info.ack_floor.stream_seq)
    tune_gc()
    publisher = PlanPublisher(ctx.js, await last_published(ctx.js))
    log.info("rebuilt state from %d logged records in %.2fs (up to log seq %d); %d shared deltas in the plan "
             "stream", replayed, time.perf_counter() - started, info.ack_floor.stream_seq, publisher.published_seq)
    # Events a previous instance took but never acked come back only after ack_wait; plan them now, in
    # log order, and skip them when the durable consumer redelivers them.
    if info.delivered.stream_seq > planner.source_seq:
        caught = await replay_log(ctx.js, planner, info.delivered.stream_seq, publisher.add)
        await publisher.flush()
        log.info("planned %d events a previous instance had taken but not acked", caught)
    if planner.seq != publisher.published_seq:  # the log and the plan stream disagree: records were deleted
        await reconcile_published(ctx.js, planner, publisher)
    store = await ctx.js.object_store(topology.SNAPSHOT_BUCKET)
    snap_state = {"seq": -1, "at": 0.0}

    async def snapshot(force: bool = False) -> None:
        due = planner.seq - snap_state["seq"] >= cfg.snapshot_every or (
            planner.seq != snap_state["seq"] and time.monotonic() - snap_state["at"] >= cfg.snapshot_interval)
        if not (force or due) or publisher.outbox:
            return
        snap = planner.snapshot(plan_stream_seq=publisher.stream_seq)
        envelope = events.Envelope(id=f"snapshot/{SHARED_SCOPE}/{snap.seq}", time_ns=time.time_ns(),
                                   producer="planner", record=snap)
        await store.put(topology.snapshot_object(SHARED_SCOPE), events.encode(envelope))
        snap_state.update(seq=planner.seq, at=time.monotonic())
        snapshots.inc()

    async def flush() -> None:
        outgoing = list(publisher.outbox)
        published.inc(await publisher.flush())
        stage.published(outgoing)

    async def handle(batch: list[bus.Delivery]) -> None:
        for d in batch:
            seq = d.stream_sequence
            if seq <= planner.source_seq:
                continue  # redelivered: planned already, its deltas are in the outbox or the stream
            t0 = time.perf_counter()
            publisher.add(planner.handle(d.envelope, seq))
            planning.observe(time.perf_counter() - t0)
            processed.inc()
        await flush()
        await snapshot()

    async def idle() -> None:
        if publisher.outbox:  # planned but not yet on the bus (it refused them): not caught up
            try:
                await flush()
            except bus.Retry as exc:
                ctx.set_not_ready(f"{len(publisher.outbox)} planned deltas not yet published: {exc}")
                return
        ctx.set_ready()
        await snapshot()

    consumer = bus.DurableConsumer(ctx.js, topology.planner_consumer(), "planner", handle, batch=cfg.batch, idle=idle)
    ctx.queued_since = consumer.queued_since
    ctx.set_not_ready("catching up with the Kubernetes event log")
    await snapshot(force=True)
    runner = asyncio.create_task(consumer.run())
    stopping = asyncio.create_task(ctx.stop.wait())
    await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
    consumer.stop()
    await runner
    stopping.cancel()
    await snapshot(force=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, PlannerServiceConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(PlannerServiceConfig, vars(args))
    asyncio.run(runtime.run_service("planner", cfg, plan, consumers=[topology.planner_consumer()]))
    return 0
