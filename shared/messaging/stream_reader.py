"""Reading a stream's history completely: the one mechanism behind ``bus.read_stream`` (the planner's
rebuild, the applier's catch-up, the watcher's logged state, every audit tool).

Bounded by bytes: each pull request carries JetStream's ``max_bytes`` as well as a count (see
:mod:`.jetstream_pull`), so what is in flight to this client stays far below nats-server's ``max_pending``.
Past it the server drops the client as a slow consumer: with 1,000-message fetches of ~200 KB records it
did, the fetch came back short, and the short read was taken for the end of the stream (issue 21).

A read has a known end, set when its consumer is created: ``upto`` (a stream sequence), else the consumer's
``num_pending`` then (every matching message from the start position), or earlier a message whose own
``num_pending`` is 0. A pull that times out, a lost connection, a consumer gone (a server restart) or a gap
in the consumer's delivery sequence (messages the server sent that never arrived: an unacknowledged consumer
never sends them again) starts the read again after the last message read, with a new consumer. After
:data:`READ_ATTEMPTS` attempts in a row without progress the read raises :class:`IncompleteRead`: a read
that ends early is an error, never the end of the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError

from .jetstream_pull import PULL_MAX_BYTES, Puller

READ_MAX_BYTES = PULL_MAX_BYTES  # bytes one pull asks for (plus one max payload): 1/16 of max_pending
READ_BATCH = 1000  # messages one pull asks for, at most
READ_WAIT = 10.0  # seconds a pull waits for its next message before the read counts as interrupted
READ_ATTEMPTS = 4  # attempts in a row without progress before IncompleteRead
RETRY_DELAY = 0.5  # seconds before the second attempt, doubled for each later one


class IncompleteRead(nats.errors.Error):
    """A history read could not reach the end it set out to read (a lost connection, a slow-consumer drop,
    a consumer gone, a gap in delivery), also after retrying from the last message read. A bus failure
    (``bus.INFRASTRUCTURE_ERRORS`` holds nats-py's errors): services start again, tools say it in a line."""

    def __init__(self, stream: str, subject: str, last_seq: int, read: int, reason: str) -> None:
        super().__init__()
        self.stream, self.subject, self.last_seq, self.read, self.reason = stream, subject, last_seq, read, reason

    def __str__(self) -> str:
        where = f"after stream seq {self.last_seq}" if self.last_seq else "before its first message"
        return (f"reading {self.stream} ({self.subject}) stopped {where} ({self.read} messages), before the "
                f"end it set out to read: {self.reason}")


class _Interrupted(Exception):
    """This attempt cannot go on (the reason is the message); the read starts again after its last message."""


class _ByCount(_Interrupted):
    """A last-per-subject read met its byte bound: it starts again at once, bounded by count (see _bounds)."""


@dataclass
class _Position:
    last_seq: int = 0  # stream sequence of the last message handed to the caller
    read: int = 0  # messages handed to the caller
    started: bool = False  # the first consumer was made: from now on a failure interrupts a read
    count_bound: bool = False  # a last-per-subject read met nats-server's drop at a byte bound (see _bounds)


async def read(js: JetStreamContext, stream: str, subject: str, config: ConsumerConfig, name: str | None,
               upto: int) -> AsyncIterator[Msg]:
    """Every message of ``stream`` matching ``subject`` from ``config``'s start position to the read's end
    (see the module), in stream order, each once. ``name``: the consumer's fixed name (deleted before and
    after each attempt; the caller serialises reads of one name), else a random one left to expire.
    Raises IncompleteRead; what creating the first consumer raises as it is (NotFoundError: no such
    stream; a timeout: no server, or a refused request), since no read began."""
    pos = _Position()
    failures = 0
    progress_at_failure = -1
    while True:
        try:
            async for msg in _attempt(js, stream, subject, _restart(config, pos), name, upto, pos):
                yield msg
            return
        except (_Interrupted, nats.errors.Error, TimeoutError, ConnectionError) as exc:
            if not pos.started or isinstance(exc, BadRequestError):
                raise  # no read began (no such stream, refused, no server): the caller's answer, as it is
            if isinstance(exc, _ByCount):
                continue
            reason = str(exc) if isinstance(exc, _Interrupted) else f"{type(exc).__name__}: {exc}"
        failures = 1 if pos.read != progress_at_failure else failures + 1
        progress_at_failure = pos.read
        if failures >= READ_ATTEMPTS or js._nc.is_closed:
            raise IncompleteRead(stream, subject, pos.last_seq, pos.read, f"{reason} ({failures} attempts)")
        await asyncio.sleep(RETRY_DELAY * 2 ** (failures - 1))


def _restart(config: ConsumerConfig, pos: _Position) -> ConsumerConfig:
    """The consumer for the next attempt: from the message after the last one read. A last-per-subject read
    starts again from its beginning (there is no 'last per subject after N'); what was read is skipped."""
    if not pos.last_seq or config.deliver_policy == DeliverPolicy.LAST_PER_SUBJECT:
        return config.evolve()
    return config.evolve(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=pos.last_seq + 1,
                         opt_start_time=None)


async def _attempt(js: JetStreamContext, stream: str, subject: str, config: ConsumerConfig, name: str | None,
                   upto: int, pos: _Position) -> AsyncIterator[Msg]:
    """One consumer's part of the read; returns at the read's end, raises _Interrupted before it."""
    if name:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, name)
    config.name = name or f"kipvs-read-{secrets.token_hex(8)}"
    if subject != ">":
        config.filter_subject = subject
    remaining = (await js.add_consumer(stream, config)).num_pending
    pos.started = True
    if not remaining:
        return
    puller = await Puller.open(js, stream, config.name)
    batch, max_bytes = _bounds(config, puller.nc.max_payload, pos.count_bound)
    last_per_subject = config.deliver_policy == DeliverPolicy.LAST_PER_SUBJECT
    delivered = 0  # the consumer's delivery sequence: consecutive, or messages were lost on the way
    try:
        while True:
            msgs, at_byte_bound = await _pull(puller, min(remaining, batch), max_bytes)
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.consumer != delivered + 1:
                    raise _Interrupted(f"messages lost on the way (the consumer delivered #{meta.sequence.consumer} "
                                       f"after #{delivered}: a slow-consumer drop or a reconnect)")
                delivered, remaining, seq = meta.sequence.consumer, remaining - 1, meta.sequence.stream
                if upto and seq > upto:
                    return
                if seq > pos.last_seq:  # a restarted last-per-subject read skips what it handed out
                    pos.last_seq, pos.read = seq, pos.read + 1
                    yield msg
                if (upto and seq >= upto) or meta.num_pending == 0 or remaining <= 0:
                    return
            if at_byte_bound and last_per_subject:
                pos.count_bound = True
                raise _ByCount()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await puller.close()
        if name:
            with contextlib.suppress(nats.errors.Error, TimeoutError, NotFoundError):
                await js.delete_consumer(stream, name)


def _bounds(config: ConsumerConfig, max_payload: int, count_bound: bool) -> tuple[int, int]:
    """(messages, bytes: 0 for none) one pull asks for. With a byte bound, a message as large as the server
    allows always fits. nats-server 2.15.1 drops from a last-per-subject read the message that ends a pull at
    its byte bound (seen here: the 409 came, that message never did), so such a read that meets the bound
    starts again (skipping what it handed out) with ``count_bound``: no byte bound, and few enough messages
    (READ_MAX_BYTES / max payload, at least one) that the largest stay as far below max_pending. Reads of
    small objects (the usual case: 1,000 under the byte bound) keep 1,000-message pulls."""
    if count_bound and config.deliver_policy == DeliverPolicy.LAST_PER_SUBJECT:
        return max(1, min(READ_BATCH, READ_MAX_BYTES // max_payload)), 0
    return READ_BATCH, READ_MAX_BYTES + max_payload


async def _pull(puller: Puller, batch: int, max_bytes: int) -> tuple[list[Msg], bool]:
    """One pull request (at most ``batch`` messages and ``max_bytes`` bytes, of what the consumer holds now):
    its messages, at least one, and whether the byte bound ended it; _Interrupted when none comes or the
    server ends it with an error."""
    try:
        got = await puller.pull(batch, wait=READ_WAIT, next_wait=READ_WAIT, max_bytes=max_bytes)
    except APIError as exc:
        raise _Interrupted(f"the server ended a pull: {exc}") from None
    if got.timed_out:
        raise _Interrupted(f"no message for {READ_WAIT:.0f}s after {len(got.msgs)} of a pull")
    if got.status == "409" and not (got.at_byte_bound and got.msgs):
        raise _Interrupted(f"the server ended a pull: {got.status} {got.description}")
    if not got.msgs:
        raise _Interrupted("a pull returned nothing while the consumer had messages to deliver")
    return got.msgs, got.at_byte_bound
