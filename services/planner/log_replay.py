"""The one replay: records of the Kubernetes event log, in log order, through the planner's core.

Rules of this room:
- Every replay of the log runs here: the planner service's rebuild and catch-up (:func:`replay_log`), a
  standby's warm state, ``kipvs plan`` (a watch-format file or the live log), ``kipvs replay`` and the
  demo's view. None of them calls ``Planner.handle`` itself, so none can differ in how it treats a record.
- A record that is not a kipvs envelope (``None``: the planner parked it when it first consumed it) only
  moves the core's position on: the service skipped it, so every replay skips it.
- The fold is pure (:func:`feed`, :func:`replay`); only :func:`replay_log` reads the bus, and a read that
  ends before the position it set out to reach is an error (``bus.IncompleteRead``), never a shorter state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus

from .core import Planner, PlannerConfig

KINDS = set(events.KUBE_KINDS)
KUBE_SUBJECTS = "kipvs.kube.>"
Record = tuple[int, events.Envelope | None]  # (KIPVS_KUBE sequence, the record; None: parked when consumed)


def feed(planner: Planner, seq: int, envelope: events.Envelope | None) -> list[events.Envelope]:
    """One logged record through the core: the deltas it causes (none for a parked record, ``None``)."""
    if envelope is None:
        planner.source_seq = seq  # parked when it was first consumed
        return []
    return planner.handle(envelope, seq)


def replay(planner: Planner, records: Iterable[Record]) -> Iterator[tuple[int, list[events.Envelope]]]:
    """(seq, deltas it caused) for each record, in order, fed through ``planner`` as they are drawn."""
    for seq, envelope in records:
        yield seq, feed(planner, seq, envelope)


def plan_events(envelopes: Iterable[events.Envelope], config: PlannerConfig) -> Planner:
    """A new core fed ``envelopes`` as log records 1, 2, ... (a watch-format file has no sequences)."""
    planner = Planner(config)
    for _ in replay(planner, enumerate(envelopes, 1)):
        pass
    return planner


async def replay_log(js: JetStreamContext, planner: Planner, upto: int | None,
                     deltas: Callable[[list[events.Envelope]], None] | None = None) -> int:
    """Feed KIPVS_KUBE's records after the planner's position up to ``upto`` (a stream sequence) through the
    core (None: to the end the log had when the read began), read with an ephemeral consumer of a random name
    (the planner's and the demo's identities may make any); hand the
    deltas to ``deltas`` (None: discard them, they were published before). Returns the records replayed.
    Raises ``bus.IncompleteRead`` when a record up to ``upto`` was not read; NotFoundError: no such stream."""
    if upto is not None and upto <= planner.source_seq:
        return 0
    count = 0
    async for msg in bus.read_stream(js, bus.LogReader(topology.KUBE_STREAM), KUBE_SUBJECTS,
                                     start_seq=planner.source_seq + 1, upto=upto or 0):
        try:
            envelope: events.Envelope | None = events.decode(msg.data)
        except events.ContractError:
            envelope = None
        produced = feed(planner, msg.metadata.sequence.stream, envelope)
        if deltas is not None and envelope is not None:
            deltas(produced)
        count += envelope is not None
    if upto is not None:
        await check_read_to(js, planner.source_seq, upto, count)
    return count


async def check_read_to(js: JetStreamContext, read_to: int, upto: int, count: int) -> None:
    """The core's state is a fold of every record up to ``upto``: check, independently of the reader, that
    none after the last one read (``read_to``) and up to ``upto`` is in the log; IncompleteRead when one is
    (its state would be a prefix's, and a correction published from it would remove what the rest holds)."""
    if read_to >= upto:
        return
    try:
        missed = await js.get_msg(topology.KUBE_STREAM, seq=read_to + 1, subject=KUBE_SUBJECTS, next=True)
    except NotFoundError:
        return  # nothing after it: the records up to upto were deleted from the log (reconcile_published)
    if missed.seq is not None and missed.seq <= upto:
        raise bus.IncompleteRead(topology.KUBE_STREAM, KUBE_SUBJECTS, read_to, count,
                                 f"log record {missed.seq} was not read (the rebuild was to reach {upto})")


class ReplayError(Exception):
    pass


def read_events(lines: Iterable[str | bytes], source: str = "-",
                report: Callable[[str], None] | None = None) -> Iterator[events.Envelope]:
    """Watch-format lines (text, or bytes decoded here as UTF-8) as envelopes. Unreadable lines raise
    ReplayError naming the line. Skipped: objects of kinds kipvs does not watch (they cannot matter to the
    plan), BOOKMARK events (a position in the watch, no object), and ERROR events (a 410 Expired or another
    Status the API server sent instead of an object), each of the latter reported through ``report``."""
    for number, raw in enumerate(lines, 1):
        where = f"{source}:{number}"
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        else:
            line = raw
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{where}: not JSON: {exc}") from None
        kind_of_event = doc.get("type") if isinstance(doc, dict) else None
        if kind_of_event == "BOOKMARK":
            continue
        if kind_of_event == "ERROR":
            status = doc.get("object") if isinstance(doc.get("object"), dict) else {}
            if report is not None:
                report(f"{where}: ERROR event skipped (code {status.get('code', '?')}, "
                       f"{status.get('reason') or 'no reason'}: {status.get('message') or 'no message'})")
            continue
        if not isinstance(doc, dict) or kind_of_event not in ("ADDED", "MODIFIED", "DELETED") \
                or not isinstance(doc.get("object"), dict):
            raise ReplayError(f'{where}: not a watch event ({{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|'
                              '"ERROR", "object": ...}})')
        obj = doc["object"]
        kind = obj.get("kind")
        if kind not in KINDS:
            continue
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name, namespace = meta.get("name"), meta.get("namespace") or ""
        if not isinstance(name, str) or not name:
            raise ReplayError(f"{where}: {kind} without metadata.name")
        record = events.KubeEvent(kind=kind, action=doc["type"], namespace=namespace, name=name,
                                  resource_version=str(meta.get("resourceVersion") or number), object=obj)
        yield events.Envelope(id=f"{source}#{number}", time_ns=number, producer="replay", record=record)
