"""The NATS adapter every service shares: connect, check the server, publish envelopes, park, consume.

Nothing here knows what a Service or an IPVS table is; the services hand it envelopes and handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from shared.contract import events, topology
from shared.messaging import stream_reader
from shared.security.nats_credentials import ClientAuth

from .backoff import Backoff
from .jetstream_pull import Pull, Puller
from .stream_reader import IncompleteRead as IncompleteRead  # raised by read_stream

log = logging.getLogger("kipvs.bus")


class _QuietTlsEof(logging.Filter):
    """asyncio warns at every TLS connection nats-py closes (its protocol answers EOF as for plain TCP);
    harmless, and on every line of a secured bus's logs otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsEof())


def servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` (the form the docs give for a cluster) as nats-py's server list."""
    return [part.strip() for part in url.split(",") if part.strip()]


class Stopped(Exception):
    """Told to stop before the first connection to NATS was made."""


def describe_refusal(cause: BaseException | None, auth: ClientAuth | None) -> str:
    """Why a connection failed, in words an operator can act on (TLS and credential failures named)."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        ca = auth.ca_file if auth and auth.ca_file else "none given, the system's: give --nats-ca-file"
        return f"the server's TLS certificate is not trusted ({cause.verify_message or cause.reason}; CA file: {ca})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause.reason or cause})"
    text = str(cause or "") or type(cause).__name__
    if "authorization" in text.lower() or "authentication" in text.lower():
        return f"the server refused our identity ({auth.describe() if auth else 'no identity'}): {text}"
    if "secure connection" in text.lower() or "tls" in text.lower():
        return f"{text} (the server wants TLS: give --nats-ca-file)"
    return text


def _refuses_files(exc: BaseException) -> bool:
    """A refusal that the files a connection was made with may cause (a rotated CA, an expired identity):
    reconnecting with the same ones cannot end it."""
    text = str(exc).lower()
    return isinstance(exc, ssl.SSLCertVerificationError) or "authorization violation" in text or \
        "authentication expired" in text


async def connect(url: str, name: str, stop: asyncio.Event | None = None, auth: ClientAuth | None = None,
                  on_error: Callable[[Exception], None] | None = None) -> NATS:
    """Connect, retrying with backoff until the server answers (each failure logged with its reason; a
    stop request ends the wait at once with :class:`Stopped`), then check that the server is new enough.
    ``auth`` gives the identity and the CA (see :class:`~shared.security.nats_credentials.ClientAuth`); a
    refused identity or an untrusted certificate is logged as such, with the reason, and retried like an
    unreachable server. ``on_error`` sees every asynchronous error of the connection (the server's
    permission refusals among them), for the whole of its life.

    After the first connection nats-py reconnects on its own, forever, with the same TLS context: a server
    certificate the context no longer trusts (the CA file rotated) would be refused on every attempt, so
    that refusal closes the client instead. A closed client is for good (nats-py also closes it when the
    server ends the identity: a user JWT expired, a callout refusing at reconnect); its owner (the service
    runtime) connects again with a fresh ``auth``, which reads the files again.

    Each attempt is bounded in time and ends at once on ``stop``: nats-py's ``connect()`` can wait forever
    (an unreachable server with unbounded attempts; a TLS handshake that failed while it may reconnect,
    e.g. a ``nats://`` URL to a server that wants TLS), silently and deaf to SIGTERM."""
    watch = _ConnectionEvents(url, name, auth, on_error)
    options = auth.connect_options() if auth is not None else {}
    backoff = Backoff(initial=0.2, maximum=10.0)
    attempt_bound = 3.0 * len(servers(url)) + 2.0  # connect_timeout per server, and the handshake
    while True:
        if stop is not None and stop.is_set():
            raise Stopped(f"stopped before NATS at {url} could be reached")
        nc = NATS()
        try:
            # nats-py 2.16 hangs in connect() after a failed TLS handshake when it may reconnect: with TLS,
            # one attempt per round (this loop does the retrying).
            await _bounded(nc.connect(
                servers(url), name=name, max_reconnect_attempts=1, reconnect_time_wait=0.5,
                allow_reconnect="tls" not in options, connect_timeout=3, disconnected_cb=watch.disconnected,
                reconnected_cb=watch.reconnected, error_cb=watch.error, **options,
            ), attempt_bound, stop)
            break
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):  # bounded: after a failed TLS handshake it can wait forever
                await asyncio.wait_for(nc.close(), 2)
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped before NATS at {url} could be reached") from None
            delay = backoff.next()
            cause = watch.last_error or exc
            log.warning("cannot reach NATS at %s (%s); retrying in %.1fs", url, describe_refusal(cause, auth), delay)
            await _pause(delay, stop)
    watch.client = nc
    nc.options["allow_reconnect"] = True  # from now on nats-py reconnects by itself, forever
    nc.options["max_reconnect_attempts"] = -1
    version = nc.connected_server_version
    topology.check_server_version((version.major, version.minor, version.patch))
    return nc


@dataclass
class _ConnectionEvents:
    """nats-py's callbacks for one connection made by :func:`connect`: losses and refusals logged with their
    reason, the last error kept for the retry's log line, a client whose files are refused at reconnect closed."""

    url: str
    name: str
    auth: ClientAuth | None
    on_error: Callable[[Exception], None] | None
    client: NATS | None = None  # once connected (the callbacks look at its state)
    last_error: BaseException | None = None

    async def disconnected(self) -> None:
        if self.client is not None and (self.client.is_closed or self.client.is_draining):
            return  # our own close or drain (a tool's end, a service's stop): nothing was lost
        log.warning("NATS connection lost; reconnecting", extra={"url": self.url})

    async def reconnected(self) -> None:
        log.info("NATS connection restored", extra={"url": self.url})

    async def error(self, exc: Exception) -> None:
        self.last_error = exc
        if self.on_error is not None:
            self.on_error(exc)
        client = self.client
        if "permissions violation" in str(exc).lower():
            # The request that caused it only times out: this line says why.
            log.warning("NATS refused %s (%s): %s", self.name, self.auth.describe() if self.auth else "no identity",
                        exc)
        elif client is not None and _refuses_files(exc) and not client.is_closed:
            log.warning("NATS refused %s at reconnect (%s); closing the connection to open a new one with the "
                        "identity and CA files read again", self.name, describe_refusal(exc, self.auth))
            closing = asyncio.get_running_loop().create_task(client.close())
            # closing a client whose socket the server reset raises in nats-py: retrieved, not an asyncio
            # "Task exception was never retrieved" traceback in the service's log
            closing.add_done_callback(lambda task: task.cancelled() or task.exception())
            if asyncio.current_task() is getattr(client, "_reconnection_task", None):
                # End nats-py's reconnect loop here: after this callback it sets the client RECONNECTING
                # again, over the CLOSED that close() set, and the client would look alive for good.
                raise asyncio.CancelledError
        else:
            log.debug("NATS client error: %s", exc)


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _bounded(attempt: Awaitable[None], seconds: float, stop: asyncio.Event | None) -> None:
    """Await one connection attempt for at most ``seconds``, or until ``stop`` is set: TimeoutError then."""
    task = asyncio.ensure_future(attempt)
    waits: set[asyncio.Future] = {task}
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopping is not None:
        waits.add(stopping)
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
    if task.done():
        task.result()
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise TimeoutError(f"no answer within {seconds:.0f}s")


async def setup(nc: NATS, replicas: int = 1, consumers: Sequence[topology.ConsumerSpec] = (),
                declare: bool = True, streams: Sequence[str] = ()) -> JetStreamContext:
    """Create or update every stream, then the given durable consumers; refuse a server that does not
    keep what was asked for. With ``declare`` false (a service with its own, least-privilege identity:
    only the admin identity declares), check instead that ``streams`` and ``consumers`` exist:
    :class:`~shared.contract.topology.NotDeclared` when one does not."""
    js = nc.jetstream(timeout=10)
    if not declare:
        await topology.check_declared(js, streams, consumers)
        return js
    await topology.ensure_streams(js, replicas)
    for spec in consumers:
        await topology.ensure_consumer(js, spec)
    return js


def msg_id_header(envelope: events.Envelope) -> dict[str, str]:
    return {"Nats-Msg-Id": envelope.id}


async def publish(
    js: JetStreamContext, subject: str, envelope: events.Envelope, expected_last_subject_seq: int | None = None
) -> Any:
    """Publish one envelope with its id as Nats-Msg-Id, so a repeat within the duplicate window is dropped
    by the server. ``expected_last_subject_seq`` makes the write conditional on the subject's history."""
    headers = msg_id_header(envelope)
    if expected_last_subject_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
    return await js.publish(subject, events.encode(envelope), headers=headers)


async def park(js: JetStreamContext, service: str, msg: Msg | None, data: bytes, reason: str,
               subject: str = "") -> None:
    """Move a message the service cannot take to the parking stream, verbatim, with the reason.

    The payload is kept byte for byte (it may be a record this build cannot even decode); headers say
    who parked it, why, and where it came from, so an operator can inspect and replay it."""
    headers = {topology.PARK_REASON: reason[:4000], topology.PARK_SERVICE: service}
    if msg is not None:
        headers[topology.PARK_SUBJECT] = msg.subject
        try:
            meta = msg.metadata
            headers[topology.PARK_STREAM] = meta.stream
            headers[topology.PARK_SEQUENCE] = str(meta.sequence.stream)
            headers["Nats-Msg-Id"] = f"parked:{meta.stream}:{meta.sequence.stream}"
        except (ValueError, AttributeError, IndexError):
            pass  # not a JetStream message; no origin to record
    else:
        # Not from a stream (e.g. a malformed object off the Kubernetes API): the same bad input parked
        # twice (two watchers, a restart) gets the same id, so it is parked once.
        headers[topology.PARK_SUBJECT] = subject
        headers["Nats-Msg-Id"] = "parked:" + hashlib.sha256(subject.encode() + b"\0" + data).hexdigest()[:32]
    log.error("parked a message: %s", reason, extra={"service": service, "subject": headers.get(topology.PARK_SUBJECT)})
    await js.publish(topology.parked_subject(service), data, headers=headers)


@dataclass(frozen=True)
class Delivery:
    """One message taken from a durable consumer, decoded."""

    msg: Msg
    envelope: events.Envelope

    @property
    def stream_sequence(self) -> int:
        return self.msg.metadata.sequence.stream


class Retry(Exception):
    """Raised by a handler for a transient failure: the batch is not acked and will be redelivered."""


class RestartService(nats.errors.Error):
    """Raised by a service when a bus event asks for its restart on purpose (not a failure): the runtime
    starts it again at once and logs the message as information (e.g. the applier's ClaimReleased)."""


# Failures of the bus itself (a full store, a timeout, no responders, a lost connection): never the
# message's fault, so never a reason to park it. The handler's batch is redelivered instead.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, ConnectionError)


BatchHandler = Callable[[list[Delivery]], Awaitable[None]]
FETCH_MARGIN = 2.0  # seconds a fetch waits here past its wait at the server for the server's answer
FETCH_NEXT_WAIT = 5.0  # seconds a fetch waits for each message after its first (they come at once)


class DurableConsumer:
    """Pull from a durable consumer in batches; park what cannot be decoded or handled; ack after the
    handler returns. ``stop()`` lets the batch in hand finish and be acked, then returns: nothing that was
    handled is left unacked, nothing unhandled is acked.

    Each fetch is one pull request of at most ``batch`` messages and about 4 MiB
    (:mod:`.jetstream_pull`), from the first fetch on: a count alone let 500 records of ~200 KB pass
    nats-server's ``max_pending`` (64 MiB), and the server dropped the client as a slow consumer (issue 21).
    The request waits at the server up to ``fetch_wait`` seconds for a first message and ends once no more
    are available: one request per wait, also one that ends empty."""

    def __init__(self, js: JetStreamContext, spec: topology.ConsumerSpec, service: str,
                 handler: BatchHandler, batch: int = 256, idle: Callable[[], Awaitable[None]] | None = None,
                 on_fetch_error: Callable[[BaseException, float], Awaitable[bool]] | None = None,
                 fetch_wait: float = 0.5):
        self.js = js
        # Seconds one fetch waits at the server for a message. A message is delivered to a waiting fetch at
        # once, so a longer wait costs no latency; every wait that ends empty costs the server a request per
        # consumer: thousands of idle appliers poll it.
        self.fetch_wait = fetch_wait
        # Called after a failed fetch with the error and the seconds since fetches began to fail: the
        # consumer itself may be gone (deleted, or held in memory by a server that restarted). True: it
        # has been dealt with (the consumer recreated), fetch again at once.
        self.on_fetch_error = on_fetch_error
        self._failing_since: float | None = None
        self.spec = spec
        self.service = service
        self.handler = handler
        self.batch = batch
        self.idle = idle
        self._stop = asyncio.Event()
        self.delivered = 0
        self.parked = 0
        self.pending = 0  # messages left in the consumer after the last fetch (lag)
        self._queued_at: float | None = None  # event-loop time the oldest unhandled input was seen
        self._backoff = Backoff(initial=0.5, maximum=15.0)

    def queued_since(self) -> float | None:
        """When the oldest input not yet handled was fetched (event-loop time); None when none waits."""
        return self._queued_at

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        puller = await Puller.open(self.js, self.spec.stream, self.spec.config.durable_name or "")
        try:
            while not self._stop.is_set():
                try:
                    msgs = await self._fetch(puller)
                    if msgs is None:
                        break  # told to stop while waiting
                    self._failing_since = None
                except INFRASTRUCTURE_ERRORS as exc:  # a leader election, a server restarting: wait, retry
                    delay = self._backoff.next()
                    if await self._fetch_failed(exc, delay):
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                    continue
                if not msgs:
                    self._queued_at = None
                    if self.idle is not None:
                        await self.idle()
                    continue
                if self._queued_at is None:
                    self._queued_at = asyncio.get_running_loop().time()
                await self._take(msgs)
                self.pending = msgs[-1].metadata.num_pending
                # what is still pending was queued no later than now; handled input no longer counts
                self._queued_at = asyncio.get_running_loop().time() if self.pending else None
        finally:
            with contextlib.suppress(nats.errors.ConnectionDrainingError, nats.errors.ConnectionClosedError):
                await puller.close()

    async def _fetch_failed(self, exc: BaseException, delay: float) -> bool:
        """Log a failed fetch and tell ``on_fetch_error``; True: fetch again at once."""
        log.warning("cannot fetch from %s (%s: %s); retrying in %.1fs", self.spec.config.durable_name,
                    type(exc).__name__, exc or "", delay)
        now = asyncio.get_running_loop().time()
        self._failing_since = self._failing_since if self._failing_since is not None else now
        if self.on_fetch_error is not None and await self.on_fetch_error(exc, now - self._failing_since):
            self._backoff.reset()
            return True
        return False

    async def _fetch(self, puller: Puller) -> list[Msg] | None:
        """One fetch: its messages ([] when the wait ended empty), or None when told to stop first: a long
        wait must not hold up a stop. Messages the cancelled fetch had already taken are not acked: the
        server delivers them again after ack_wait. An error status (a consumer gone: 503) raises what
        nats-py raises; so does a 409 other than the byte bound before any message (a consumer deleted,
        too many waiting pulls), so that it is backed off, not asked again at once."""
        pull = puller.pull(self.batch, wait=self.fetch_wait + FETCH_MARGIN, next_wait=FETCH_NEXT_WAIT,
                           expires=self.fetch_wait)
        if self.fetch_wait <= 0.5:
            return self._fetched(await pull)
        fetch = asyncio.ensure_future(pull)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fetch.cancel()
            raise
        finally:
            stopping.cancel()
        if fetch.done():
            return self._fetched(fetch.result())
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError, *INFRASTRUCTURE_ERRORS):
            await fetch
        return None

    def _fetched(self, pull: Pull) -> list[Msg]:
        if not pull.msgs and pull.status == "409" and not pull.at_byte_bound:
            raise APIError(code=409, description=pull.description)
        return pull.msgs

    async def _take(self, msgs: list[Msg]) -> None:
        deliveries: list[Delivery] = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(msg, events.decode(msg.data)))
            except events.ContractError as exc:
                await park(self.js, self.service, msg, msg.data, exc.reason)
                self.parked += 1
                await msg.ack_sync()
        if not deliveries:
            return
        try:
            await self.handler(deliveries)
        except Retry as exc:
            log.warning("transient failure, batch will be redelivered: %s", exc)
            await self._nak(deliveries)
            return
        except INFRASTRUCTURE_ERRORS as exc:
            delay = self._backoff.next()
            log.warning("the bus failed while handling a batch (%s: %s); it will be redelivered in %.1fs",
                        type(exc).__name__, exc or "", delay)
            await self._nak(deliveries, delay)
            await asyncio.sleep(delay)
            return
        except Exception:
            # One bad message must not block the others: find it by handling one at a time.
            log.exception("batch of %d failed; retrying one by one to isolate the cause", len(deliveries))
            await self._take_one_by_one(deliveries)
            return
        self._backoff.reset()
        await self._ack(deliveries)

    async def _nak(self, deliveries: list[Delivery], delay: float = 1.0) -> None:
        for d in deliveries:
            with contextlib.suppress(*INFRASTRUCTURE_ERRORS):  # unacked, it comes back after ack_wait anyway
                await d.msg.nak(delay=delay)

    async def _take_one_by_one(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            try:
                await self.handler([d])
            except (Retry, *INFRASTRUCTURE_ERRORS):
                await self._nak([d])
                continue
            except Exception as exc:
                await park(self.js, self.service, d.msg, d.msg.data,
                           f"handler failed on {type(d.envelope.record).__name__} {d.envelope.id}: "
                           f"{type(exc).__name__}: {exc}")
                self.parked += 1
            await self._ack([d])

    async def _ack(self, deliveries: list[Delivery]) -> None:
        # ack_sync on the last one makes sure the server has every ack of the batch before we go on
        # (acks on one connection are processed in order), so a stop right after loses nothing.
        for d in deliveries[:-1]:
            await d.msg.ack()
        await deliveries[-1].msg.ack_sync()
        self.delivered += len(deliveries)


@dataclass(frozen=True)
class LogReader:
    """How a history read reads a stream: which stream, through which stream its consumer is made, and
    under which consumer name. Every reader says it at the call site, no context decides it far away.

    ``stream``: the stream read (what the entries are labelled with); ``via``: the stream the consumer is
    made on when it is not ``stream`` itself: a mirror of it (the tools read KIPVS_PLAN through
    KIPVS_PLAN_AUDIT: they may not make consumers on the plan stream, ``topology.PLAN_AUDIT_STREAM``);
    ``reader``: the one fixed consumer name of a least-privilege identity (a node's applier: its permissions
    name that consumer, not any consumer of the stream, which would include other nodes' durables;
    ``nats_permissions.applier_reader``), else None: a random name, left to expire."""

    stream: str
    reader: str | None = None
    via: str = ""

    @property
    def consumer_stream(self) -> str:
        """The stream the read's consumer is made on."""
        return self.via or self.stream

    def of(self, stream: str) -> LogReader:
        """The same reader (its consumer name) reading another stream directly."""
        return LogReader(stream, self.reader)


async def read_stream(js: JetStreamContext, source: LogReader, subject: str = ">",
                      deliver: DeliverPolicy = DeliverPolicy.ALL, start_seq: int = 0,
                      upto: int = 0, start_time: datetime | None = None) -> AsyncIterator[Msg]:
    """Read ``source`` (see :class:`LogReader`: the stream, and the consumer's stream and name) with an
    ephemeral, unacknowledged consumer to its end: stream sequence ``upto`` when given, else what it held
    when the read began: the one way kipvs reads history (state rebuilds, catch-ups, replays, audits). It
    starts at ``start_seq`` or at ``start_time`` (when the server stored the message) when given. Pulls are
    bounded by bytes, and a read that cannot reach its end raises :class:`IncompleteRead` (after retrying
    from the last message read): see :mod:`.stream_reader`. NotFoundError when the stream does not exist."""
    config = ConsumerConfig(deliver_policy=deliver, ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                            mem_storage=True)
    if start_seq:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start_seq
    elif start_time is not None:
        config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, start_time.isoformat()
    reader = source.reader
    # one read at a time per fixed name: each attempt deletes and creates that consumer
    async with _reader_locks.setdefault(reader, asyncio.Lock()) if reader else contextlib.nullcontext():
        async for msg in stream_reader.read(js, source.consumer_stream, subject, config, reader, upto):
            yield msg


_reader_locks: dict[str, asyncio.Lock] = {}


def is_wrong_last_sequence(exc: APIError) -> bool:
    return getattr(exc, "err_code", None) == 10071
