"""History reads over large messages (issue 21): a real nats-server whose ``max_pending`` is 8 MiB (the
default is 64 MiB; lowered so that a few hundred records of ~200 KB pass it, as 950 did at the default), so
that a reader which asks for 1,000 messages at once is dropped as a slow consumer. Every reader must read
every message, or fail loudly: the planner's rebuild, the tools, ``bus.read_stream`` itself."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.planner.active import plan
from services.planner.core import Planner
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus, stream_reader
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.plan.plan_state import SharedPlan
from shared.service import config
from tests import kube
from tests.helpers import eventually, kipvs, start_service, wait_port
from tests.logread import read_stream

MAX_PENDING = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def small_pending_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("nats-small-pending")
    port = free_loopback_port()
    conf = store / "server.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_pending: {MAX_PENDING}\n'
                    f'jetstream {{ store_dir: "{store}" }}\n')
    proc = subprocess.Popen([server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def url(small_pending_server: str) -> AsyncIterator[str]:
    nc = await nats.connect(small_pending_server)
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name)
    await nc.close()
    yield small_pending_server


def _event(seq: int, obj: dict, action: str) -> tuple[str, events.Envelope]:
    meta = obj["metadata"]
    obj = {**obj, "metadata": {**meta, "resourceVersion": str(1000 + seq)}}
    record = events.KubeEvent(kind=obj["kind"], action=action, namespace=meta.get("namespace", ""),
                              name=meta["name"], resource_version=str(1000 + seq), object=obj)
    return (topology.kube_object_subject(obj["kind"], meta.get("namespace", ""), meta["name"]),
            events.Envelope(id=f"{obj['kind']}/{meta['name']}@{1000 + seq}", time_ns=seq, producer="test",
                            record=record))


def rolling_update(updates: int, replicas: int = 1000) -> list[tuple[str, events.Envelope]]:
    """The issue's history at a smaller scale: a Deployment of ``replicas`` behind one Service, its one
    EndpointSlice (with targetRef, ~200 KB a record) updated ``updates`` times, and a small Service (with
    its slice) created every 40 updates."""
    out = [_event(1, kube.node("node-a"), "ADDED"), _event(2, kube.service("web"), "ADDED")]
    for i in range(updates):
        endpoints = []
        for r in range(replicas):
            ep = kube.endpoint(f"10.244.{r // 250}.{r % 250 + 1}", ready=(r + i) % 97 != 0)
            ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": f"web-7d9f8c6b5-{r:05d}x{i:03d}",
                               "uid": f"1b4e28ba-2fa1-11d2-883f-{r:06d}{i:06d}"}
            endpoints.append(ep)
        out.append(_event(len(out) + 1, kube.endpoint_slice("web-abc", "web", endpoints),
                          "ADDED" if i == 0 else "MODIFIED"))
        if i % 40 == 0:
            k = i // 40
            out.append(_event(len(out) + 1, kube.service(f"small-{k}", cluster_ip=f"10.96.1.{k + 1}"), "ADDED"))
            out.append(_event(len(out) + 1, kube.endpoint_slice(f"small-{k}-x", f"small-{k}",
                                                                [kube.endpoint(f"10.244.9.{k + 1}")]), "ADDED"))
    return out


async def _publish(js, items) -> None:
    acks = [await js.publish_async(subject, events.encode(env), headers=bus.msg_id_header(env))
            for subject, env in items]
    await asyncio.gather(*acks)


class _Lines(logging.Handler):
    """kipvs's log lines (the service runtime replaces the root logger's handlers, pytest's among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def kipvs_log() -> Iterator[_Lines]:
    lines = _Lines()
    logging.getLogger("kipvs").addHandler(lines)
    yield lines
    logging.getLogger("kipvs").removeHandler(lines)


async def _planner_ready(log: _Lines, nats_url: str, within: float = 90.0):
    """Start the planner in this process (events fetched 10 at a time: its durable consumer's batch is not
    bounded by bytes); return (task, stop) once it says it is ready."""
    log.lines.clear()
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": "", "batch": 10}, {})
    task, stop = start_service("planner", cfg, plan)
    await eventually(lambda: task.done() or "planner is ready" in log.lines, within, "the planner to be ready")
    assert not task.done(), log.lines
    return task, stop


async def test_planner_restart_over_a_large_history_rebuilds_all_and_removes_nothing(url: str, kipvs_log: _Lines,
                                                                                     capsys) -> None:
    history = rolling_update(160)
    nc = await nats.connect(url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    task, stop = await _planner_ready(kipvs_log, url)
    try:
        await _publish(js, history)
        last = (await js.stream_info(topology.KUBE_STREAM)).state.last_seq
        assert last == len(history) and (await js.stream_info(topology.KUBE_STREAM)).state.bytes > 3 * MAX_PENDING
        deadline = time.monotonic() + 120
        while (await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)).ack_floor.stream_seq < last:
            assert time.monotonic() < deadline and not task.done(), "the first planner never planned the history"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    deltas_before = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq

    task, stop = await _planner_ready(kipvs_log, url)  # the restart: a rebuild over the whole history
    try:
        await asyncio.sleep(1.0)  # a correction would be published now
        rebuilt = [line for line in kipvs_log.lines if line.startswith("rebuilt state from")]
        assert rebuilt and rebuilt[0].startswith(f"rebuilt state from {len(history)} logged records"), rebuilt
        assert not [line for line in kipvs_log.lines if "records were deleted" in line], kipvs_log.lines
        assert (await js.stream_info(topology.PLAN_STREAM)).state.last_seq == deltas_before, "a correction"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    expected = Planner()
    for seq, (_, env) in enumerate(history, 1):
        expected.handle(env, seq)
    shared = SharedPlan()
    for _, env in await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT):
        shared.apply(env.record)
    assert shared.services == expected.plans and len(shared.services) == 5
    code, out, err = await kipvs("replay", "--nats-url", url, capsys=capsys)  # the tool over that history
    assert (code, err) == (0, ""), (code, out, err)
    await nc.close()


async def _large_stream(js, count: int, size: int = 200_000, subjects: int = 50) -> None:
    await js.add_stream(name="BIG", subjects=["big.>"])
    payload = os.urandom(size)
    acks = [await js.publish_async(f"big.{i % subjects}", payload) for i in range(count)]
    await asyncio.gather(*acks)


async def test_reader_reads_every_large_message(url: str) -> None:
    """200 messages of 200 KB (40 MB, five times max_pending) read whole, in order, each once: from the
    start, up to a sequence, from a sequence, one subject, the last per subject."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await _large_stream(js, 200)

    async def seqs(**kw) -> list[int]:
        return [m.metadata.sequence.stream async for m in bus.read_stream(js, bus.LogReader("BIG"), **kw)]

    assert await seqs() == list(range(1, 201))
    assert await seqs(upto=150) == list(range(1, 151))
    assert await seqs(start_seq=120) == list(range(120, 201))
    assert await seqs(subject="big.7") == list(range(8, 201, 50))
    assert await seqs(subject="big.>", deliver=DeliverPolicy.LAST_PER_SUBJECT) == list(range(151, 201))
    await nc.close()


async def test_a_durable_consumer_catches_up_over_large_messages_without_a_slow_consumer_drop(url: str) -> None:
    """A durable consumer asking for 500 messages at its first fetch (the planner's batch) over 100 records
    of 200 KB (20 MB, more than twice max_pending): every fetch is bounded by bytes, so the server never drops
    the client as a slow consumer (which it did: the connection reconnected, and what was lost came back
    after ack_wait), and each message is handled once."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BIG", subjects=["big.>"])
    record = events.encode(rolling_update(1)[2][1])  # an EndpointSlice of 1,000 endpoints, ~200 KB
    assert len(record) > 150_000
    await asyncio.gather(*[await js.publish_async(f"big.{i % 50}", record) for i in range(100)])
    spec = topology.ConsumerSpec("BIG", ConsumerConfig(durable_name="catch-up", ack_policy=AckPolicy.EXPLICIT,
                                                       ack_wait=5.0, deliver_policy=DeliverPolicy.ALL))
    await js.add_consumer("BIG", spec.config)
    seqs: list[int] = []

    async def handle(batch: list[bus.Delivery]) -> None:
        seqs.extend(d.msg.metadata.sequence.stream for d in batch)

    consumer = bus.DurableConsumer(js, spec, "test", handle, batch=500)
    runner = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: len(set(seqs)) == 100, within=60, what="every message handled")
    finally:
        consumer.stop()
        await runner
    info = await js.consumer_info("BIG", "catch-up")
    assert (nc.stats["reconnects"], info.num_redelivered, info.num_ack_pending) == (0, 0, 0)
    assert seqs == list(range(1, 101))
    await nc.close()


async def test_reader_recovers_lost_deliveries_and_a_lost_consumer(url: str) -> None:
    """Messages taken from under the reader (a gap in its consumer's delivery sequence: what a slow-consumer
    drop leaves) and its consumer deleted mid-read: the read starts again after the last message read and
    still yields every message once."""
    nc, thief = await nats.connect(url), await nats.connect(url)
    js = nc.jetstream()
    await _large_stream(js, 120)
    got: list[int] = []
    async for msg in bus.read_stream(js, bus.LogReader("BIG", reader="test-reader")):
        got.append(msg.metadata.sequence.stream)
        if len(got) == 10:  # the reader holds one pull's messages: take the next one from its consumer
            inbox = thief.new_inbox()
            sub = await thief.subscribe(inbox)
            await thief.publish("$JS.API.CONSUMER.MSG.NEXT.BIG.test-reader", b'{"batch": 1}', reply=inbox)
            stolen = await sub.next_msg(10)
            assert stolen.metadata.sequence.stream > 10, stolen.headers
        if len(got) == 60:
            await thief.jetstream().delete_consumer("BIG", "test-reader")
    assert got == list(range(1, 121))
    await nc.close()
    await thief.close()


async def test_a_read_that_cannot_complete_raises(url: str, monkeypatch) -> None:
    """The stream deleted under a read: IncompleteRead naming where it stopped, never a short, quiet end."""
    monkeypatch.setattr(stream_reader, "RETRY_DELAY", 0.05)
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=5)
    await _large_stream(js, 60)
    got = 0
    with pytest.raises(bus.IncompleteRead) as raised:
        async for _ in bus.read_stream(js, bus.LogReader("BIG")):
            got += 1
            if got == 5:
                await js.delete_stream("BIG")
    assert raised.value.last_seq >= 5 and "reading BIG (>) stopped after stream seq" in str(raised.value)
    await nc.close()


async def test_tools_read_large_status_messages_and_a_large_history(url: str, capsys) -> None:
    """``kipvs status`` with 80 status subjects of ~250 KB each (just under KIPVS_STATUS's per-message bound,
    20 MB in all, past the 8 MiB max_pending), ``kipvs tap`` and ``kipvs replay`` over a history of large
    records: they read it all (before: a ConnectionClosedError traceback)."""
    nc = await nats.connect(url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    garbage = os.urandom(topology.STATUS_MAX_MSG - 8_000)
    for i in range(80):
        await js.publish(f"kipvs.status.node-a.junk{i}", garbage)
    report = events.Envelope(id="report/node-b/1", time_ns=time.time_ns(), producer="applier",
                             record=events.ApplyReport(node="node-b", plan_seq=0, operations=0, duration_ms=0.0))
    await js.publish("kipvs.status.node-b.applied", events.encode(report))  # after the junk: read only whole
    code, out, err = await kipvs("status", "--nats-url", url, capsys=capsys)
    assert (code, err) == (0, ""), (code, err)
    assert [line.split()[:3] for line in out.splitlines()[2:]] == [["node-b", "0", "0"]], out

    history = rolling_update(100)
    await _publish(js, history)
    code, out, err = await kipvs("tap", "--nats-url", url, "--stream", "kube,status", "--since", "1", "--no-follow",
                                 "--json", capsys=capsys)
    assert code == 0 and err == "", err
    assert len(out.splitlines()) == len(history) + 81
    await nc.close()


async def test_tap_follow_survives_a_lost_consumer(url: str) -> None:
    """``kipvs tap``'s live follow goes on after its consumer is gone (as after a server restart): it makes
    the consumer again after the last message shown, instead of stalling or ending quietly."""
    from services.tools import tap

    nc = await nats.connect(url)
    js = await bus.setup(nc)
    await js.publish("kipvs.status.node-a.applied", b"first")
    seen: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        async for entry in tap.follow(js, bus.LogReader(topology.STATUS_STREAM), "status", 0):
            await seen.put(entry.raw)

    task = asyncio.create_task(pump())
    try:
        await asyncio.sleep(1.5)  # following from after "first"
        await js.publish("kipvs.status.node-a.applied", b"second")
        assert await asyncio.wait_for(seen.get(), 10) == b"second"
        for info in await js.consumers_info(topology.STATUS_STREAM):
            await js.delete_consumer(topology.STATUS_STREAM, info.name)
        await js.publish("kipvs.status.node-a.applied", b"third")
        assert await asyncio.wait_for(seen.get(), 15) == b"third"
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


async def test_a_rebuild_short_of_the_ack_floor_publishes_nothing(url: str, kipvs_log: _Lines,
                                                                  monkeypatch) -> None:
    """The planner's own check, whatever the reader does: a rebuild whose read of the log ends early (as the
    old reader's did) is an IncompleteRead, the planner is not ready and publishes no correction; once the
    log reads whole again, it rebuilds from every record and goes on."""
    history = rolling_update(3, replicas=10)
    nc = await nats.connect(url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await _publish(js, history)
    task, stop = await _planner_ready(kipvs_log, url)
    deadline = time.monotonic() + 60
    while (await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)).ack_floor.stream_seq < len(history):
        assert time.monotonic() < deadline, "the planner never planned the history"
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 60)
    deltas_before = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq

    whole = bus.read_stream

    async def short(js_, stream, *args, **kw):  # the kube log read stops after 3 records, quietly
        n = 0
        async for msg in whole(js_, stream, *args, **kw):
            n += 1
            if stream.stream == topology.KUBE_STREAM and n > 3:
                return
            yield msg

    monkeypatch.setattr(bus, "read_stream", short)
    kipvs_log.lines.clear()
    cfg = config.load(PlannerServiceConfig, {"nats_url": url, "http_listen": "", "batch": 10}, {})
    task, stop = start_service("planner", cfg, plan)
    try:
        await eventually(lambda: any("IncompleteRead" in line and "log record 4 was not read" in line
                                     for line in kipvs_log.lines), 60, "the rebuild to be refused")
        assert "planner is ready" not in kipvs_log.lines, kipvs_log.lines
        assert (await js.stream_info(topology.PLAN_STREAM)).state.last_seq == deltas_before, "a correction"
        monkeypatch.setattr(bus, "read_stream", whole)
        await eventually(lambda: "planner is ready" in kipvs_log.lines, 60, "the planner to rebuild whole")
        assert any(line.startswith(f"rebuilt state from {len(history)} logged records") for line in kipvs_log.lines)
        await asyncio.sleep(0.5)
        assert (await js.stream_info(topology.PLAN_STREAM)).state.last_seq == deltas_before, "a correction"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await nc.close()
