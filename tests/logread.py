"""Reading streams back in tests (an ephemeral consumer over everything)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">") -> list[tuple[str, events.Envelope]]:
    """Every message of a stream, decoded ([] when the stream is empty)."""
    return [(m.subject, events.decode(m.data)) async for m in bus.read_stream(js, bus.LogReader(stream), subject)]


async def parked_reasons(js: JetStreamContext) -> list[str]:
    """The reason header of every parked message, oldest first ([] when nothing was ever parked)."""
    try:
        info = await js.stream_info(topology.PARKED_STREAM)
    except NotFoundError:
        return []
    reasons = []
    for seq in range(info.state.first_seq or 1, info.state.last_seq + 1):
        msg = await js.get_msg(topology.PARKED_STREAM, seq)
        reasons.append(msg.headers[topology.PARK_REASON])
    return reasons
