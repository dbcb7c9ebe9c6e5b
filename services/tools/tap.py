"""``kipvs tap``: the log, live or from a point, filtered; a readable line per record or JSON lines.

    kipvs tap                                   # everything new, live, until Ctrl-C
    kipvs tap --since 10m --node node-a         # the last ten minutes that concern node-a, then live
    kipvs tap --stream plan --since 1 --no-follow --json > plan.jsonl
    kipvs tap --vip 10.96.0.10:80 --since 1h    # one VIP's story: its Service's changes and deltas

``--node N`` keeps N's status reports, deltas for all nodes and for N, and the Kubernetes events that name N
(its Node, Pods on it, EndpointSlices with endpoints on it, its FelixConfigurations). ``--object`` takes
KIND/NAMESPACE/NAME, NAMESPACE/NAME or KIND/NAME (cluster-scoped). ``--since`` takes a stream sequence, an
ISO time or an age (30s, 10m, 2h, 1d). A sequence with several streams starts each of them at that sequence:
``--since 1`` is the beginning of every stream (what ``kipvs replay --log`` needs).

A message that is not a kipvs envelope (parked) shows the time the server stored it and its bytes as they
are (escaped; base64 in ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.messaging import bus
from shared.messaging.jetstream_pull import Puller
from shared.tools import records
from shared.tools.log_client import (
    STREAMS,
    Entry,
    EntryAssembler,
    RecordedLog,
    ToolError,
    add_nats_arguments,
    assembled,
    decode_entry,
    ns_of,
    open_log,
    parse_point,
    plan_source,
    run_tool,
)

SUBJECTS = {"kube": "kipvs.kube.>", "plan": "kipvs.plan.>", "status": "kipvs.status.>", "parked": "kipvs.parked.>"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_nats_arguments(parser)
    parser.add_argument("--stream", default="all", help="kube, plan, status, parked, a comma list, or all")
    parser.add_argument("--node", default="", help="only what concerns this node")
    parser.add_argument("--object", default="", help="only this object: KIND/NAMESPACE/NAME or NAMESPACE/NAME")
    parser.add_argument("--vip", default="", help="only this VIP's Service: IP, IP:PORT or [IPv6]:PORT")
    parser.add_argument("--since", default="", help="start at a stream sequence (of each stream: 1 is the "
                                                    "beginning), an ISO time or an age (10m); default: only what "
                                                    "comes next")
    parser.add_argument("--no-follow", action="store_true", help="print what is there and exit")
    parser.add_argument("--json", action="store_true", help="JSON lines: stream, seq, subject, envelope")


def _streams(text: str) -> list[str]:
    names = list(STREAMS) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STREAMS]
    if unknown or not names:
        raise ToolError(f"--stream: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(STREAMS)}, all")
    return names


def _consumer(start: int | datetime | None, after_seq: int = 0) -> ConsumerConfig:
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True)
    if after_seq:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, after_seq + 1
    elif isinstance(start, int):
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start
    elif isinstance(start, datetime):
        config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, start.isoformat()
    else:
        config.deliver_policy = DeliverPolicy.NEW
    return config


async def backlog(js: Any, source: bus.LogReader, name: str, start: int | datetime) -> list[Entry]:
    """What a stream (``name``, read with ``source``) holds from ``start`` on, now."""
    stream = source.stream
    if isinstance(js, RecordedLog):
        return assembled([e for e in js.read(stream) if (e.seq >= start if isinstance(start, int) else
                                                         e.envelope is None or e.envelope.time_ns >= ns_of(start))])
    try:
        return assembled([stored_entry(stream, m) async for m in bus.read_stream(
            js, source, SUBJECTS[name], start_seq=start if isinstance(start, int) else 0,
            start_time=start if isinstance(start, datetime) else None)])
    except nats.js.errors.NotFoundError:
        return []


FOLLOW_WAIT = 5.0  # seconds one pull waits at the server for a first message (one request per wait)
ANSWER_MARGIN = 10.0  # seconds more a pull waits here for the server's answer (a loaded machine is slow)
FOLLOW_BATCH = 256  # messages one pull asks for, at most (and PULL_MAX_BYTES: jetstream_pull)
RETRY_PAUSE = 1.0  # seconds between attempts to follow again
SERVER_SHUTDOWN = "Server Shutdown"  # nats-server's 409 to waiting pulls when it stops (2.15: seen here)
QUEUE_MAX = 1024  # entries the live streams may have waiting to be printed


async def follow(js: JetStreamContext, source: bus.LogReader, name: str, after_seq: int) -> AsyncIterator[Entry]:
    """New messages of a stream, as they arrive (after stream sequence ``after_seq``; 0: from now); a chunked
    plan delta once its last part has arrived, whole. It never stops on its own: a consumer lost (a server
    restart or a leader change drops an in-memory one), deliveries lost (a gap in its delivery sequence, or
    a reconnect: what the server sent meanwhile is gone), a pull or request that timed out (nats-py raises
    its TimeoutError or a bare asyncio one) or any other failed request make the consumer again after the
    last message shown, said in one line (once while the same failure repeats); while the connection is
    down (nats-py reconnects; the connection's owner says so) it waits, silently. A closed connection raises
    ConnectionClosedError (the tool then says so in one line). Pulls are bounded by bytes
    (:mod:`shared.messaging.jetstream_pull`): what is in flight stays far below nats-server's max_pending (a
    slow-consumer drop). ``source``: where the consumer is made (``bus.LogReader``; its fixed name is not
    used: a follow is no history read)."""
    stream = source.stream
    nc = js._nc
    after_seq = after_seq or await until_answered(nc, lambda: _last_seq(js, name))
    assembler = EntryAssembler()
    said = ""  # the last failure said: one that repeats (a stream still missing) is not said every second
    while True:
        await until_connected(nc)
        try:
            async for msg in _follow_from(js, source, name, after_seq):
                after_seq, said = msg.metadata.sequence.stream, ""
                for entry in assembler.feed(stored_entry(stream, msg)):
                    yield entry
        except (nats.errors.Error, TimeoutError, _Lost) as exc:
            if nc.is_closed:
                raise nats.errors.ConnectionClosedError() from None
            reason = f"{type(exc).__name__}: {exc or 'no answer in time'}"
            if nc.is_connected and not isinstance(exc, _Reconnected) and reason != said:
                print(f"kipvs tap: following {stream} again after seq {after_seq} ({reason})", file=sys.stderr,
                      flush=True)
                said = reason
            await asyncio.sleep(RETRY_PAUSE)


class _Lost(Exception):
    """Messages the consumer delivered never arrived, or it is gone."""


class _Reconnected(_Lost):
    """The connection was lost (or the server is shutting down) and made again: what the server sent
    meanwhile is gone. Not said again: the connection's loss and return are (log_client.connect)."""


async def until_connected(nc: nats.NATS) -> None:
    """Return once ``nc`` is connected (at once when it is): requests sent while nats-py reconnects would
    pile up in its buffer and all go at once. ConnectionClosedError when it is closed for good."""
    while not nc.is_connected:
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError()
        await asyncio.sleep(0.2)


async def until_answered(nc: nats.NATS, ask: Callable[[], Awaitable[int]]) -> int:
    """``ask()``'s answer, asked again (once connected) while it times out: a loaded server is slow, not
    gone. ConnectionClosedError when the connection is closed for good."""
    while True:
        await until_connected(nc)
        try:
            return await ask()
        except TimeoutError:  # nats-py's TimeoutError is an asyncio.TimeoutError, which is TimeoutError
            await asyncio.sleep(RETRY_PAUSE)


async def _follow_from(js: JetStreamContext, source: bus.LogReader, name: str,
                       after_seq: int) -> AsyncIterator[Msg]:
    """One consumer's part of a follow: raises _Lost (or what a request raises) when it cannot go on."""
    stream = source.consumer_stream
    config = _consumer(None if after_seq else 1, after_seq)
    config.name, config.filter_subject = f"kipvs-tap-{secrets.token_hex(8)}", SUBJECTS[name]
    reconnects = js._nc.stats["reconnects"]
    await js.add_consumer(stream, config)  # left to expire (inactive_threshold): the tools may not delete
    puller = await Puller.open(js, stream, config.name)
    delivered = 0
    try:
        while True:
            got = await puller.pull(FOLLOW_BATCH, wait=FOLLOW_WAIT + ANSWER_MARGIN, next_wait=ANSWER_MARGIN,
                                    expires=FOLLOW_WAIT)
            for msg in got.msgs:
                if msg.metadata.sequence.consumer != delivered + 1:
                    raise _Lost(f"delivery #{msg.metadata.sequence.consumer} came after #{delivered}")
                delivered = msg.metadata.sequence.consumer
                yield msg
            if js._nc.stats["reconnects"] != reconnects:
                raise _Reconnected("the connection was lost and made again")
            if got.status == "409" and got.description == SERVER_SHUTDOWN:  # the connection goes next
                raise _Reconnected(got.description)
            if got.status == "409" and not got.at_byte_bound:
                raise _Lost(f"the server ended a pull: {got.description or got.status}")
    finally:
        with contextlib.suppress(nats.errors.Error):
            await puller.close()


async def tap(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    names = _streams(args.stream)
    start = parse_point(args.since) if args.since else None
    try:
        keep = records.Filter(node=args.node, object=args.object, vip=args.vip)
    except ValueError as exc:
        raise ToolError(f"--vip: {exc}") from None
    render = records.as_json if args.json else records.one_line

    def show(entry: Entry) -> None:
        if keep.keep(entry):
            print(render(entry), file=out, flush=True)

    # the plan through its audit mirror for an identity of its own (log_client.plan_source), the rest directly
    sources = {n: plan_source(args) if n == "plan" else bus.LogReader(STREAMS[n]) for n in names}
    async with open_log(args, reconnect="" if args.no_follow else "tap") as js:
        if isinstance(js, RecordedLog):  # a recording has no future: print it and stop
            args.no_follow = True
            start = start if start is not None else 1
        last = dict.fromkeys(names, 0)
        if start is not None:
            entries = [e for name in names for e in await backlog(js, sources[name], name, start)]
            for entry in sorted(entries, key=_order):
                show(entry)
            for entry in entries:
                name = next(n for n in names if STREAMS[n] == entry.stream)
                last[name] = max(last[name], entry.seq)
        if args.no_follow:
            return 0
        if start is not None:  # streams with nothing yet: follow from the start of what comes
            for name in names:
                if not last[name]:
                    last[name] = await until_answered(js._nc, lambda name=name: _last_seq(js, name))
        await _follow_all(js, sources, last, show)
    return 0


async def _follow_all(js: JetStreamContext, sources: dict[str, bus.LogReader], last: dict[str, int],
                      show: Callable[[Entry], None]) -> None:
    """Follow every stream named in ``sources`` after its ``last`` sequence, showing entries as they come,
    until SIGINT/SIGTERM; a follower that ends (a closed connection) raises here, never a silent stop."""
    # bounded: a slow reader of the output slows the pulls, never fills this process's memory
    queue: asyncio.Queue[Entry] = asyncio.Queue(maxsize=QUEUE_MAX)

    async def pump(name: str) -> None:
        async for entry in follow(js, sources[name], name, last[name]):
            await queue.put(entry)

    pumps = [asyncio.create_task(pump(n)) for n in sources]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            getter = asyncio.ensure_future(queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper, *pumps}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                show(getter.result())
            else:
                getter.cancel()
            stopper.cancel()
            for pump_task in pumps:
                if pump_task.done() and pump_task.exception() is not None:
                    raise pump_task.exception()  # type: ignore[misc]
    finally:
        for pump_task in pumps:
            pump_task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _last_seq(js: JetStreamContext, name: str) -> int:
    try:
        return (await js.stream_info(STREAMS[name])).state.last_seq
    except nats.js.errors.NotFoundError:
        return 0


def stored_entry(stream: str, msg: Any) -> records.Stored:
    """A message decoded, with the time the server stored it (its JetStream metadata)."""
    entry = decode_entry(stream, msg)
    try:
        stored_ns = round(msg.metadata.timestamp.timestamp() * 1e9)
    except (nats.errors.NotJSMessageError, AttributeError, ValueError):
        stored_ns = 0
    return records.Stored(entry.stream, entry.seq, entry.subject, entry.envelope, entry.raw, entry.headers,
                          stored_ns=stored_ns)


def _order(entry: Entry) -> tuple[int, str, int]:
    return (entry.envelope.time_ns if entry.envelope else getattr(entry, "stored_ns", 0), entry.stream, entry.seq)


def run(args: argparse.Namespace) -> int:
    return run_tool("tap", lambda: tap(args))
