"""Plan deltas larger than one NATS message: cut into :class:`~shared.contract.events.PlanDeltaChunk` parts by
the planner, put back together by every reader (the applier, the snapshot catch-up, the audit tools). Pure.

Why the delta's bytes are cut, not its operations: one ``set-service`` can itself pass the server's
``max_payload`` (a Service with 100 ports and a 1,000-endpoint slice is a 3.6 MB delta of one operation),
so no split by operation or by port bounds a message. The bytes cut are exactly the envelope a small delta
would be on the bus, so the reassembled delta is the same envelope (id, causation, time) whatever its size:
replay, the golden recording and the tools see one delta either way.

A delta is applied whole or not at all: the reader holds the parts until the last one and checks the
SHA-256 of the whole before decoding it. A part missing, out of order or garbled is a :class:`ChunkGap`
(a :class:`~shared.plan.plan_state.SequenceGap`): the reader re-bootstraps from a snapshot, as for a
missing delta.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from shared.plan.plan_state import SequenceGap

from . import events

# Room left in every message for the headers the planner sends with it (Nats-Msg-Id, the atomic batch's
# id, sequence and commit, the fence's expected subject and sequence, Kipvs-Planner: well under 1 KiB):
# nats-server counts headers and payload together against max_payload; nats-py checks the payload only.
HEADER_HEADROOM = 4096
# The envelope around a part's bytes, measured with the largest part numbers and delta id this allows.
_PART_LIMIT = 999_999


class ChunkGap(SequenceGap):
    """A part of a chunked delta is missing, out of order or garbled: re-bootstrap from a snapshot."""


def part_id(delta_id: str, part: int, parts: int) -> str:
    """The envelope id (and Nats-Msg-Id) of one part: ``plan/all/7/part/2-of-4``."""
    return f"{delta_id}/part/{part}-of-{parts}"


def split(envelope: events.Envelope, limit: int) -> list[events.Envelope]:
    """The messages that carry ``envelope`` (a plan delta) when no message may pass ``limit`` bytes (the
    server's max_payload less :data:`HEADER_HEADROOM`): ``[envelope]`` itself when it fits, else its parts
    in order. ValueError when ``limit`` leaves no room for a part's bytes."""
    data = events.encode(envelope)
    if len(data) <= limit:
        return [envelope]
    record = envelope.record
    assert isinstance(record, events.PlanDelta)
    digest = hashlib.sha256(data).hexdigest()
    widest = _part(envelope, record, _PART_LIMIT, _PART_LIMIT, digest, b"")
    room = limit - len(events.encode(widest)) - 5  # msgpack's bin32 header
    if room <= 0:
        raise ValueError(f"a message limit of {limit} bytes leaves no room for a part of delta {envelope.id}")
    count = -(-len(data) // room)
    if count > _PART_LIMIT:
        raise ValueError(f"delta {envelope.id} ({len(data)} bytes) needs {count} parts of {room} bytes")
    return [_part(envelope, record, i + 1, count, digest, data[i * room:(i + 1) * room]) for i in range(count)]


def _part(envelope: events.Envelope, record: events.PlanDelta, part: int, parts: int, digest: str,
          data: bytes) -> events.Envelope:
    return events.Envelope(id=part_id(envelope.id, part, parts), time_ns=envelope.time_ns,
                           producer=envelope.producer, causation=envelope.causation,
                           record=events.PlanDeltaChunk(scope=record.scope, seq=record.seq, part=part, parts=parts,
                                                        digest=digest, data=data))


@dataclass
class _Partial:
    seq: int
    parts: int
    digest: str
    data: list[bytes] = field(default_factory=list)
    broken: bool = False  # a gap was reported for it: its later parts are dropped quietly

    def same(self, chunk: events.PlanDeltaChunk) -> bool:
        return (self.seq, self.parts, self.digest) == (chunk.seq, chunk.parts, chunk.digest)


class Assembler:
    """Puts chunked deltas back together, one in progress per scope (a node's consumer sees the shared
    subject and its own interleaved). Feed every :class:`~shared.contract.events.PlanDeltaChunk` envelope in
    stream order."""

    def __init__(self) -> None:
        self._open: dict[str, _Partial] = {}

    def pending(self, scope: str) -> int:
        """Parts held for ``scope``'s delta in progress (0: none)."""
        partial = self._open.get(scope)
        return 0 if partial is None or partial.broken else len(partial.data)

    def feed(self, envelope: events.Envelope, have: int = 0) -> events.Envelope | None:
        """The whole delta's envelope when ``envelope`` is its last part; None while parts are missing (or
        for a part of a delta at or below ``have``, the seq the reader already holds: a redelivery).

        Part 1 always starts the delta afresh (a planner that published again after a crash, or with
        another max_payload, starts there). Raises :class:`ChunkGap` once per broken delta: a part that
        is not the next one of the delta in progress, or a whole whose digest or record does not match."""
        chunk = envelope.record
        assert isinstance(chunk, events.PlanDeltaChunk)
        where = f"plan {chunk.scope}: delta {chunk.seq} part {chunk.part} of {chunk.parts}"
        if chunk.seq <= have:
            self.settled(chunk.scope, chunk.seq)
            return None
        partial = self._open.get(chunk.scope)
        if not 1 <= chunk.part <= chunk.parts:
            return self._gap(chunk, f"{where}: not a part number")
        if chunk.part == 1:
            partial = self._open[chunk.scope] = _Partial(chunk.seq, chunk.parts, chunk.digest)
        elif partial is None or not partial.same(chunk):
            return self._gap(chunk, f"{where} without its earlier parts")
        if partial.broken:
            return None
        if chunk.part <= len(partial.data):
            return None  # a redelivered part
        if chunk.part != len(partial.data) + 1:
            return self._gap(chunk, f"{where}: part {len(partial.data) + 1} is missing")
        partial.data.append(chunk.data)
        if chunk.part < chunk.parts:
            return None
        del self._open[chunk.scope]
        return _whole(chunk, b"".join(partial.data), where)

    def settled(self, scope: str, seq: int) -> None:
        """The reader holds delta ``seq`` of ``scope`` (a whole one came, e.g. published again in one message
        after max_payload was raised): parts held of it or an older one are dropped."""
        partial = self._open.get(scope)
        if partial is not None and partial.seq <= seq:
            del self._open[scope]

    def _gap(self, chunk: events.PlanDeltaChunk, reason: str) -> None:
        partial = self._open.get(chunk.scope)
        if partial is not None and partial.same(chunk) and partial.broken:
            return None  # reported already
        self._open[chunk.scope] = _Partial(chunk.seq, chunk.parts, chunk.digest, broken=True)
        raise ChunkGap(reason)


def _whole(chunk: events.PlanDeltaChunk, data: bytes, where: str) -> events.Envelope:
    if hashlib.sha256(data).hexdigest() != chunk.digest:
        raise ChunkGap(f"{where}: the parts' SHA-256 is not the delta's: a part is garbled")
    try:
        envelope = events.decode(data)
    except events.ContractError as exc:
        raise ChunkGap(f"{where}: the parts do not make a delta: {exc.reason}") from None
    record = envelope.record
    if not isinstance(record, events.PlanDelta) or (record.scope, record.seq) != (chunk.scope, chunk.seq):
        raise ChunkGap(f"{where}: the parts make a {type(record).__name__}, not delta {chunk.seq} of {chunk.scope}")
    return envelope
