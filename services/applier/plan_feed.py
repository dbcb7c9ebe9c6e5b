"""The node's plan feed (issue 27): deltas by plain core-NATS subscription, JetStream only to repair a gap.

KIPVS_PLAN republishes every message it stores (``RePublish``, ``kipvs.plan.>`` -> ``kipvs.feed.>``,
shared/contract/topology.py): once, by the stream's leader, after it is stored, with the stream's headers
``Nats-Sequence`` (its stream sequence) and ``Nats-Last-Sequence`` (the stream sequence of the previous
message on the same subject, 0 for none). A message the stream refused (a deposed planner's fenced delta, a
duplicate ``Nats-Msg-Id``) is never republished. Each applier subscribes to ``kipvs.feed.all`` and
``kipvs.feed.node.<node>``: per node and change the servers do one socket write; there is no per-node
consumer, pull request or acknowledgement (docs/architecture.md "Scale": these were most of the servers'
cost per node).

This is Calico Typha's model (``typha/pkg/syncserver/sync_server.go``: a new client gets a snapshot, then
one write per update; a client too far behind, ``MaxFallBehind``, is dropped and starts again from a
snapshot) with NATS's own parts: the applier knows, per subject, the stream
sequence of the last message it handled. A message whose ``Nats-Last-Sequence`` is newer than that is past a
gap (a message lost while disconnected, dropped as a slow consumer, or republished by a leader that died):
the messages after the position are read from the stream by sequence (``bus.read_stream``, the node's one
reader name) and handled in order, then the feed goes on; messages at or before the position are
duplicates and skipped. The same read runs after every reconnect of the connection and every
``check_period`` seconds (a lost last message has no successor to reveal it): two single-message requests
(the subjects' last sequences) when nothing is missing. Exactly once into the kernel still holds: the
applier's plan skips deltas it has (``SharedPlan.apply``), and a node delta older than the applier's
Calico state is ignored.

The applier falls back to its durable consumer (:mod:`.plan_consumer`) on a KIPVS_PLAN declared without
the republish (an older ``kipvs topology apply``), saying so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus
from shared.messaging.backoff import Backoff
from shared.messaging.stream_guard import StreamGuard
from shared.service import runtime

from . import plan_consumer

log = logging.getLogger("kipvs.applier")

CHECK_PERIOD = 60.0  # seconds between two checks of the subjects' last sequences (a lost last message)
READ_WINDOW = 2_000  # stream sequences read per catch-up read, so a long gap is not held in memory at once
MAX_QUEUED = 10_000  # feed messages held unhandled; past it they are dropped and read from the stream instead
PENDING_BYTES = 64 * 1024**2  # nats-py's bound per subscription; past it nats-py drops (a gap, repaired)


@dataclass(frozen=True)
class _Sequence:
    stream: int


@dataclass(frozen=True)
class FeedMetadata:
    """The part of nats-py's ``Msg.Metadata`` kipvs reads (``bus.Delivery``, ``bus.park``), from the
    republished headers."""

    stream: str
    sequence: _Sequence
    num_pending: int = 0


@dataclass
class FeedMsg:
    """A republished plan message, shaped like the stream's own (its original subject, its stream
    sequence) so that the applier and ``bus.park`` take it as they take a consumer's."""

    subject: str
    data: bytes
    last: int  # Nats-Last-Sequence: the previous message on the same subject, 0 for none
    metadata: FeedMetadata
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.metadata.sequence.stream


def feed_message(msg: Msg) -> FeedMsg | None:
    """The republished message ``msg`` as a FeedMsg; None when it lacks the stream's headers (not published
    by the stream: nothing kipvs takes)."""
    headers = msg.headers or {}
    try:
        seq, last = int(headers["Nats-Sequence"]), int(headers.get("Nats-Last-Sequence", "0"))
        subject, stream = headers["Nats-Subject"], headers["Nats-Stream"]
    except (KeyError, ValueError):
        return None
    return FeedMsg(subject, msg.data or b"", last, FeedMetadata(stream, _Sequence(seq)), headers)


async def republished(js: JetStreamContext) -> bool:
    """Whether KIPVS_PLAN republishes what it stores on the feed subjects (one stream-info request)."""
    config = (await js.stream_info(topology.PLAN_STREAM)).config
    return config.republish is not None and config.republish.dest == topology.PLAN_FEED_DEST


class PlanFeed:
    """Hands the node's plan messages to ``handler`` (a list of ``bus.Delivery``, in stream order per
    subject, at most ``batch`` at a time), from the first stream sequence after ``after`` (what the
    bootstrap read). The same face as ``bus.DurableConsumer`` to the applier: ``run``, ``stop``,
    ``pending``, ``parked``, ``queued_since``, ``service``. A handler raising ``bus.Retry`` or a bus error
    has its messages read again from the stream after a backoff; any other exception has them handled one by
    one, and the one that fails is parked with the reason."""

    def __init__(self, nc: NATS, js: JetStreamContext, node: str, handler: bus.BatchHandler, after: int,
                 service: str, batch: int = 500, idle: Callable[[], Awaitable[None]] | None = None,
                 check_period: float = CHECK_PERIOD, guard: StreamGuard | None = None,
                 reader: bus.LogReader | None = None) -> None:
        self.nc, self.js, self.handler, self.service = nc, js, handler, service
        # the plan stream as bootstrapped from: checked after a reconnect (a server that came back with a wiped
        # store has a new KIPVS_PLAN whose sequences start over; the runtime then starts the applier again)
        self.guard = guard
        # how the stream is read on a gap: the node's one reader name (its permissions name no other consumer)
        self.reader = reader or bus.LogReader(topology.PLAN_STREAM)
        self.batch, self.idle, self.check_period = batch, idle, check_period
        self.subjects = (topology.PLAN_ALL_SUBJECT, topology.plan_node_subject(node))
        self.position = dict.fromkeys(self.subjects, after)  # last stream sequence handled, per subject
        self.queue: deque[FeedMsg] = deque()
        self.wake = asyncio.Event()
        self.repair = True  # read the stream before taking the feed: what came between bootstrap and subscribe
        self.repairs = 0  # reads of the stream after a gap, a reconnect or a check found something missing
        self.recheck = False  # ask the guard whether the plan stream was replaced (after a reconnect...)
        self.delivered = 0
        self.parked = 0
        self._queued_at: float | None = None
        self._stop = asyncio.Event()
        self._backoff = Backoff(initial=0.5, maximum=15.0)

    @property
    def pending(self) -> int:
        return len(self.queue)

    def queued_since(self) -> float | None:
        return self._queued_at

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    async def _on_message(self, msg: Msg) -> None:
        got = feed_message(msg)
        if got is None or got.subject not in self.position:
            return
        if len(self.queue) >= MAX_QUEUED:  # the handler is far behind: the stream holds them all
            self.queue.clear()
            self.repair = True
        if self._queued_at is None:
            self._queued_at = asyncio.get_running_loop().time()
        self.queue.append(got)
        self.wake.set()

    async def run(self) -> None:
        subs = [await self.nc.subscribe(topology.plan_feed_subject(s), cb=self._on_message,
                                        pending_msgs_limit=MAX_QUEUED, pending_bytes_limit=PENDING_BYTES)
                for s in self.subjects]
        loop = asyncio.get_running_loop()
        reconnects = self.nc.stats.get("reconnects", 0)
        next_check = loop.time() + self.check_period
        try:
            while not self._stop.is_set():
                if self.nc.stats.get("reconnects", 0) != reconnects:
                    reconnects, self.repair = self.nc.stats.get("reconnects", 0), True  # published meanwhile
                    self.recheck = True
                if self.recheck:
                    if await self._replaced():
                        return
                    # A wiped store's stream is missing at first: asked again (each turn, about a second
                    # apart) until it is back, when the guard tells a new stream from the old one.
                    self.recheck = self.guard is not None and bool(self.guard.missing)
                if loop.time() >= next_check:
                    next_check, self.repair = loop.time() + self.check_period, True  # a lost last message
                if self.repair:
                    await self._repair()
                elif self.queue:
                    await self._take_queued()
                else:
                    self._queued_at = None
                    if self.idle is not None:
                        await self.idle()
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), min(1.0, max(0.0, next_check - loop.time())))
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):  # a closed connection has no subscriptions left
                    await sub.unsubscribe()

    async def _replaced(self) -> bool:
        """True when the plan stream was replaced (the guard has told the runtime; this feed ends)."""
        if self.guard is None:
            return False
        try:
            return bool(await self.guard.check())
        except bus.INFRASTRUCTURE_ERRORS:
            return False  # an outage is not a replacement: the repair's read retries

    async def _take_queued(self) -> None:
        """Hand over the queued messages up to the first gap (which sets ``repair``), skipping duplicates."""
        taken: list[FeedMsg] = []
        have = dict(self.position)  # as it will be once ``taken`` is handled
        while self.queue and len(taken) < self.batch:
            msg = self.queue[0]
            if msg.seq <= have[msg.subject]:
                self.queue.popleft()
                continue
            if msg.last > have[msg.subject]:
                log.info("plan feed: %s gap (stream sequence %d follows %d, the last handled is %d); reading "
                         "the stream from there", msg.subject, msg.seq, msg.last, have[msg.subject])
                self.repair = True
                break
            have[msg.subject] = msg.seq
            taken.append(self.queue.popleft())
        if taken:
            await self._deliver(taken)

    async def _repair(self) -> None:
        """Read from the stream what is stored after each subject's position, and hand it over; a bus
        failure is retried after a backoff (``repair`` stays set)."""
        self.repair = False  # set again by a batch the handler asks for again
        try:
            for subject in self.subjects:
                await self._read_subject(subject)
        except bus.INFRASTRUCTURE_ERRORS as exc:
            delay = self._backoff.next()
            log.warning("plan feed: cannot read %s from the stream (%s: %s); retrying in %.1fs",
                        topology.PLAN_STREAM, type(exc).__name__, exc or "", delay)
            self.repair = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _read_subject(self, subject: str) -> None:
        try:
            last = (await self.js.get_last_msg(topology.PLAN_STREAM, subject)).seq or 0
        except NotFoundError:
            return  # nothing on the subject yet
        cursor = self.position[subject] + 1
        if last < self.position[subject]:
            self.recheck = True  # the subject's sequence went back: the stream may have been replaced
        if last < cursor:
            return
        self.repairs += 1
        while cursor <= last and not self._stop.is_set():
            upto = min(last, cursor + READ_WINDOW - 1)
            # Read whole before handling: the handler may re-bootstrap, which reads with the same reader name.
            msgs = [m async for m in bus.read_stream(self.js, self.reader, subject, start_seq=cursor, upto=upto)]
            for i in range(0, len(msgs), self.batch):
                if not await self._deliver(msgs[i:i + self.batch]):
                    return  # read again from its position (repair is set)
            cursor = upto + 1

    async def _deliver(self, msgs: list[Msg] | list[FeedMsg]) -> bool:
        """Decode (parking what cannot be decoded), hand over, move the positions on; False when the handler
        asked for the batch again (it is read from the stream after a backoff)."""
        deliveries: list[bus.Delivery] = []
        for msg in msgs:
            try:
                deliveries.append(bus.Delivery(msg, events.decode(msg.data)))  # type: ignore[arg-type]
            except events.ContractError as exc:
                await bus.park(self.js, self.service, msg, msg.data, exc.reason)  # type: ignore[arg-type]
                self.parked += 1
        try:
            if deliveries:
                await self._handle(deliveries)
        except (bus.Retry, *bus.INFRASTRUCTURE_ERRORS) as exc:
            delay = self._backoff.next()
            log.warning("plan feed: the batch will be read again from the stream in %.1fs (%s: %s)", delay,
                        type(exc).__name__, exc or "")
            self.repair = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            return False
        self._backoff.reset()
        for msg in msgs:
            self.position[msg.subject] = max(self.position[msg.subject], msg.metadata.sequence.stream)
        self.delivered += len(deliveries)
        return True

    async def _handle(self, deliveries: list[bus.Delivery]) -> None:
        try:
            await self.handler(deliveries)
        except (bus.Retry, *bus.INFRASTRUCTURE_ERRORS):
            raise
        except Exception:
            # One bad message must not block the others: find it by handling one at a time (as
            # bus.DurableConsumer does).
            log.exception("plan feed: a batch of %d failed; handling them one by one to find the cause",
                          len(deliveries))
            for d in deliveries:
                try:
                    await self.handler([d])
                except (bus.Retry, *bus.INFRASTRUCTURE_ERRORS):
                    raise
                except Exception as exc:
                    await bus.park(self.js, self.service, d.msg, d.msg.data,
                                   f"handler failed on {type(d.envelope.record).__name__} {d.envelope.id}: "
                                   f"{type(exc).__name__}: {exc}")
                    self.parked += 1


PlanInput = PlanFeed | bus.DurableConsumer


async def open_input(ctx: runtime.ServiceContext, node: str, handler: bus.BatchHandler, position: Callable[[], int],
                     batch: int, idle: Callable[[], Awaitable[None]], held: Callable[[], Awaitable[bool]],
                     mode: str = "feed", reader: bus.LogReader | None = None) -> PlanInput | None:
    """The node's plan input, from the first plan-stream sequence after ``position()`` (what the bootstrap
    read): the feed (``mode`` "feed", on a KIPVS_PLAN that republishes), else the durable consumer
    (:mod:`.plan_consumer`); ``reader``: how the feed reads the stream on a gap. None when told to stop
    first, or when ``held()`` says another applier holds the node now. The bus failing meanwhile (a cluster
    electing leaders) is retried with backoff."""
    durable = topology.applier_durable(node)
    if mode == "feed":
        backoff = Backoff(initial=0.5, maximum=10.0)
        while not ctx.stop.is_set():
            try:
                if not await held():
                    return None
                if not await republished(ctx.js):
                    log.warning("%s does not republish to %s (declared by an older 'kipvs topology apply'): "
                                "taking the plan from a durable consumer instead", topology.PLAN_STREAM,
                                topology.PLAN_FEED_DEST)
                    break
                # an earlier kipvs's durable of this node costs the servers for nothing now
                with contextlib.suppress(NotFoundError):
                    await ctx.js.delete_consumer(topology.PLAN_STREAM, durable)
                return PlanFeed(ctx.nc, ctx.js, node, handler, position(), durable, batch=batch, idle=idle,
                                guard=ctx.stream_guard, reader=reader)
            except bus.INFRASTRUCTURE_ERRORS as exc:
                delay = backoff.next()
                log.warning("cannot open the plan feed of %s yet (%s: %s); retrying in %.1fs", node,
                            type(exc).__name__, exc or "", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.stop.wait(), delay)
        if ctx.stop.is_set():
            return None
    keeper = plan_consumer.ConsumerKeeper(ctx.js, node, position, guard=ctx.stream_guard)
    spec = await keeper.start(ctx.stop, held=held)
    if spec is None:
        return None
    return bus.DurableConsumer(ctx.js, spec, spec.config.durable_name or "applier", handler, batch=batch, idle=idle,
                               on_fetch_error=keeper.on_fetch_error, fetch_wait=plan_consumer.FETCH_WAIT)
