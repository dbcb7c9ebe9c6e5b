"""The applier's answer to ``kipvs ipvs --node``: core NATS request/reply on ``kipvs.inspect.<node>.ipvs``.

Core NATS, not JetStream: an inspection is a question about now, never stored or replayed. The request
and reply are the versioned Structs of ``shared/events.py`` (``IpvsInspectRequest``/``IpvsInspectReply``);
a request of a newer version than this build knows, or that is not a request at all, is answered with an
``error`` rather than ignored, so the asking tool never waits for nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pyroute2.netlink.exceptions import NetlinkError

from kipvs.shared import events, topology

from .backend import Backend, KernelError

log = logging.getLogger("kipvs.applier")

_request_decoder = msgspec.msgpack.Decoder(events.IpvsInspectRequest)
_encoder = msgspec.msgpack.Encoder()

# What an applier puts in its reply besides the table: (mode, plan_seq, node_addresses).
Context = Callable[[], tuple[str, int, tuple[str, ...]]]


async def answer(node: str, kernel: Backend, context: Context,
                 read: Callable[[], Awaitable[events.KernelTable]] | None = None,
                 data: bytes = b"") -> events.IpvsInspectReply:
    """The reply to one request's bytes (empty bytes: a request with every default)."""
    mode, plan_seq, addresses = context()
    base = {"node": node, "backend": kernel.label, "mode": mode, "plan_seq": plan_seq,
            "node_addresses": addresses}
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


async def serve(nc: NATS, node: str, kernel: Backend, context: Context,
                read: Callable[[], Awaitable[events.KernelTable]] | None = None) -> Subscription:
    """Subscribe to this node's inspect subject; the caller unsubscribes when it stops."""

    async def handle(msg: Msg) -> None:
        if not msg.reply:
            return  # a publish, not a request: nobody to answer
        reply = await answer(node, kernel, context, read, msg.data)
        payload = _encoder.encode(reply)
        if len(payload) > nc.max_payload:
            # One message or nothing: say why instead of letting the asking tool time out.
            reply = msgspec.structs.replace(reply, table=None, error=(
                f"the table is {len(payload)} bytes, more than this NATS server's max_payload ({nc.max_payload}); "
                "raise max_payload in the server's configuration"))
            payload = _encoder.encode(reply)
        await msg.respond(payload)

    return await nc.subscribe(topology.inspect_subject(node), cb=handle)
