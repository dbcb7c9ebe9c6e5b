"""The applier's plan feed (services/applier/plan_feed.py, issue 27) on a real nats-server: KIPVS_PLAN's
republish, read by core-NATS subscription; a gap (a message lost on the way, the last one lost, messages
published while the connection was down) is read from the stream by sequence, and every message reaches the
handler once, in stream order per subject; no consumer is left on KIPVS_PLAN. The whole applier on the feed:
test_applier_service.py, test_restart_faults.py, test_nats_faults.py, test_failover.py (the default)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats

from services.applier import plan_feed
from shared.contract import events, topology
from shared.messaging import bus
from tests.conftest import NatsServer
from tests.helpers import eventually

NODE = "node-a"


def delta(seq: int, scope: str = "all") -> events.Envelope:
    record = events.PlanDelta(scope=scope, seq=seq, source_seq=seq, ops=())
    return events.Envelope(id=f"test/{scope}/{seq}", time_ns=seq, producer="test", record=record)


class Recorder:
    """The handler: (plan subject, stream sequence, delta seq) of every message handed over."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, int]] = []

    async def handle(self, batch: list[bus.Delivery]) -> None:
        for d in batch:
            self.got.append((d.msg.subject, d.stream_sequence, d.envelope.record.seq))

    def seqs(self, subject: str = topology.PLAN_ALL_SUBJECT) -> list[int]:
        return [seq for s, _, seq in self.got if s == subject]


@contextlib.asynccontextmanager
async def running(feed: plan_feed.PlanFeed) -> AsyncIterator[plan_feed.PlanFeed]:
    task = asyncio.create_task(feed.run())
    try:
        yield feed
    finally:
        feed.stop()
        await asyncio.wait_for(task, 10)


async def publish(js, first: int, last: int, scope: str = "all") -> None:
    subject = topology.PLAN_ALL_SUBJECT if scope == "all" else topology.plan_node_subject(scope)
    for seq in range(first, last + 1):
        await bus.publish(js, subject, delta(seq, scope))


async def test_the_feed_starts_after_the_bootstrap_and_takes_only_its_nodes_subjects(nc: nats.NATS) -> None:
    js = await bus.setup(nc)
    assert await plan_feed.republished(js)
    await publish(js, 1, 3)
    after = (await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)).seq - 1  # read up to delta 2
    rec = Recorder()
    reader = bus.LogReader(topology.PLAN_STREAM, "reader-node-a")  # as the applier's: its reads delete their consumer
    async with running(plan_feed.PlanFeed(nc, js, NODE, rec.handle, after, "applier-node-a", reader=reader)) as feed:
        await eventually(lambda: rec.seqs() == [3], 20, "the delta stored between bootstrap and feed")
        await publish(js, 4, 6)
        await publish(js, 1, 2, scope="node-b")  # another node's: never this node's
        await publish(js, 1, 1, scope=NODE)
        await eventually(lambda: rec.seqs() == [3, 4, 5, 6] and rec.seqs(topology.plan_node_subject(NODE)) == [1],
                         20, "the live deltas")
        assert feed.repairs == 1  # only the start
    assert all(subject != topology.plan_node_subject("node-b") for subject, _, _ in rec.got)
    assert (await js.stream_info(topology.PLAN_STREAM)).state.consumer_count == 0


def _dropping(feed: plan_feed.PlanFeed, drop: set[int]) -> None:
    """Lose the feed messages of those delta seqs on the way (a slow-consumer drop, a leader that died)."""
    take = feed._on_message

    async def lossy(msg) -> None:
        if events.decode(msg.data).record.seq not in drop:
            await take(msg)

    feed._on_message = lossy  # type: ignore[method-assign]


async def test_a_lost_message_is_read_from_the_stream_and_handed_over_in_order(nc: nats.NATS) -> None:
    js = await bus.setup(nc)
    after = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
    base = 0  # every test starts from empty streams (conftest's nats_url)
    rec = Recorder()
    feed = plan_feed.PlanFeed(nc, js, NODE, rec.handle, after, "applier-node-a")
    _dropping(feed, {base + 3, base + 4})
    async with running(feed):
        await asyncio.sleep(0.3)  # subscribed
        await publish(js, base + 1, base + 8)
        await eventually(lambda: rec.seqs() == list(range(base + 1, base + 9)), 20, "every delta, in order")
        assert feed.repairs == 1  # the gap (the start found nothing to read)
        stream_seqs = [s for _, s, _ in rec.got]
        assert stream_seqs == sorted(set(stream_seqs))  # each once, in stream order


async def test_a_lost_last_message_is_found_by_the_periodic_check(nc: nats.NATS) -> None:
    js = await bus.setup(nc)
    after = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
    base = 0  # every test starts from empty streams (conftest's nats_url)
    rec = Recorder()
    feed = plan_feed.PlanFeed(nc, js, NODE, rec.handle, after, "applier-node-a", check_period=1.0)
    _dropping(feed, {base + 2})
    async with running(feed):
        await asyncio.sleep(0.3)
        await publish(js, base + 1, base + 2)  # no successor reveals the gap
        await eventually(lambda: rec.seqs() == [base + 1, base + 2], 20, "the lost last delta")


async def test_what_was_published_while_disconnected_is_read_after_the_reconnect(tmp_path: Path) -> None:
    server = NatsServer(tmp_path)
    server.start()
    try:
        feed_nc = await nats.connect(server.url, reconnect_time_wait=8, max_reconnect_attempts=-1)
        js = await bus.setup(feed_nc)
        rec = Recorder()
        async with running(plan_feed.PlanFeed(feed_nc, js, NODE, rec.handle, 0, "applier-node-a")) as feed:
            await publish(js, 1, 2)
            await eventually(lambda: rec.seqs() == [1, 2], 20, "the first deltas")
            before = feed.repairs  # 0, or 1 when its first read already found them
            server.stop()
            server.start()
            pub = await nats.connect(server.url)  # before the feed's client is back (it waits 8 s)
            await publish(pub.jetstream(timeout=10), 3, 5)
            await pub.close()
            await eventually(lambda: rec.seqs() == [1, 2, 3, 4, 5], 30, "the deltas published meanwhile")
            assert feed.repairs == before + 1  # read from the stream after the reconnect
        await feed_nc.close()
    finally:
        server.stop()


async def test_a_batch_the_handler_refuses_is_read_again_and_not_skipped(nc: nats.NATS) -> None:
    js = await bus.setup(nc)
    after = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
    base = 0  # every test starts from empty streams (conftest's nats_url)
    rec = Recorder()
    refusals = [1]

    async def handle(batch: list[bus.Delivery]) -> None:
        if refusals and any(d.envelope.record.seq == base + 2 for d in batch):
            refusals.pop()
            raise bus.Retry("not now")
        await rec.handle(batch)

    async with running(plan_feed.PlanFeed(nc, js, NODE, handle, after, "applier-node-a")):
        await asyncio.sleep(0.3)
        await publish(js, base + 1, base + 3)
        await eventually(lambda: rec.seqs() == [base + 1, base + 2, base + 3], 20, "every delta once")
