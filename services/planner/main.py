"""``kipvs planner``: the planner's NATS shell around the pure core.

Start: rebuild the core's state by replaying the Kubernetes event log up to the durable consumer's ack
floor (deltas are recomputed, not published: they were published before those events were acked), and
read the last delta sequence already in the plan stream. Then consume: each event goes through the core;
the deltas go to an outbox that is flushed (pipelined publishes, deterministic ids) before the batch is
acked. A delta whose sequence is already in the stream is never published again, so a crash at any point
neither loses nor duplicates a delta, however long the planner was down. A rebuild that did not read
every record up to the ack floor raises ``bus.IncompleteRead`` before anything is published (from a prefix
of the log, the correction below would remove from every node what the rest holds); the runtime marks the
planner not ready and starts it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from kipvs.shared import bus, config, delta_chunks, events, plan_log, runtime, topology
from kipvs.shared.config import describe
from kipvs.shared.plan.plan_state import SharedPlan

from . import parse
from .core import SHARED_SCOPE, Planner, PlannerConfig, tune_gc
from .fence import PUBLISHER, Fence
from .lease import LeaseTiming
from .planner_metrics import PlannerMetrics
from .progress import Progress

log = logging.getLogger("kipvs.planner")
PUBLISH_TIMEOUT = 10.0  # seconds for the server to acknowledge a flush of the outbox
# Atomic batch publish (nats-server >= 2.12, the stream's allow_atomic): all of a batch is stored, or none.
BATCH_ID, BATCH_SEQ, BATCH_COMMIT = "Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit"
ATOMIC_BATCH_MAX = 500  # the server refuses batches over 1,000 messages
ATOMIC_BATCH_BYTES = 16 << 20  # the server holds a batch in memory until its commit
# JetStream refusals that are the message's fault, never the bus's: retrying cannot help.
MESSAGE_FAULTS = frozenset({10054})  # JSStreamMessageExceedsMaximumErr


class PlannerServiceConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    scheduler: Annotated[str, describe("cluster default IPVS scheduler (kube-proxy's --ipvs-scheduler)")] = "rr"
    batch: Annotated[int, describe("events fetched per batch"), msgspec.Meta(ge=1, le=10_000)] = 500
    snapshot_every: Annotated[int, describe("write a snapshot after this many deltas"), msgspec.Meta(ge=1)] = 2000
    snapshot_interval: Annotated[float, describe("...or after this many seconds with changes"),
                                 msgspec.Meta(gt=0)] = 30.0
    leader_elect: Annotated[bool, describe(
        "run as one of several planners: only the holder of the lease plans, the others stay warm "
        "(kube-controller-manager's --leader-elect; every planner of a cluster must have it)")] = False
    leader_elect_lease_duration: Annotated[float, describe(
        "seconds a standby waits after the lease's last renewal before taking it over"), msgspec.Meta(gt=0)] = 3.0
    leader_elect_renew_deadline: Annotated[float, describe(
        "seconds the active planner keeps planning without a successful renewal"), msgspec.Meta(gt=0)] = 2.0
    leader_elect_retry_period: Annotated[float, describe(
        "seconds between renewals, and between a standby's checks"), msgspec.Meta(gt=0)] = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lease_timing().check()
        if self.scheduler not in parse.SCHEDULERS:
            known = ", ".join(sorted(parse.SCHEDULERS))
            raise ValueError(f"scheduler {self.scheduler!r} is not an IPVS scheduler ({known})")

    def lease_timing(self) -> LeaseTiming:
        return LeaseTiming(self.leader_elect_lease_duration, self.leader_elect_renew_deadline,
                           self.leader_elect_retry_period)


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
    await check_read_to(js, planner.source_seq, upto, count)
    return count


async def check_read_to(js: JetStreamContext, read_to: int, upto: int, count: int) -> None:
    """The core's state is a fold of every record up to ``upto``: check, independently of the reader, that
    none after the last one read (``read_to``) and up to ``upto`` is in the log; IncompleteRead when one is
    (its state would be a prefix's, and a correction published from it would remove what the rest holds)."""
    if read_to >= upto:
        return
    try:
        missed = await js.get_msg(topology.KUBE_STREAM, seq=read_to + 1, subject="kipvs.kube.>", next=True)
    except NotFoundError:
        return  # nothing after it: the records up to upto were deleted from the log (reconcile_published)
    if missed.seq is not None and missed.seq <= upto:
        raise bus.IncompleteRead(topology.KUBE_STREAM, "kipvs.kube.>", read_to, count,
                                 f"log record {missed.seq} was not read (the rebuild was to reach {upto})")


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
        if subject == topology.PLAN_LEADER_SUBJECT:
            continue  # the planners' fence markers, not deltas
        raw = await js.get_last_msg(topology.PLAN_STREAM, subject)
        found = _delta_position(raw.data, raw.seq)
        if found is None:
            # Not a whole delta (garbage or an empty message someone published, or a part of a chunked delta
            # whose last part is not stored: this planner's predecessor stopped while publishing it): the
            # last whole one counts, and an unfinished delta is published again, whole.
            log.warning("the last message on %s (stream seq %d) is not a whole plan delta; reading the subject "
                        "back", subject, raw.seq)
            async for stream_seq, delta in plan_log.complete_deltas(bus.read_stream(js, topology.PLAN_STREAM,
                                                                                    subject)):
                found = (delta.scope, delta.seq, stream_seq)
        if found is not None:
            scope, seq, stream_seq = found
            out[scope] = (seq, stream_seq)
    return out


def _delta_position(data: bytes | None, stream_seq: int) -> tuple[str, int, int] | None:
    """(scope, delta seq, stream seq) of a usable plan delta message, or of the last part of a chunked one
    (the planner publishes the parts in order, so the last one stored means they all are), else None."""
    try:
        record = events.decode(data or b"").record
    except events.ContractError:
        return None
    if isinstance(record, events.PlanDeltaChunk) and record.part == record.parts:
        return record.scope, record.seq, stream_seq
    if not isinstance(record, events.PlanDelta):
        return None
    return record.scope, record.seq, stream_seq


class PlanPublisher:
    """The outbox: deltas leave in order, exactly once, each on its scope's subject."""

    def __init__(self, js: JetStreamContext, published: dict[str, tuple[int, int]], fence: Fence | None = None,
                 deposed: asyncio.Event | None = None, nc: NATS | None = None) -> None:
        self.js = js
        self.nc = nc  # with a fence: batches are published on the connection itself (nats-py has no batch API)
        self.resync = False  # a fenced publish failed with an unknown outcome: read the stream back first
        self.fence = fence  # with leader election: every delta must still be behind our marker
        self.deposed = deposed  # set when the stream refuses a delta because another planner's marker is last
        self.published = {scope: seq for scope, (seq, _) in published.items()}  # highest delta seq per scope
        self.stream_seq = published.get(SHARED_SCOPE, (0, 0))[1]  # stream seq of the last shared delta
        self.outbox: list[events.Envelope] = []
        self.stream_limit = 0  # KIPVS_PLAN's max_msg_size when set (refresh_limit); 0: none
        self.cautious = False  # the last flush failed: the next one sends the head delta alone first

    def limit(self) -> int:
        """The most bytes one message may carry: the server's max_payload (as this connection was told it),
        or the plan stream's max_msg_size when an operator set a smaller one, less room for the headers."""
        nc = self.nc if self.nc is not None else self.js._nc
        size = min(nc.max_payload, self.stream_limit) if self.stream_limit else nc.max_payload
        return size - delta_chunks.HEADER_HEADROOM

    def _messages(self, env: events.Envelope) -> list[events.Envelope]:
        """The messages that carry one delta: itself, or its parts when it is too large for one."""
        try:
            return delta_chunks.split(env, self.limit())
        except ValueError as exc:
            raise Unpublishable(env, str(exc)) from None

    def _batches(self) -> list[list[tuple[events.Envelope, events.Envelope]]]:
        """The outbox as atomic batches of (delta, message): never a delta's parts in two batches (a batch
        is stored whole or not at all, so no reader ever finds half a delta), at most ATOMIC_BATCH_MAX
        messages and, unless one delta needs more, ATOMIC_BATCH_BYTES."""
        batches: list[list[tuple[events.Envelope, events.Envelope]]] = [[]]
        size = 0
        for env in self.outbox:
            try:
                parts = self._messages(env)
                if len(parts) > ATOMIC_BATCH_MAX:
                    raise Unpublishable(env, f"it needs {len(parts)} messages of at most {self.limit()} bytes, "
                                             f"more than an atomic batch holds ({ATOMIC_BATCH_MAX})")
            except Unpublishable:
                if batches[0]:
                    break  # publish what comes before it; it is reported when it is the head
                raise
            weight = sum(len(events.encode(part)) for part in parts)
            full = len(batches[-1]) + len(parts) > ATOMIC_BATCH_MAX or size + weight > ATOMIC_BATCH_BYTES
            if batches[-1] and (full or (self.cautious and len(batches) == 1)):  # after a failure: the head alone
                batches.append([])
                size = 0
            batches[-1] += [(env, part) for part in parts]
            size += weight
        return batches

    async def _flush_fenced(self) -> int:
        """Publish the outbox as atomic batches (nats-server >= 2.12), the fence on each batch's first message:
        the server stores a whole batch only while this planner's marker is the last on kipvs.plan.leader,
        else none of it. (A per-message fence cannot be pipelined on a clustered stream: it refuses a second
        message with an expected subject sequence while one is in flight. A fenced head followed by messages
        chained by expected stream sequence could still let a paused planner's later message line up with
        the new planner's positions.) After a failure whose outcome is unknown, what is stored is read back
        before anything is sent again: a batch holding an already stored id is refused whole."""
        assert self.fence is not None and self.nc is not None
        if self.resync:
            try:
                await self._resync()
            except bus.INFRASTRUCTURE_ERRORS as exc:
                raise bus.Retry(f"cannot read back the plan stream: {type(exc).__name__}: {exc}") from exc
            if not self.outbox:
                return 0
        fence = await self._check_fence()
        sent = 0
        for batch in self._batches():
            await self._publish_batch(batch, fence)
            deltas = list(dict.fromkeys(env.id for env, _ in batch))
            del self.outbox[:len(deltas)]
            sent += len(deltas)
        if self.outbox:
            self._batches()  # the batches stopped before a delta that cannot be published: raise it
        return sent

    async def _publish_batch(self, batch: list[tuple[events.Envelope, events.Envelope]], fence: dict[str, str]) -> None:
        """One atomic batch; the deltas it holds marked published once the server has stored it."""
        assert self.fence is not None and self.nc is not None
        batch_id = secrets.token_hex(16)
        what = f"{len(dict.fromkeys(env.id for env, _ in batch))} deltas"
        try:
            for i, (_, msg) in enumerate(batch, 1):
                headers = {**bus.msg_id_header(msg), BATCH_ID: batch_id, BATCH_SEQ: str(i),
                           PUBLISHER: self.fence.identity, **(fence if i == 1 else {})}
                subject, data = subject_for(msg.record.scope), events.encode(msg)  # type: ignore[union-attr]
                if i < len(batch):
                    await self.nc.publish(subject, data, headers=headers)
                else:
                    reply = await self.nc.request(subject, data, timeout=PUBLISH_TIMEOUT,
                                                  headers={**headers, BATCH_COMMIT: "1"})
        except MaxPayloadError:
            self.resync = True
            raise Unpublishable(batch[i - 1][0], f"a message of {len(data)} bytes is over this server's "
                                                 f"max_payload ({self.nc.max_payload})") from None
        except Exception as exc:
            self.resync = True
            with contextlib.suppress(bus.Retry, *bus.INFRASTRUCTURE_ERRORS):
                await self._check_fence()
            raise bus.Retry(f"publishing {what} failed: {type(exc).__name__}: {exc}") from exc
        answer = json.loads(reply.data or b"{}")
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == 10071 and self.deposed is not None:
                self.deposed.set()
                raise bus.Retry(f"another planner took over: the plan stream refused {what} behind this "
                                "planner's fence")
            self.resync = True
            if error.get("err_code") in MESSAGE_FAULTS:
                raise Unpublishable(batch[0][0], f"the plan stream refused it: {error.get('description')}")
            raise bus.Retry(f"the plan stream refused {what}: {error.get('description')}")
        first = int(answer["seq"]) - len(batch) + 1
        for k, (env, msg) in enumerate(batch):
            if msg is env or msg.record.part == msg.record.parts:  # type: ignore[union-attr]
                self._published(env, first + k)

    def _published(self, env: events.Envelope, stream_seq: int) -> None:
        """Mark a delta stored, its last message at ``stream_seq``."""
        record = env.record
        assert isinstance(record, events.PlanDelta)
        self.published[record.scope] = record.seq
        if record.scope == SHARED_SCOPE:
            self.stream_seq = stream_seq

    async def _resync(self) -> None:
        """Read back what the plan stream holds and drop it from the outbox."""
        stored = await last_published(self.js)
        self.published = {scope: seq for scope, (seq, _) in stored.items()}
        self.stream_seq = stored.get(SHARED_SCOPE, (0, 0))[1]
        self.outbox = [env for env in self.outbox
                       if env.record.seq > self.published.get(env.record.scope, 0)]  # type: ignore[union-attr]
        self.resync = False

    async def _check_fence(self) -> dict[str, str]:
        """The fence headers while our marker is still the last one; else mark this planner deposed and raise
        Retry. One read per flush: a deposed planner finds out before it sends anything, in the usual case;
        the server's check on every delta covers the pause between this read and the publishes."""
        assert self.fence is not None
        try:
            last_seq = (await self.js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_LEADER_SUBJECT)).seq
        except NotFoundError:
            last_seq = 0  # the marker is gone (the stream was purged): the server refuses our deltas too
        except bus.INFRASTRUCTURE_ERRORS as exc:
            raise bus.Retry(f"cannot read the planners' fence: {type(exc).__name__}: {exc}") from exc
        if last_seq != self.fence.marker_seq:
            if self.deposed is not None:
                self.deposed.set()
            raise bus.Retry(f"another planner took over: its fence (plan stream seq {last_seq}) is newer than "
                            f"this planner's ({self.fence.marker_seq}); {len(self.outbox)} deltas not published")
        return self.fence.headers()

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
        """Publish the outbox in order; the number of deltas published. :class:`Unpublishable` when a delta
        cannot be stored whatever the retries (the caller parks it and is not ready: never skip it, which
        would desynchronise every node); ``bus.Retry`` for anything else. After a failure the stream's
        message size limit is read again (an operator may have changed it) and the next flush starts with
        the failed delta alone."""
        if not self.outbox:
            return 0
        try:
            if self.fence is not None:
                return await self._flush_fenced()
            count = 0
            while self.outbox:
                segment = self._segment()
                await self._publish_segment(segment)
                del self.outbox[:len(segment)]
                count += len(segment)
                self.cautious = False
            return count
        except bus.Retry:
            self.cautious = True
            with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                await self.refresh_limit()
            raise

    async def refresh_limit(self) -> None:
        """Read KIPVS_PLAN's own message size limit (``max_msg_size``; kipvs sets none, an operator may)."""
        info = await self.js.stream_info(topology.PLAN_STREAM)
        size = info.config.max_msg_size or 0
        self.stream_limit = size if size > 0 else 0

    def _segment(self) -> list[tuple[events.Envelope, list[events.Envelope]]]:
        """The deltas at the head of the outbox that may be pipelined together: a run of one-message deltas.
        A chunked delta goes alone, and so does the head after a failure: a pipelined message the stream
        refuses does not stop the ones after it, which would then be stored past a missing delta."""
        head = self.outbox[0]
        segment = [(head, self._messages(head))]
        if len(segment[0][1]) > 1 or self.cautious:
            return segment
        for env in self.outbox[1:]:
            try:
                messages = self._messages(env)
            except Unpublishable:
                break  # reported when it is the head
            if len(messages) > 1:
                break
            segment.append((env, messages))
        return segment

    async def _publish_segment(self, segment: list[tuple[events.Envelope, list[events.Envelope]]]) -> None:
        sent: list[tuple[events.Envelope, events.Envelope, asyncio.Future]] = []
        try:
            for env, messages in segment:
                for msg in messages:
                    data = events.encode(msg)
                    try:
                        future = await self.js.publish_async(subject_for(msg.record.scope), data,  # type: ignore[union-attr]
                                                             headers=bus.msg_id_header(msg))
                    except MaxPayloadError:
                        raise Unpublishable(env, f"a message of {len(data)} bytes is over this server's max_payload "
                                                 f"({self.limit() + delta_chunks.HEADER_HEADROOM})") from None
                    sent.append((env, msg, future))
            # publish_async's futures never resolve if the server goes away before it acks: bounded wait
            acks = await asyncio.wait_for(asyncio.gather(*(f for _, _, f in sent)), PUBLISH_TIMEOUT)
        except Exception as exc:
            for _, _, future in sent:
                future.cancel()
            if isinstance(exc, Unpublishable):
                raise
            await self._probe([(env, msg) for env, msg, future in sent if not future.done() or future.cancelled()])
            raise bus.Retry(f"publishing {len(segment)} deltas failed: {type(exc).__name__}: {exc}") from exc
        for (env, msg, _), ack in zip(sent, acks, strict=True):
            if msg is env or msg.record.part == msg.record.parts:  # type: ignore[union-attr]
                self._published(env, ack.seq)

    async def _probe(self, unacked: list[tuple[events.Envelope, events.Envelope]]) -> None:
        """nats-py 2.16 never resolves a ``publish_async`` future the stream answers with an error (its reply
        handler raises instead), so a refusal looks like a timeout: publish the first unacknowledged message
        again, awaited (the same Nats-Msg-Id: a stored one is only acknowledged again), to hear the refusal.
        :class:`Unpublishable` when it is the message's fault; anything else is left to the caller's Retry."""
        if not unacked:
            return
        env, msg = unacked[0]
        try:
            await self.js.publish(subject_for(msg.record.scope), events.encode(msg),  # type: ignore[union-attr]
                                  headers=bus.msg_id_header(msg), timeout=PUBLISH_TIMEOUT)
        except APIError as exc:
            if exc.err_code in MESSAGE_FAULTS:
                raise Unpublishable(env, f"the plan stream refused it: {exc.description}") from None
        except bus.INFRASTRUCTURE_ERRORS:
            pass


class Unpublishable(bus.Retry):
    """A delta the plan stream cannot take whatever the retries (the message's fault, not the bus's)."""

    def __init__(self, delta: events.Envelope, reason: str) -> None:
        super().__init__(f"delta {delta.id} cannot be published: {reason}")
        self.delta = delta
        self.reason = reason


async def park_unpublishable(js: JetStreamContext, exc: Unpublishable) -> None:
    """Park (once: the parking id is the delta's) a description of a delta the stream refuses: its bytes may
    be what is too large."""
    record = exc.delta.record
    assert isinstance(record, events.PlanDelta)
    data = events.encode(exc.delta)
    summary = json.dumps({"id": exc.delta.id, "scope": record.scope, "seq": record.seq, "source_seq": record.source_seq,
                          "operations": len(record.ops), "bytes": len(data), "causation": list(exc.delta.causation)})
    await bus.park(js, "planner", None, summary.encode(), str(exc), subject=subject_for(record.scope))


def new_planner(cfg: PlannerServiceConfig) -> Planner:
    return Planner(PlannerConfig(default_scheduler=cfg.scheduler))


async def plan(ctx: runtime.ServiceContext, planner: Planner | None = None, fence: Fence | None = None,
               deposed: asyncio.Event | None = None) -> None:
    """Plan until told to stop. With leader election (see ``failover.py``): ``planner`` is the standby's warm
    core (replayed up to the consumer's ack floor while passive), ``fence`` guards every publish, and
    ``deposed`` is set (by the lease or the fence) when another planner has taken over: then return at once,
    without a final snapshot."""
    cfg = ctx.config
    assert isinstance(cfg, PlannerServiceConfig)
    m = ctx.metrics
    processed = m.counter("kipvs_planner_events_total", "Kubernetes records planned")
    published = m.counter("kipvs_planner_deltas_published_total", "plan deltas published")
    planning = m.histogram("kipvs_planner_planning_seconds", "core time per record")
    snapshots = m.counter("kipvs_planner_snapshots_total", "snapshots written")
    info = await ctx.js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
    if planner is not None and planner.source_seq > info.ack_floor.stream_seq:
        # Its core is past what was published (the consumer was reset): deltas could be missing. Rebuild.
        log.warning("the warm state is at log seq %d, past the consumer's ack floor %d: rebuilding it",
                    planner.source_seq, info.ack_floor.stream_seq)
        planner = None
    planner = planner or new_planner(cfg)
    stage = PlannerMetrics(m, lambda: planner)
    # Planning now: 1 (with --leader-elect, failover.py sets it back to 0 when it stands by; the plan gauges
    # of a standby hold what it last planned, so dashboards and alerts select the active planner by this).
    m.gauge("kipvs_planner_leader_election_master_status", "1 while this planner is the active one, 0 while it "
            "stands by (client-go's leader_election_master_status)").set(1)
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
    publisher = PlanPublisher(ctx.js, await last_published(ctx.js), fence, deposed, ctx.nc)
    await publisher.refresh_limit()
    log.info("rebuilt state from %d logged records in %.2fs (up to log seq %d); %d shared deltas in the plan "
             "stream", replayed, time.perf_counter() - started, info.ack_floor.stream_seq, publisher.published_seq)
    progress = Progress(ctx, m, lambda: planner.source_seq, lambda: len(publisher.outbox))
    parked: set[str] = set()

    async def flush() -> None:
        outgoing = list(publisher.outbox)
        try:
            published.inc(await progress.publish(publisher.flush, len(outgoing)))
        except Unpublishable as exc:
            # Never skipped (every node would miss it): parked once with the reason, and not ready (progress
            # says why) until an operator makes room for it: the publish is tried at every batch and idle.
            if exc.delta.id not in parked:
                with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                    await park_unpublishable(ctx.js, exc)
                    parked.add(exc.delta.id)
            raise
        stage.published(outgoing)

    # Events a previous instance took but never acked come back only after ack_wait; plan them now, in
    # log order, and skip them when the durable consumer redelivers them.
    if info.delivered.stream_seq > planner.source_seq:
        caught = await replay_log(ctx.js, planner, info.delivered.stream_seq, publisher.add)
        with contextlib.suppress(Unpublishable):  # parked, not ready: the consumer loop tries it again
            await flush()
        log.info("planned %d events a previous instance had taken but not acked", caught)
    # The log and the plan stream disagree (records were deleted) unless deltas wait in the outbox.
    if not publisher.outbox and planner.seq != publisher.published_seq:
        await reconcile_published(ctx.js, planner, publisher)
    store = await ctx.js.object_store(topology.SNAPSHOT_BUCKET)
    snap_state = {"seq": -1, "at": 0.0}

    async def snapshot(force: bool = False) -> None:
        due = planner.seq - snap_state["seq"] >= cfg.snapshot_every or (
            planner.seq != snap_state["seq"] and time.monotonic() - snap_state["at"] >= cfg.snapshot_interval)
        if not (force or due) or publisher.outbox or (deposed is not None and deposed.is_set()):
            return
        snap = planner.snapshot(plan_stream_seq=publisher.stream_seq)
        envelope = events.Envelope(id=f"snapshot/{SHARED_SCOPE}/{snap.seq}", time_ns=time.time_ns(),
                                   producer="planner", record=snap)
        await store.put(topology.snapshot_object(SHARED_SCOPE), events.encode(envelope))
        snap_state.update(seq=planner.seq, at=time.monotonic())
        snapshots.inc()

    async def handle(batch: list[bus.Delivery]) -> None:
        for d in batch:
            seq = d.stream_sequence
            if seq <= planner.source_seq:
                continue  # redelivered: planned already, its deltas are in the outbox or the stream
            if seq > planner.source_seq + 1:
                # Records this consumer was not handed in order (a deposed planner fetched them before it
                # knew; they come back only after ack_wait) or that were parked: read them from the log,
                # so the core sees every record in log order whoever fetched it.
                await replay_log(ctx.js, planner, seq - 1, publisher.add)
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
    checker = asyncio.create_task(progress.watch(ctx.js))
    stopping = asyncio.create_task(ctx.stop.wait())
    waits = {runner, stopping}
    if deposed is not None:
        waits.add(asyncio.create_task(deposed.wait()))
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
        await snapshot(force=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, PlannerServiceConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(PlannerServiceConfig, vars(args))
    from . import failover  # it builds on this module

    service = failover.run if cfg.leader_elect else plan
    asyncio.run(runtime.run_service("planner", cfg, service, consumers=[topology.planner_consumer()]))
    return 0
