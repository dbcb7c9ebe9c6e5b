"""Exactly-once publishing of plan deltas: the planner's outbox.

Rules of this room:
- A delta leaves in order, once: its id is its ``Nats-Msg-Id`` (JetStream drops a duplicate inside the
  stream's duplicate window) and a delta whose sequence is already in the plan stream is never added again
  (:func:`last_published` reads where each subject stands).
- A delta too large for one message is split (``shared/contract/delta_chunks.py``); its parts are never pipelined
  with other messages and, fenced, never split across two atomic batches: no reader finds half a delta.
- With leader election every publish carries the fence (``fence.py``): the server stores a whole batch only
  while this planner's marker is the last on ``kipvs.plan.leader``.
- A delta the stream cannot take whatever the retries is :class:`Unpublishable`: parked once with the
  reason, never skipped. Everything else is ``bus.Retry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared.contract import delta_chunks, events, topology
from shared.messaging import bus, plan_log

from .core import SHARED_SCOPE
from .fence import PUBLISHER, Fence

log = logging.getLogger("kipvs.planner")
PUBLISH_TIMEOUT = 10.0  # seconds for the server to acknowledge a flush of the outbox
# Atomic batch publish (nats-server >= 2.12, the stream's allow_atomic): all of a batch is stored, or none.
BATCH_ID, BATCH_SEQ, BATCH_COMMIT = "Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit"
ATOMIC_BATCH_MAX = 500  # the server refuses batches over 1,000 messages
ATOMIC_BATCH_BYTES = 16 << 20  # the server holds a batch in memory until its commit
# JetStream refusals that are the message's fault, never the bus's: retrying cannot help.
MESSAGE_FAULTS = frozenset({10054})  # JSStreamMessageExceedsMaximumErr


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
            msgs = bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), subject)
            async for stream_seq, delta in plan_log.complete_deltas(msgs):
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
        return atomic_batches(self.outbox, self._messages, self.limit(), self.cautious)

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


Batch = list[tuple[events.Envelope, events.Envelope]]  # (delta, one of its messages), in publish order


def atomic_batches(outbox: list[events.Envelope], messages: Callable[[events.Envelope], list[events.Envelope]],
                   limit: int, cautious: bool) -> list[Batch]:
    """The outbox as atomic batches of (delta, message): never a delta's parts in two batches (a batch
    is stored whole or not at all, so no reader ever finds half a delta), at most ATOMIC_BATCH_MAX
    messages and, unless one delta needs more, ATOMIC_BATCH_BYTES; ``cautious`` (after a failure): the head
    delta alone first. :class:`Unpublishable` when the head delta cannot be sent (``messages`` raises it, or
    it needs more messages of ``limit`` bytes than a batch holds); a later one ends the batches before it."""
    batches: list[Batch] = [[]]
    size = 0
    for env in outbox:
        try:
            parts = messages(env)
            if len(parts) > ATOMIC_BATCH_MAX:
                raise Unpublishable(env, f"it needs {len(parts)} messages of at most {limit} bytes, "
                                         f"more than an atomic batch holds ({ATOMIC_BATCH_MAX})")
        except Unpublishable:
            if batches[0]:
                break  # publish what comes before it; it is reported when it is the head
            raise
        weight = sum(len(events.encode(part)) for part in parts)
        full = len(batches[-1]) + len(parts) > ATOMIC_BATCH_MAX or size + weight > ATOMIC_BATCH_BYTES
        if batches[-1] and (full or (cautious and len(batches) == 1)):  # after a failure: the head alone
            batches.append([])
            size = 0
        batches[-1] += [(env, part) for part in parts]
        size += weight
    return batches
