"""Reading streams back in tests (an ephemeral consumer over everything)."""

from __future__ import annotations

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kipvs.shared import events, topology


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">") -> list[tuple[str, events.Envelope]]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=10.0))
    out: list[tuple[str, events.Envelope]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except NatsTimeoutError:
                break
            out.extend((m.subject, events.decode(m.data)) for m in msgs)
            if msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


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
