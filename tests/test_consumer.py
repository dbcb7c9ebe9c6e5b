"""The durable consumer loop against a real nats-server: parking, isolation of a poison message,
graceful stop without loss or duplicates."""

from __future__ import annotations

import asyncio

import msgspec
import nats
from nats.js.api import ConsumerConfig

from shared.contract import events, topology
from shared.messaging import bus
from tests.helpers import eventually


def resync(i: int) -> events.Envelope:
    return events.Envelope(id=f"e{i}", time_ns=i, producer="test",
                           record=events.KubeResync(kind="Pod", resource_version=str(i), live={}))


async def _publish(js, n: int) -> None:
    for i in range(n):
        await bus.publish(js, topology.kube_resync_subject("Pod"), resync(i))


def _spec() -> topology.ConsumerSpec:
    return topology.ConsumerSpec(topology.KUBE_STREAM, ConsumerConfig(
        durable_name="t", filter_subject="kipvs.kube.>", ack_wait=30.0, max_deliver=-1))


async def test_unknown_and_malformed_messages_are_parked_and_the_rest_flow(nc: nats.NATS) -> None:
    js = await bus.setup(nc, consumers=[_spec()])
    await bus.publish(js, topology.kube_resync_subject("Pod"), resync(1))
    future = msgspec.msgpack.encode({"v": 1, "id": "f1", "time_ns": 1, "producer": "p",
                                     "record": {"type": "kube.teleport"}})
    await js.publish("kipvs.kube.resync.Pod", future)
    await js.publish("kipvs.kube.resync.Pod", b"\x00not msgpack")
    newer = msgspec.msgpack.encode({"v": 7, "id": "n1", "time_ns": 1, "producer": "p", "record": {}})
    await js.publish("kipvs.kube.resync.Pod", newer)
    await bus.publish(js, topology.kube_resync_subject("Pod"), resync(2))

    seen: list[str] = []

    async def handle(batch: list[bus.Delivery]) -> None:
        seen.extend(d.envelope.id for d in batch)

    consumer = bus.DurableConsumer(js, _spec(), "planner", handle, batch=10)
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: len(seen) == 2 and consumer.parked == 3)
    consumer.stop()
    await task
    assert seen == ["e1", "e2"]

    parked = await js.pull_subscribe("kipvs.parked.planner", durable="inspect", stream=topology.PARKED_STREAM)
    msgs = await parked.fetch(3, timeout=2)
    reasons = [m.headers[topology.PARK_REASON] for m in msgs]
    assert "unknown record type 'kube.teleport'" in reasons[0]
    assert "not a kipvs envelope" in reasons[1]
    assert "schema version 7" in reasons[2]
    assert msgs[0].data == future  # parked verbatim
    assert all(m.headers[topology.PARK_SUBJECT] == "kipvs.kube.resync.Pod" for m in msgs)
    assert all(m.headers[topology.PARK_STREAM] == topology.KUBE_STREAM for m in msgs)
    info = await js.consumer_info(topology.KUBE_STREAM, "t")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_message_the_handler_chokes_on_is_parked_and_the_others_are_handled(nc: nats.NATS) -> None:
    js = await bus.setup(nc, consumers=[_spec()])
    await _publish(js, 5)
    handled: list[str] = []

    async def handle(batch: list[bus.Delivery]) -> None:
        if any(d.envelope.id == "e3" for d in batch):
            raise ValueError("cannot plan e3")
        handled.extend(d.envelope.id for d in batch)

    consumer = bus.DurableConsumer(js, _spec(), "planner", handle, batch=10)
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: consumer.parked == 1 and len(handled) == 4)
    consumer.stop()
    await task
    assert handled == ["e0", "e1", "e2", "e4"]
    parked = await js.get_last_msg(topology.PARKED_STREAM, "kipvs.parked.planner")
    assert "ValueError: cannot plan e3" in parked.headers[topology.PARK_REASON]


async def test_stop_mid_stream_acks_what_was_handled_and_nothing_else(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[_spec()])
    await _publish(js, 60)
    first: list[str] = []

    async def slow(batch: list[bus.Delivery]) -> None:
        await asyncio.sleep(0.05)
        first.extend(d.envelope.id for d in batch)

    consumer = bus.DurableConsumer(js, _spec(), "planner", slow, batch=5)
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: len(first) >= 10)
    consumer.stop()  # what SIGTERM does, through the runtime
    await task
    await nc.drain()

    # A new process picks up exactly where the first stopped.
    nc2 = await nats.connect(nats_url)
    js2 = nc2.jetstream()
    second: list[str] = []

    async def fast(batch: list[bus.Delivery]) -> None:
        second.extend(d.envelope.id for d in batch)

    consumer2 = bus.DurableConsumer(js2, _spec(), "planner", fast, batch=50)
    task2 = asyncio.create_task(consumer2.run())
    await eventually(lambda: len(first) + len(second) >= 60)
    await asyncio.sleep(0.3)
    consumer2.stop()
    await task2
    await nc2.close()
    assert not set(first) & set(second), "a handled message was redelivered"
    assert first + second == [f"e{i}" for i in range(60)]
