"""The applier's answer to ``kipvs ipvs --node``: core NATS request/reply on ``kipvs.inspect.<node>.ipvs``.

Core NATS, not JetStream: an inspection is a question about now, never stored or replayed. The request
and reply are the versioned Structs of ``shared/contract/events.py`` (``IpvsInspectRequest``/``IpvsInspectReply``);
a request of a newer version than this build knows, or that is not a request at all, is answered with an
``error`` rather than ignored, so the asking tool never waits for nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pyroute2.netlink.exceptions import NetlinkError

from shared.contract import events, topology

from .kernel.backend import Backend, KernelError

log = logging.getLogger("kipvs.applier")

_request_decoder = msgspec.msgpack.Decoder(events.IpvsInspectRequest)
_encoder = msgspec.msgpack.Encoder()
# Room in each part's message for its envelope (the part numbers, the digest) and the header marking it.
PART_OVERHEAD = 4096

# What an applier puts in its reply besides the table: (mode, plan_seq, node_addresses).
Context = Callable[[], tuple[str, int, tuple[str, ...]]]


async def answer(node: str, kernel: Backend, context: Context,
                 read: Callable[[], Awaitable[events.KernelTable]] | None = None,
                 data: bytes = b"", exclude_cidrs: tuple[str, ...] = ()) -> events.IpvsInspectReply:
    """The reply to one request's bytes (empty bytes: a request with every default); ``exclude_cidrs``:
    the applier's --ipvs-exclude-cidrs, which ``kipvs ipvs --diff`` leaves out."""
    mode, plan_seq, addresses = context()
    base = {"node": node, "backend": kernel.label, "mode": mode, "plan_seq": plan_seq,
            "node_addresses": addresses, "exclude_cidrs": exclude_cidrs}
    try:
        request = _request_decoder.decode(data) if data else events.IpvsInspectRequest()
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return events.IpvsInspectReply(**base, time_ns=time.time_ns(), error=f"not an inspect request: {exc}")
    if request.v > events.INSPECT_VERSION:
        return events.IpvsInspectReply(**base, time_ns=time.time_ns(), error=(
            f"request version {request.v}; this applier answers up to {events.INSPECT_VERSION}: upgrade it"))
    try:
        table = await (read or kernel.kernel_table)()
    except (NetlinkError, OSError, KernelError) as exc:
        log.warning("kernel inspection failed: %s", exc)
        return events.IpvsInspectReply(**base, time_ns=time.time_ns(), error=f"cannot read the kernel: {exc}")
    return events.IpvsInspectReply(**base, time_ns=time.time_ns(), table=table)


def reply_messages(reply: events.IpvsInspectReply, max_payload: int, parts: bool) -> list[tuple[bytes, dict[str, str]]]:
    """The messages (payload, headers) that carry ``reply``: one when it fits in ``max_payload``; in parts
    (:class:`~shared.contract.events.IpvsInspectPart`) when the asker takes them; else one reply saying the
    table does not fit (an older tool)."""
    payload = _encoder.encode(reply)
    if len(payload) <= max_payload:
        return [(payload, {})]
    room = max_payload - PART_OVERHEAD
    count = -(-len(payload) // room)
    if not parts or count > events.INSPECT_MAX_PARTS:
        # One message or nothing: say why instead of letting the asking tool time out.
        why = ("upgrade kipvs ipvs: this one cannot take a reply in parts" if not parts else
               f"it would take {count} messages, more than {events.INSPECT_MAX_PARTS}")
        reply = msgspec.structs.replace(reply, table=None, error=(
            f"the table is {len(payload)} bytes, more than this NATS server's max_payload ({max_payload}); {why}"))
        return [(_encoder.encode(reply), {})]
    digest = hashlib.sha256(payload).hexdigest()
    return [(_encoder.encode(events.IpvsInspectPart(part=i + 1, parts=count, digest=digest,
                                                    data=payload[i * room:(i + 1) * room])),
             {events.INSPECT_PART_HEADER: f"{i + 1}/{count}"}) for i in range(count)]


async def serve(nc: NATS, node: str, kernel: Backend, context: Context,
                read: Callable[[], Awaitable[events.KernelTable]] | None = None,
                exclude_cidrs: tuple[str, ...] = ()) -> Subscription:
    """Subscribe to this node's inspect subject; the caller unsubscribes when it stops."""

    async def handle(msg: Msg) -> None:
        if not msg.reply or msg.reply.startswith("$"):
            # Not a tool's request (whose reply subject is its inbox): a publish, or a stream's message pushed
            # here by a consumer someone created with this subject as its deliver_subject (reply $JS.ACK...;
            # nats-server does not check a consumer creator's publish rights on deliver_subject). Answering
            # would read the whole kernel for every message of that stream (found by a hostile review).
            return
        reply = await answer(node, kernel, context, read, msg.data, exclude_cidrs)
        for payload, headers in reply_messages(reply, nc.max_payload, _wants_parts(msg.data)):
            await nc.publish(msg.reply, payload, headers=headers or None)

    return await nc.subscribe(topology.inspect_subject(node), cb=handle)


def _wants_parts(data: bytes) -> bool:
    try:
        return bool(data) and _request_decoder.decode(data).parts
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
