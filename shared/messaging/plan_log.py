"""Reading the published plan back from NATS: the latest shared snapshot, then every shared delta stored
after it, by stream sequence. What an applier holds after bootstrap, and what the planner checks its own
rebuilt state against at start: one reader, so both see the same published state.

Every function takes the :class:`bus.LogReader` the plan is read with (``source``): KIPVS_PLAN itself (the
planner), KIPVS_PLAN under a node's one reader name (an applier: the snapshot bucket's chunks are read under
that name too), or KIPVS_PLAN through its audit mirror (the tools)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from shared.contract import delta_chunks, events, topology
from shared.messaging import bus
from shared.plan.plan_state import SequenceGap, SharedPlan

log = logging.getLogger("kipvs.plan")
SHARED = "all"  # the shared plan's scope


SNAPSHOT_READ_S = 30.0  # one read of the snapshot object; far above what 10,000 Services take (~2 s)
SNAPSHOT_READS = 3
SNAPSHOT_RETRY_S = 0.5


async def _read_snapshot(js: JetStreamContext, reader: str | None) -> bytes | None:
    """The snapshot object's bytes, None when there is none. A snapshot replaced while it is being read
    has its old chunks purged (seen with 200 appliers bootstrapping while the planner wrote its next
    snapshot): each read is bounded and retried, and TimeoutError (an infrastructure error: the service
    starts again) after the last. ``reader``: the fixed consumer name the chunks are read with (None: any)."""
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    for attempt in range(1, SNAPSHOT_READS + 1):
        try:
            read = _read_object(js, store, topology.snapshot_object("all"), reader)
            return await asyncio.wait_for(read, SNAPSHOT_READ_S)
        except (ObjectNotFoundError, NotFoundError):
            return None
        except (TimeoutError, _Incomplete) as exc:
            log.warning("reading the plan snapshot: %s (attempt %d of %d; was it replaced while being read?); "
                        "reading it again", exc or f"over {SNAPSHOT_READ_S:.0f}s", attempt, SNAPSHOT_READS)
            await asyncio.sleep(SNAPSHOT_RETRY_S)  # the planner writes the new chunks before the new metadata
    raise TimeoutError(f"the plan snapshot could not be read in {SNAPSHOT_READS} attempts")


class _Incomplete(Exception):
    """The object's chunks read do not make the object its metadata describes."""


async def _read_object(js: JetStreamContext, store: ObjectStore, name: str, reader: str | None) -> bytes:
    """One object's bytes, read the way nats-py's ``ObjectStore.get`` does (metadata, then the chunks by
    their subject ``$O.<bucket>.C.<nuid>``, then the SHA-256 digest) but through :func:`bus.read_stream`:
    ``get`` creates an ordered consumer with a name the server chooses, which a node's permissions could
    only allow by letting it create any consumer on the bucket's stream (issue 21: 5,000 of them cost the
    servers 248 MiB). ``reader``: the node's one reader name. _Incomplete when the chunks do not
    add up to the size and digest (replaced while read)."""
    info = await store.get_info(name)
    if not info.nuid or info.is_link():
        raise ObjectNotFoundError
    size = info.size or 0
    data, digest = bytearray(), hashlib.sha256()
    subject = f"$O.{topology.SNAPSHOT_BUCKET}.C.{info.nuid}"
    if size:
        async for msg in bus.read_stream(js, bus.LogReader(f"OBJ_{topology.SNAPSHOT_BUCKET}", reader), subject):
            if len(data) + len(msg.data) > size:
                raise _Incomplete(f"chunks beyond the object's {size} bytes")
            data += msg.data
            digest.update(msg.data)
    want = (info.digest or "").split("=", 1)[-1]
    if len(data) != size or base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=") != want.rstrip("="):
        raise _Incomplete(f"{len(data)} of {size} bytes read, or a different digest")
    return bytes(data)


async def load_snapshot(js: JetStreamContext, source: bus.LogReader) -> tuple[SharedPlan, int]:
    """The latest shared snapshot and the plan-stream sequence it covers; an empty plan at stream
    sequence 0 when there is none or it is unusable (then every delta is read from the stream)."""
    raw = await _read_snapshot(js, source.reader)
    if raw is None:
        return SharedPlan(), 0  # no planner has written one yet: start from the first delta
    try:
        snap = events.decode(raw or b"").record
    except events.ContractError as exc:
        log.warning("the plan snapshot is unusable (%s); reading every delta from the stream", exc.reason)
        return SharedPlan(), 0
    if not isinstance(snap, events.PlanSnapshot):
        log.warning("the plan snapshot holds a %s; reading every delta from the stream", type(snap).__name__)
        return SharedPlan(), 0
    stale = await _other_stream(js, snap)
    if stale:
        log.warning("the plan snapshot (delta %d) is of another plan stream: %s; reading every delta from the "
                    "stream", snap.seq, stale)
        return SharedPlan(), 0
    return SharedPlan.from_snapshot(snap), snap.plan_stream_seq


async def _other_stream(js: JetStreamContext, snap: events.PlanSnapshot) -> str:
    """Why the snapshot was not taken of the plan stream there now ("" when it was, or cannot be told): its
    ``plan_stream_seq`` must hold its shared delta ``seq``. A plan stream replaced (a wiped or restored store)
    with the snapshot bucket kept would otherwise make a bootstrap start past the new stream's deltas."""
    if not snap.plan_stream_seq:
        return ""
    try:
        raw = await js.get_msg(topology.PLAN_STREAM, snap.plan_stream_seq)
    except NotFoundError:
        last = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
        if last < snap.plan_stream_seq:
            return f"the stream ends at sequence {last}, before the snapshot's {snap.plan_stream_seq}"
        return ""  # that message was deleted from this stream: the snapshot still covers it
    try:
        record = events.decode(raw.data or b"").record
    except events.ContractError:
        record = None
    if isinstance(record, events.PlanDeltaChunk) and record.part != record.parts:
        record = None  # a chunked delta's position is its last part's
    shared = isinstance(record, events.PlanDelta | events.PlanDeltaChunk) and record.scope == "all"
    if shared and record.seq == snap.seq:  # type: ignore[union-attr]
        return ""
    held = f"shared delta {record.seq}" if shared else "another message"  # type: ignore[union-attr]
    return f"stream sequence {snap.plan_stream_seq} holds {held}, not shared delta {snap.seq}"


async def catch_up(js: JetStreamContext, source: bus.LogReader, plan: SharedPlan, after_stream_seq: int) -> int:
    """Apply to ``plan`` the shared deltas stored after ``after_stream_seq``, in order; returns how many.
    Unusable messages are skipped (their consumers park them); a sequence gap stops the catch-up there."""
    return (await catch_up_to(js, source, plan, after_stream_seq))[0]


async def catch_up_to(js: JetStreamContext, source: bus.LogReader, plan: SharedPlan,
                      after_stream_seq: int) -> tuple[int, int]:
    """:func:`catch_up`, also returning the plan-stream sequence it read up to (``after_stream_seq`` when
    nothing was stored after it): where a consumer that takes over from this reading must start, minus one.
    Chunked deltas are put back together (``delta_chunks``); the sequence returned is never inside one whose
    last part is not stored yet (a planner publishing it, or restarted while it did), so the consumer from
    there delivers all of its parts."""
    followed = await follow(js, source, plan, after_stream_seq)
    return followed.applied, followed.last


@dataclass
class Followed:
    """What :func:`follow` did: deltas applied, the stream sequence read up to (as :func:`catch_up_to`),
    the keys of the Services they set or removed, and whether it stopped early at a sequence gap or a
    broken chunked delta (the plan is then behind the stream: reload it from a snapshot)."""

    applied: int = 0
    last: int = 0
    touched: set[str] = field(default_factory=set)
    stopped: bool = False


async def follow(js: JetStreamContext, source: bus.LogReader, plan: SharedPlan, after_stream_seq: int) -> Followed:
    """Apply to ``plan`` the shared deltas stored after ``after_stream_seq`` (see :func:`catch_up_to`) and
    say which Services they touched: a reader that keeps its plan (shadow mode) reads each delta once and
    re-resolves only those. Unusable messages are skipped (their consumers park them)."""
    out = Followed(last=after_stream_seq)
    chunks = delta_chunks.Assembler()
    async for msg in bus.read_stream(js, source, topology.PLAN_ALL_SUBJECT, start_seq=after_stream_seq + 1):
        seq = msg.metadata.sequence.stream
        try:
            record = _whole_delta(chunks, events.decode(msg.data or b""), plan.seq)
        except events.ContractError:
            record = None  # its consumers park it
        except delta_chunks.ChunkGap as exc:
            log.warning("reading the published plan: %s", exc)
            out.stopped = True
            break
        if record is None:
            if not chunks.pending(SHARED):
                out.last = seq
            continue
        try:
            if plan.apply(record):
                out.applied += 1
                out.touched.update(op.service.key if isinstance(op, events.SetService) else op.key
                                   for op in record.ops if isinstance(op, events.SetService | events.RemoveService))
        except SequenceGap as exc:
            log.warning("reading the published plan: %s", exc)
            out.stopped = True
            break
        out.last = seq
    return out


def _whole_delta(chunks: delta_chunks.Assembler, envelope: events.Envelope, have: int) -> events.PlanDelta | None:
    """The delta a message completes: itself, or the chunked delta whose last part it is; None otherwise."""
    record = envelope.record
    if isinstance(record, events.PlanDeltaChunk):
        whole = chunks.feed(envelope, have)
        return None if whole is None else whole.record  # type: ignore[return-value]
    if not isinstance(record, events.PlanDelta):
        return None
    chunks.settled(record.scope, record.seq)
    return record


async def complete_deltas(msgs: AsyncIterator[Msg]) -> AsyncIterator[tuple[int, events.PlanDelta]]:
    """(stream sequence of its last message, delta) for every whole delta among ``msgs`` (one subject, in
    stream order), chunked ones put back together; unusable messages and broken chunked deltas skipped."""
    chunks = delta_chunks.Assembler()
    async for msg in msgs:
        try:
            record = _whole_delta(chunks, events.decode(msg.data or b""), 0)
        except (events.ContractError, delta_chunks.ChunkGap):
            continue
        if record is not None:
            yield msg.metadata.sequence.stream, record


async def published_plan(js: JetStreamContext, source: bus.LogReader) -> SharedPlan:
    """The shared plan as published: snapshot + the deltas after it, read with ``source``."""
    plan, stream_seq = await load_snapshot(js, source)
    await catch_up(js, source, plan, stream_seq)
    return plan
