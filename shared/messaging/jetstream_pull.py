"""JetStream pull requests bounded by bytes: the one way kipvs pulls messages from a consumer (history
reads, :mod:`.stream_reader`; durable consumers, ``bus.DurableConsumer``).

nats-py 2.16's ``fetch`` asks for a count of messages only, so the request is sent here, on the JetStream
API subject nats-py uses (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``), with ``max_bytes`` as well:
the server ends a request before the next message would pass it (status 409 "Message Size Exceeds
MaxBytes"; that message is kept for the next request), so what is in flight to this client stays far
below nats-server's ``max_pending`` (64 MiB by default). Past it the server drops the client as a slow
consumer: a 500-message fetch of ~200 KB records did (issue 21).

One request per pull, also when it waits: ``no_wait`` with ``expires`` waits up to ``expires`` for a first
message, then ends as soon as no more are available (status 404), or at ``expires`` (408) when none came
(nats-server 2.15.1, seen here). nats-py's ``fetch`` sends two for a wait that ends empty (a ``no_wait``
probe, then a lingering pull): thousands of idle appliers wait.

Each pull has its own reply subject under the subscription's: the server's closing status of an earlier
pull that the client stopped waiting for (a timeout) comes on that pull's subject and is dropped, not taken
for the end of this one. Messages carry their stream subject, not the reply's: one of an earlier pull that
comes late is handed out with this pull's, as nats-py's ``fetch`` does (a valid delivery of the consumer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import APIError

PULL_MAX_BYTES = 4 * 1024 * 1024  # bytes one pull asks for (plus one max payload): 1/16 of max_pending

_STATUS = "Status"
_DESCRIPTION = "Description"
_HEARTBEAT = "100"
_OVER = ("404", "408", "409")  # no messages (no_wait), request expired, a conflict: this pull is over
MAX_BYTES_REACHED = "Message Size Exceeds MaxBytes"


@dataclass
class Pull:
    """What one pull request brought: its messages (data messages only, in delivery order) and why it
    ended: ``status`` and ``description`` of the server's closing status ("" when the batch was filled or
    nothing more came), ``timed_out`` when no message came for the wait given (a lost connection, a
    slow-consumer drop, or no server)."""

    msgs: list[Msg] = field(default_factory=list)
    status: str = ""
    description: str = ""
    timed_out: bool = False

    @property
    def at_byte_bound(self) -> bool:
        """The server ended it at ``max_bytes``: more messages may be waiting."""
        return self.status == "409" and self.description == MAX_BYTES_REACHED


class Puller:
    """Pull requests to one consumer, their replies on one subscription (one per reader; pulls are
    sequential). Open with :meth:`open`, end with :meth:`close`."""

    def __init__(self, nc: nats.NATS, sub: Subscription, inbox: str, request: str) -> None:
        self.nc, self._sub, self._inbox, self._request = nc, sub, inbox, request
        self._pulls = 0

    @classmethod
    async def open(cls, js: JetStreamContext, stream: str, consumer: str) -> Puller:
        nc = js._nc  # nats-py keeps the context's connection and API prefix private; the requests go on them
        inbox = nc.new_inbox()
        sub = await nc.subscribe(f"{inbox}.*")
        return cls(nc, sub, inbox, f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}")

    async def close(self) -> None:
        await self._sub.unsubscribe()

    @property
    def max_bytes(self) -> int:
        """The byte bound of a pull: PULL_MAX_BYTES plus one max payload, so a message as large as the
        server allows always fits."""
        return PULL_MAX_BYTES + self.nc.max_payload

    async def pull(self, batch: int, wait: float, next_wait: float, expires: float = 0.0,
                   max_bytes: int | None = None) -> Pull:
        """One pull request: at most ``batch`` messages and ``max_bytes`` bytes (default :attr:`max_bytes`;
        0: no byte bound) of what the consumer holds, waiting at the server up to ``expires`` seconds for
        a first one (0: not at all), here up to ``wait`` seconds for the first reply and ``next_wait`` for
        each later one. Raises what nats-py raises for an error status (``APIError.from_msg``:
        ServiceUnavailableError for 503, no responders: the consumer is gone) other than 404/408/409."""
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        ask: dict[str, int | bool] = {"batch": batch, "no_wait": True}
        if max_bytes:
            ask["max_bytes"] = max_bytes
        if expires > 0:
            ask["expires"] = int(expires * 1e9)
        self._pulls += 1
        reply = f"{self._inbox}.{self._pulls}"
        await self.nc.publish(self._request, json.dumps(ask).encode(), reply=reply)
        got = Pull()
        while len(got.msgs) < batch:
            try:
                msg = await self._sub.next_msg(timeout=next_wait if got.msgs else wait)
            except (nats.errors.TimeoutError, TimeoutError):
                got.timed_out = True
                break
            status = (msg.headers or {}).get(_STATUS)
            if not status:
                got.msgs.append(msg)
            elif msg.subject != reply:
                continue  # the end of an earlier pull the client stopped waiting for
            elif status in _OVER:
                got.status, got.description = status, (msg.headers or {}).get(_DESCRIPTION, "")
                break
            elif status != _HEARTBEAT:
                APIError.from_msg(msg)
        return got
