"""The watcher's side of the Kubernetes event log: read back what is logged, append exactly once.

Exactly once, even with two watchers at once or a watcher restarted after the duplicate window:

* every event has a deterministic id, sent as ``Nats-Msg-Id`` (repeats within the window are dropped);
* every append is conditional on the object's subject: ``Nats-Expected-Last-Subject-Sequence`` is the
  sequence of the last record this watcher knows for the object. If another writer got there first the
  server refuses; the watcher reads the subject's last record and appends only if its own event is still
  newer. So the log of each object is a strictly ordered history with no repeats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from shared.contract import events, topology
from shared.messaging import bus

from .objects import LoggedObject, Planned, TooLarge, resync_id, resync_range_id, rv_newer, split_resync, wire_line

log = logging.getLogger("kipvs.watcher")

# Room left in a message for its headers (Nats-Msg-Id up to a few hundred bytes, the expected sequence):
# the server's max_payload bounds headers and payload together.
HEADER_ALLOWANCE = 1024


def producer_name() -> str:
    return f"watcher/{socket.gethostname()}"


async def read_logged(js: JetStreamContext, kind: str) -> dict[str, LoggedObject]:
    """The last record of every object of ``kind`` in the log, via an ephemeral last-per-subject consumer."""
    logged: dict[str, LoggedObject] = {}
    async for msg in bus.read_stream(js, bus.LogReader(topology.KUBE_STREAM), topology.kube_kind_filter(kind),
                                     DeliverPolicy.LAST_PER_SUBJECT):
        try:
            record = events.decode(msg.data).record
        except events.ContractError as exc:
            log.warning("unreadable record at %s seq %d skipped while reading state: %s",
                        msg.subject, msg.metadata.sequence.stream, exc.reason)
            continue
        if isinstance(record, events.KubeEvent):
            logged[events.object_key(record.namespace, record.name)] = LoggedObject(
                alive=record.action != "DELETED", resource_version=record.resource_version,
                subject_seq=msg.metadata.sequence.stream, object=record.object)
    return logged


class EventLog:
    """Appends a kind's events to the log, keeping ``logged`` (the log's view of each object) current."""

    def __init__(self, js: JetStreamContext, kind: str, logged: dict[str, LoggedObject],
                 record_file: IO[str] | None = None, on_published: Any = None,
                 max_payload: Callable[[], int] = lambda: 1024 * 1024) -> None:
        self.js = js
        self.max_payload = max_payload  # the connected server's max_payload (nc.max_payload), in bytes
        self.kind = kind
        self.logged = logged
        self.record_file = record_file
        self.producer = producer_name()
        self.on_published = on_published  # callback(action, seconds) for metrics
        # per object, the log position last written to the record file (starts at what the log held)
        self.recorded: dict[str, int] = {key: entry.subject_seq for key, entry in logged.items()}

    async def append(self, event: Planned) -> bool:
        """Append one event unless the log already has it or something newer. True if appended.
        TooLarge (nothing sent) when its record cannot fit in one message of the connected server."""
        key = event.ident.key
        envelope = events.Envelope(id=event.id, time_ns=time.time_ns(), producer=self.producer, record=event.record)
        size, limit = len(events.encode(envelope)), self.max_payload() - HEADER_ALLOWANCE
        if size > limit:
            raise TooLarge(f"{self.kind} {key} at resourceVersion {event.ident.resource_version} is {size} bytes "
                           f"as a record, more than the {limit} a NATS message takes here (max_payload less "
                           f"{HEADER_ALLOWANCE} for headers); not logged, the log keeps its previous state")
        for _ in range(10):
            known = self.logged.get(key)
            expected = known.subject_seq if known else 0
            started = time.perf_counter()
            try:
                ack = await bus.publish(self.js, event.ident.subject, envelope, expected_last_subject_seq=expected)
            except APIError as exc:
                if not bus.is_wrong_last_sequence(exc):
                    raise
                if not await self._refresh(event):
                    return False
                continue
            if ack.duplicate and ack.seq < expected:
                # The id names a record older than the subject's last one: the API server handed this version
                # out again after a restore (a different change under a reused resourceVersion). Ours goes in
                # under an id that also names where it goes, as deterministic for two watchers as the first.
                envelope = msgspec.structs.replace(envelope, id=f"{event.id}/after@{expected}")
                continue
            self._remember(event, ack.seq)
            # A duplicate is a change the log already holds: logged by another watcher, or by our own earlier
            # attempt whose acknowledgement was lost (a NATS restart). The record file must still show it.
            self._record(key, event.record, ack.seq)
            if ack.duplicate:
                return False
            if self.on_published:
                self.on_published(event.record.action, time.perf_counter() - started)
            return True
        raise RuntimeError(f"could not append {event.id}: the subject kept changing under us")

    async def _refresh(self, event: Planned) -> bool:
        """Another writer appended to this object's subject. Re-read its last record; is ours still news?"""
        try:
            raw = await self.js.get_last_msg(topology.KUBE_STREAM, event.ident.subject)
        except NotFoundError:
            self.logged.pop(event.ident.key, None)
            return True
        try:
            record = events.decode(raw.data or b"").record
        except events.ContractError as exc:
            record = None
            log.warning("unusable record at %s seq %d (%s): appending over it", event.ident.subject, raw.seq,
                        exc.reason)
        if not isinstance(record, events.KubeEvent):
            # garbage (or another record type) last on the subject: never a crash loop; ours goes after it
            self.logged[event.ident.key] = LoggedObject(False, "", raw.seq, {})
            return True
        self.logged[event.ident.key] = LoggedObject(record.action != "DELETED", record.resource_version,
                                                    raw.seq, record.object)
        ours = event.record
        if ours.action == "DELETED" and record.action == "DELETED":
            self._record(event.ident.key, record, raw.seq)
            return False  # gone already: a deletion after a deletion is never news
        if record.resource_version == ours.resource_version and (record.action == "DELETED") == (
                ours.action == "DELETED") and (not event.resync_seq or record.object == ours.object):
            self._record(event.ident.key, record, raw.seq)
            return False  # the same change, logged by the other writer (or by our attempt whose ack was lost)
        if event.resync_seq:
            # re-sync after a restore: versions order nothing; what was logged before our list is replaced,
            # what was logged after it came from a watch of the restored server and is at least as new
            return raw.seq <= event.resync_seq
        return rv_newer(ours.resource_version, record.resource_version)

    def _record(self, key: str, record: events.KubeEvent, seq: int) -> None:
        """Write the record to ``--record`` once per log position: the file follows the log, including
        what reached the log through another writer or a retried append."""
        if self.record_file is None or self.recorded.get(key, 0) >= seq:
            return
        self.recorded[key] = seq
        self.record_file.write(json.dumps(wire_line(record), separators=(",", ":")) + "\n")
        self.record_file.flush()

    def _remember(self, event: Planned, seq: int) -> None:
        r = event.record
        self.logged[event.ident.key] = LoggedObject(r.action != "DELETED", r.resource_version, seq, r.object)

    async def append_many(self, planned: list[Planned],
                          concurrency: int = 128) -> tuple[int, list[tuple[Planned, str]]]:
        """Append events about distinct objects, pipelined (each object appears at most once). Returns how
        many were appended and the events refused as too large, with the reason (the rest go on)."""
        semaphore = asyncio.Semaphore(concurrency)
        refused: list[tuple[Planned, str]] = []

        async def one(event: Planned) -> bool:
            async with semaphore:
                try:
                    return await self.append(event)
                except TooLarge as exc:
                    refused.append((event, str(exc)))
                    return False

        results = await asyncio.gather(*(one(e) for e in planned))
        return sum(results), refused

    async def append_resync(self, resync: events.KubeResync) -> int:
        """Append the resync record, or, when it cannot fit in one message (about 25,000 live objects of a
        kind per MiB of max_payload), its live set in KubeResyncRange parts. Returns how many records."""
        envelope = events.Envelope(id=resync_id(resync), time_ns=time.time_ns(), producer=self.producer,
                                   record=resync)
        limit = self.max_payload() - HEADER_ALLOWANCE
        if len(events.encode(envelope)) <= limit:
            await bus.publish(self.js, topology.kube_resync_subject(self.kind), envelope)
            return 1
        parts = split_resync(resync, limit)
        for part in parts:
            envelope = events.Envelope(id=resync_range_id(part), time_ns=time.time_ns(), producer=self.producer,
                                       record=part)
            await bus.publish(self.js, topology.kube_resync_subject(self.kind), envelope)
        log.info("%s: the live set of %d objects is logged in %d parts (one record would be over %d bytes)",
                 self.kind, len(resync.live), len(parts), limit)
        return len(parts)

    async def last_seq(self) -> int:
        """The KUBE stream's last sequence now (0 when empty)."""
        info = await self.js.stream_info(topology.KUBE_STREAM)
        return info.state.last_seq or 0


def open_record_file(path: str) -> IO[str] | None:
    if not path:
        return None
    return Path(path).open("a", encoding="utf-8")
