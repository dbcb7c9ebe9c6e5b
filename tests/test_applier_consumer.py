"""The applier's durable consumer on a real nats-server (issue 17; ``--plan-feed consumer`` since issue 27, and
what a plan stream without the republish gets): it starts where the bootstrap stopped reading, never at the
beginning of the plan stream; when it is lost (deleted under a running applier, or gone with the server that
held it in memory) the applier creates it again from the last sequence it applied, converges, and never
reports an older plan than one it reported before."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import topology
from shared.messaging import bus
from shared.service import config
from tests import kube
from tests.conftest import NatsServer
from tests.helpers import eventually, publish_kube, start_service
from tests.logread import read_stream


def _services(first: int, count: int, version: int) -> list[str]:
    lines = []
    for i in range(first, first + count):
        svc = kube.service(f"s{i}", cluster_ip=f"10.96.7.{i}")
        svc["metadata"]["resourceVersion"] = str(version + i)
        lines.append(json.dumps({"type": "ADDED", "object": svc}))
    return lines


def _has(kernel: MemoryKernel, first: int, count: int) -> bool:
    return kernel.ipsets is not None and all(("TCP", f"10.96.7.{i}", 80) in kernel.ipvs
                                             for i in range(first, first + count))


async def _applied_seqs(js, node: str) -> list[int]:
    return [env.record.plan_seq for _, env in await read_stream(js, topology.STATUS_STREAM,
                                                                 topology.status_subject(node, "applied"))]


async def _new_consumer(js, name: str, within: float = 30.0):
    """The consumer's info once the applier has (re)created it from a start sequence."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            info = await js.consumer_info(topology.PLAN_STREAM, name)
            if info.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE:
                return info
        except nats.js.errors.NotFoundError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"{name} was not created from a start sequence"
        await asyncio.sleep(0.05)


async def test_a_new_nodes_consumer_starts_after_what_its_bootstrap_read(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_task, planner_stop = start_service(
        "planner", config.load(PlannerServiceConfig, {**common, "snapshot_every": "5"}, {}), plan)
    await publish_kube(js, _services(1, 12, 100), "first")

    async def plan_all_seq() -> int:
        try:
            return (await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)).seq
        except nats.js.errors.NotFoundError:
            return 0

    last = 0
    for _ in range(600):  # the planner has published all twelve Services (one delta each, maybe batched)
        last = await plan_all_seq()
        plan_now = await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)
        keys = {op.service.key for _, env in plan_now for op in env.record.ops if hasattr(op, "service")}
        if len(keys) >= 12:
            break
        await asyncio.sleep(0.05)
    assert last > 1
    # What an older kipvs left: the node's durable from the beginning of the plan stream.
    await js.add_consumer(topology.PLAN_STREAM, ConsumerConfig(
        durable_name="applier-node-b", filter_subjects=[topology.PLAN_ALL_SUBJECT,
                                                        topology.plan_node_subject("node-b")],
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))

    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {**common, "node": "node-b", "backend": "memory", "plan_feed": "consumer"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    try:
        await eventually(lambda: _has(kernel, 1, 12), what="node-b's bootstrap")
        info = await _new_consumer(js, "applier-node-b")
        assert info.config.opt_start_seq == last + 1, "the consumer must start after what the bootstrap read"
        # Nothing the bootstrap had read is delivered again (the old consumer would have sent all of it).
        assert info.delivered.consumer_seq == 0 and info.num_pending == 0
        assert info.config.num_replicas == 1 and info.config.mem_storage is True
        # Changes after the bootstrap come through the consumer.
        await publish_kube(js, _services(13, 3, 200), "second")
        await eventually(lambda: _has(kernel, 13, 3), what="node-b's live changes")
    finally:
        stop.set()
        planner_stop.set()
        await applier
        await planner_task
        await nc.close()


async def test_a_lost_consumer_is_created_again_and_the_node_never_goes_back(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store")
    server.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": server.url, "http_listen": ""}
    planner_task, planner_stop = start_service(
        "planner", config.load(PlannerServiceConfig, {**common, "snapshot_every": "4"}, {}), plan)
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "plan_feed": "consumer"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    try:
        await publish_kube(js, _services(1, 5, 100), "first")
        await eventually(lambda: _has(kernel, 1, 5), what="the first Services")

        # An operator (or the bus) deletes the consumer under the running applier.
        await js.delete_consumer(topology.PLAN_STREAM, "applier-node-a")
        await publish_kube(js, _services(6, 5, 200), "second")
        await eventually(lambda: _has(kernel, 6, 5), within=90, what="changes after the consumer was deleted")
        info = await _new_consumer(js, "applier-node-a")
        assert info.config.opt_start_seq > 1

        # The server restarts: a consumer held in memory does not survive it.
        server.stop()
        server.start()
        await eventually(lambda: nc.is_connected, what="the test's reconnection")
        for _ in range(120):  # JetStream takes a moment to come back; the ids make a repeat harmless
            try:
                await publish_kube(js, _services(11, 5, 300), "third")
                break
            except nats.errors.Error:
                await asyncio.sleep(0.5)
        await eventually(lambda: _has(kernel, 11, 5), within=120, what="changes after the server restarted")

        seqs = await _applied_seqs(js, "node-a")
        assert seqs == sorted(seqs), f"a report went back to an older plan: {seqs}"
        assert len(kernel.ipvs) == 15
    finally:
        stop.set()
        planner_stop.set()
        await applier
        await planner_task
        await nc.close()
        server.stop()


async def test_the_consumers_server_dies_and_the_node_moves_on(tmp_path: Path) -> None:
    """Three servers, R3 streams; the server holding node-a's consumer (one replica) is killed: the
    applier creates its consumer again on a live server and goes on from the last sequence it applied."""
    from tests.bench.fleet import Cluster

    cluster = Cluster(tmp_path)
    cluster.start()
    await cluster.ready()
    nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = await bus.setup(nc, 3, consumers=[topology.planner_consumer()])
    common = {"nats_url": cluster.url, "http_listen": "", "nats_replicas": "3"}
    planner_task, planner_stop = start_service(
        "planner", config.load(PlannerServiceConfig, {**common, "snapshot_every": "4"}, {}), plan)
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "plan_feed": "consumer"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    try:
        await publish_kube(js, _services(1, 5, 100), "first")
        await eventually(lambda: _has(kernel, 1, 5), within=90, what="the first Services")
        info = await _new_consumer(js, "applier-node-a")
        holder = int(info.cluster.leader.removeprefix("n"))
        cluster.procs[holder].kill()
        cluster.procs[holder].wait(10)
        for _ in range(240):  # the streams elect new leaders on the two servers left
            try:
                await publish_kube(js, _services(6, 5, 200), "second")
                break
            except nats.errors.Error:
                await asyncio.sleep(0.5)
        await eventually(lambda: _has(kernel, 6, 5), within=150, what="changes after the consumer's server died")
        moved = await _new_consumer(js, "applier-node-a")
        assert moved.cluster.leader != f"n{holder}"
        seqs = await _applied_seqs(js, "node-a")
        assert seqs == sorted(seqs), f"a report went back to an older plan: {seqs}"
    finally:
        stop.set()
        planner_stop.set()
        await applier
        await planner_task
        await nc.close()
        cluster.stop()
