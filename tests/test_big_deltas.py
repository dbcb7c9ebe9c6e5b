"""Plan deltas over NATS's max_payload (issue 21, High 3), with real servers: the issue's Service (100 ports x
1,000 endpoints, a 3.6 MB delta) reaches a node and later changes still flow; a planner restarted while it
was publishing a chunked delta neither loses nor repeats one; a missing part makes the applier re-bootstrap,
never apply half; the tools show the delta whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.core import Planner
from services.planner.fence import raise_fence
from services.planner.publisher import BATCH_ID, PlanPublisher
from services.planner.service_config import PlannerServiceConfig
from shared.contract import delta_chunks, events, topology
from shared.messaging import bus, jetstream_pull, plan_log
from shared.messaging.embedded_nats import free_loopback_port
from shared.plan.plan_state import SharedPlan
from shared.service import config
from tests import kube
from tests.helpers import eventually, kipvs, start_service
from tests.logread import parked_reasons, read_stream
from tests.stack import start_stack
from tests.test_delta_chunks import LIMIT, big_delta, big_service

BIG_VIP = "10.96.50.50"


def big_reals(kernel: MemoryKernel) -> int:
    return sum(len(vs.reals) for key, vs in kernel.ipvs.items() if key[1] == BIG_VIP)


async def test_the_issues_service_reaches_the_node_whole_and_later_changes_flow(nats_url: str, sim, tmp_path: Path,
                                                                               capsys) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        await stack.sim.apply(kube.node("node-a", "192.0.2.10"))
        for env in big_service():
            await stack.sim.apply(env.record.object)
        await eventually(lambda: big_reals(stack.kernel) == 100_000, within=120, what="the 100 x 1,000 Service")
        assert len([k for k in stack.kernel.ipvs if k[1] == BIG_VIP]) == 100
        await stack.sim.apply(kube.service("later", cluster_ip="10.96.0.99"))
        await eventually(lambda: ("TCP", "10.96.0.99", 80) in stack.kernel.ipvs, within=60, what="a later change")
        await stack.settled()
        nc = await nats.connect(nats_url)
        try:
            stored = [env.record for _, env in await read_stream(nc.jetstream(), topology.PLAN_STREAM,
                                                                  topology.PLAN_ALL_SUBJECT)]
        finally:
            await nc.close()
        parts = [r for r in stored if isinstance(r, events.PlanDeltaChunk)]
        assert len(parts) == 4 and {p.seq for p in parts} == {parts[0].seq}, "the big delta went out in 4 parts"

        # The tools show one whole delta: tap prints it as a delta, and the kernel view finds no difference
        # between the node and the published plan (snapshot + deltas, chunked ones put together).
        code, out, err = await kipvs("tap", "--nats-url", nats_url, "--stream", "plan", "--since", "1",
                                     "--no-follow", capsys=capsys)
        assert code == 0, err
        big = [line for line in out.splitlines() if "set-service default/big" in line and "-> 1000 endpoints" in line]
        assert len(big) == 1 and f"seq={parts[0].seq}" in big[0] and big[0].count("-> 1000 endpoints") == 100, out
        assert "part 1 of" not in out
        code, out, err = await kipvs("replay", "--nats-url", nats_url, capsys=capsys)
        assert code == 0 and "identical" in out, out + err
        code, out, err = await kipvs("plan", "--node", "node-a", "--nats-url", nats_url, capsys=capsys)
        assert code == 0 and sum(1 for line in out.splitlines() if line.startswith(f"-A -t {BIG_VIP}:")) == 100, err
        # the node's table (100,000 real servers: a reply in parts) against the published plan
        code, out, err = await kipvs("ipvs", "--node", "node-a", "--diff", "--nats-url", nats_url, "--timeout", "20",
                                     capsys=capsys)
        assert code == 0 and "0 differences" in err, out + err
    finally:
        await stack.close()


async def _planner_log(js, items: list[events.Envelope]) -> None:
    for env in items:
        r = env.record
        await bus.publish(js, topology.kube_object_subject(r.kind, r.namespace, r.name), env)


async def test_a_planner_restarted_mid_chunk_publish_neither_repeats_nor_loses(nats_url: str) -> None:
    """The log holds a small Service, then the big one. A previous planner published delta 1 and the first two
    parts of the big delta 2, then died before its batch was acked: the consumer delivered both events, acked
    the first. The new planner publishes the big delta's missing parts only (the first two are the same
    messages: the server drops them as duplicates) and goes on."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    small = big_service(ports=1, endpoints=1, name="small", cluster_ip="10.96.0.10")[0]
    log = [small, *big_service()]
    await _planner_log(js, log)
    expected = Planner()
    deltas = [d for seq, env in enumerate(log, 1) for d in expected.handle(env, seq)]
    assert [d.record.seq for d in deltas] == [1, 2, 3]
    big = delta_chunks.split(deltas[2], LIMIT)
    assert len(big) == 4
    for env in [deltas[0], deltas[1], *big[:2]]:
        await bus.publish(js, topology.PLAN_ALL_SUBJECT, env)
    # A node bootstrapping now reads deltas 1 and 2 and must start its consumer at the big delta's part 1.
    read = SharedPlan()
    assert await plan_log.catch_up_to(js, bus.LogReader(topology.PLAN_STREAM), read, 0) == (2, 2) and read.seq == 2
    sub = await js.pull_subscribe_bind(durable=topology.PLANNER_CONSUMER, stream=topology.KUBE_STREAM)
    taken = await sub.fetch(3, timeout=5)
    for msg in taken[:2]:
        await msg.ack_sync()  # the third (the big slice) stays delivered but unacked
    await sub.unsubscribe()

    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": ""}, {})
    task, stop = start_service("planner", cfg, plan)
    try:
        async def count() -> int:
            return (await js.stream_info(topology.PLAN_STREAM)).state.messages

        for _ in range(600):
            if await count() >= 6:
                break
            await asyncio.sleep(0.05)
        later = big_service(ports=1, endpoints=1, name="later", cluster_ip="10.96.0.11")[0]
        later = events.Envelope(id="Service/default/later@900", time_ns=9, producer="test", record=later.record)
        await _planner_log(js, [later])
        for _ in range(600):
            if await count() >= 7:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a repeat would land now
    finally:
        stop.set()
        await task
    stored = await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)
    ids = [env.id for _, env in stored]
    assert ids == [deltas[0].id, deltas[1].id, *(p.id for p in big), "plan/all/4"], ids
    shared = SharedPlan()
    assembler = delta_chunks.Assembler()
    for _, env in stored:
        whole = assembler.feed(env) if isinstance(env.record, events.PlanDeltaChunk) else env
        if whole is not None:
            assert shared.apply(whole.record)
    assert shared.seq == 4 and len(shared.services["default/big"].ports) == 100
    assert "default/later" in shared.services
    await nc.close()


async def test_a_missing_part_re_bootstraps_the_applier_never_half_applied(nats_url: str, capfd) -> None:
    """A part of the big delta is gone from the stream (deleted by hand): the applier never programs any of
    that delta from its parts; it re-bootstraps, and reaches it whole from the snapshot once one covers it."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    planner = Planner()
    log = [big_service(ports=1, endpoints=1, name="small", cluster_ip="10.96.0.10")[0], *big_service()]
    deltas = [d for seq, env in enumerate(log, 1) for d in planner.handle(env, seq)]
    for env in deltas[:2]:
        await bus.publish(js, topology.PLAN_ALL_SUBJECT, env)
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a",
                                      "backend": "memory", "healthz_bind_address": ""}, {})
    task, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    try:
        await eventually(lambda: ("TCP", "10.96.0.10", 1000) in kernel.ipvs, what="the small Service")
        parts = delta_chunks.split(deltas[2], LIMIT)
        for part in (parts[0], parts[2], parts[3]):  # part 2 is missing
            await bus.publish(js, topology.PLAN_ALL_SUBJECT, part)
        said: list[str] = []

        def logged() -> bool:
            said.append(capfd.readouterr().err)
            return "part 2 is missing: re-bootstrapping from the latest snapshot" in "".join(said)

        await eventually(logged, what="the gap")
        await asyncio.sleep(1.0)
        assert big_reals(kernel) == 0, "half a delta was applied"
        # The planner's next snapshot covers the big delta: the next re-bootstrap reaches it whole.
        snap = planner.snapshot(plan_stream_seq=(await js.stream_info(topology.PLAN_STREAM)).state.last_seq)
        store = await js.object_store(topology.SNAPSHOT_BUCKET)
        await store.put(topology.snapshot_object("all"), events.encode(events.Envelope(
            id="snapshot/all/3", time_ns=1, producer="test", record=snap)))
        later = big_service(ports=1, endpoints=1, name="later", cluster_ip="10.96.0.11")[0]
        later = events.Envelope(id="Service/default/later@900", time_ns=9, producer="test", record=later.record)
        for env in planner.handle(later, 4):
            await bus.publish(js, topology.PLAN_ALL_SUBJECT, env)
        await eventually(lambda: big_reals(kernel) == 100_000, within=60, what="the big delta from the snapshot")
    finally:
        stop.set()
        await task
        await nc.close()


async def test_a_delta_the_stream_refuses_is_parked_not_ready_and_never_skipped(nats_url: str) -> None:
    """An operator limits KIPVS_PLAN's message size (max_msg_size) below anything a delta fits in: the stream
    refuses the first delta. The planner parks it once with the reason, is not ready, and publishes nothing
    after it (skipping it would desynchronise the nodes). Raised to 100 kB, the planner publishes it and the
    rest in order by itself, the big delta in parts that fit the stream's limit."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    port = free_loopback_port()
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": f"127.0.0.1:{port}"}, {})
    task, stop = start_service("planner", cfg, plan)
    try:
        await eventually_ready(port, True)
        info = await js.stream_info(topology.PLAN_STREAM)
        info.config.max_msg_size = 1000
        await js.update_stream(info.config)
        later = big_service(ports=1, endpoints=1, name="later", cluster_ip="10.96.0.11")[0]
        await _planner_log(js, [*big_service(), events.Envelope(id="Service/default/later@900", time_ns=9,
                                                                producer="test", record=later.record)])
        await eventually_ready(port, False)
        for _ in range(600):
            if await parked_reasons(js):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # several more tries: still parked once, still nothing published
        reasons = await parked_reasons(js)
        assert len(reasons) == 1 and reasons[0].startswith("delta plan/all/1 cannot be published: "), reasons
        assert await read_stream(js, topology.PLAN_STREAM) == []
        assert not await eventually_ready(port, True, within=0.5, fail=False)
        info.config.max_msg_size = 100_000
        await js.update_stream(info.config)
        await eventually_ready(port, True)
        for _ in range(600):
            ids = [env.id for _, env in await read_stream(js, topology.PLAN_STREAM)]
            if ids[-1:] == ["plan/all/3"]:
                break
            await asyncio.sleep(0.05)
        parts = len(ids) - 2
        assert parts > 36 and ids == ["plan/all/1", *(f"plan/all/2/part/{i}-of-{parts}" for i in range(1, parts + 1)),
                                      "plan/all/3"], ids
    finally:
        stop.set()
        await task
        await nc.close()


async def eventually_ready(port: int, ready: bool, within: float = 60.0, fail: bool = True) -> bool:
    """Wait until the planner's /readyz says ``ready``; False (or a failed test with ``fail``) when it does not."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
                if (r.status == 200) == ready:
                    return True
        except aiohttp.ClientError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            assert not fail, f"the planner never became {'' if ready else 'not '}ready"
            return False
        await asyncio.sleep(0.1)


async def test_behind_the_fence_a_chunked_delta_is_one_atomic_batch(nats_url: str) -> None:
    """With --leader-elect every publish is an atomic batch behind the planner's fence: the big delta's parts
    go in one batch (never split over two, so no reader finds half of it), and a deposed planner's chunked
    delta is refused whole."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    try:
        planner = Planner()
        log = [big_service(ports=1, endpoints=1, name="small", cluster_ip="10.96.0.10")[0], *big_service()]
        deltas = [d for seq, env in enumerate(log, 1) for d in planner.handle(env, seq)]
        fence = await raise_fence(js, "planner-a", 1, lambda: True)
        publisher = PlanPublisher(js, {}, fence, asyncio.Event(), nc)
        publisher.add(deltas)
        assert await publisher.flush() == 3
        msgs = [m async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]
        assert [events.decode(m.data).id for m in msgs] == [
            "plan/all/1", "plan/all/2", *(f"plan/all/3/part/{i}-of-4" for i in range(1, 5))]
        batches = [m.headers[BATCH_ID] for m in msgs]
        assert len(set(batches[2:])) == 1  # the parts in one atomic batch (here with the small deltas: 4 MB)
        assert publisher.published == {"all": 3} and publisher.stream_seq == msgs[-1].metadata.sequence.stream
        # Another planner takes over; the old one's next chunked delta is refused whole at the server.
        await raise_fence(js, "planner-b", 2, lambda: True)
        stale = PlanPublisher(js, {"all": (3, 0)}, fence, asyncio.Event(), nc)
        stale._check_fence = lambda: asyncio.sleep(0, fence.headers())  # type: ignore[method-assign]
        bigger = big_service(endpoints=1100)[1]
        stale.add(planner.handle(events.Envelope(id="EndpointSlice/default/big-x@900", time_ns=9, producer="test",
                                                 record=bigger.record), 4))
        with pytest.raises(bus.Retry, match="another planner took over"):
            await stale.flush()
        after = [m async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]
        assert len(after) == len(msgs)
    finally:
        await nc.close()


async def test_a_consumer_handed_large_messages_fetches_fewer_at_a_time(nats_url: str) -> None:
    """Parts of chunked deltas are ~1 MiB: a consumer asking for 500 of them would be handed far more than the
    server's max_pending. Every fetch, the first too, is bounded by bytes: about 4 MiB plus one max payload."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    try:
        spec = topology.ConsumerSpec(topology.PLAN_STREAM, ConsumerConfig(
            durable_name="big-reader", filter_subject=topology.PLAN_ALL_SUBJECT, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL))
        await js.add_consumer(topology.PLAN_STREAM, spec.config)
        parts = delta_chunks.split(big_delta(), LIMIT)
        for i in range(10):  # 40 parts of ~1 MiB
            for part in parts:
                part = msgspec.structs.replace(part, id=f"{part.id}/{i}")
                await bus.publish(js, topology.PLAN_ALL_SUBJECT, part)
        sizes: list[int] = []
        fetched: list[int] = []  # bytes per batch

        async def handle(batch: list[bus.Delivery]) -> None:
            sizes.append(len(batch))
            fetched.append(sum(len(d.msg.data) for d in batch))

        consumer = bus.DurableConsumer(js, spec, "test", handle, batch=500)
        runner = asyncio.create_task(consumer.run())
        await eventually(lambda: sum(sizes) == 40, what="40 parts")
        consumer.stop()
        await runner
        assert max(fetched) <= jetstream_pull.PULL_MAX_BYTES + nc.max_payload, (sizes, fetched)
        assert max(sizes) > 1, sizes  # bounded by bytes, not one at a time
    finally:
        await nc.close()
