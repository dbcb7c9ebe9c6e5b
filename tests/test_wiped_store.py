"""NATS restarted with a wiped store while every service runs (issue 21, High 6): the streams come back
empty, declared again by the services (an open server: each declares the topology, as at its start). Every
service must notice that the streams it holds positions in were replaced and start again from the new ones:
the watcher relists and logs everything, the planner rebuilds and publishes from delta 1, the applier
bootstraps from the new plan. Before the fix the planner skipped every new record at or below its old
position and the applier's consumer started past the new stream's end: no change reached a node."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import nats

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.harness.simulator.server import Simulator
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port
from shared.service import config
from tests import kube
from tests.conftest import NatsServer
from tests.helpers import eventually, kipvs, publish_kube, start_service
from tests.stack import start_stack


def _vips(kernel) -> set[str]:
    return {vs.ip for vs in kernel.ipvs.values() if vs.port == 80}


async def test_a_wiped_store_is_detected_and_every_node_converges_again(sim: Simulator, tmp_path: Path,
                                                                      capsys) -> None:
    server = NatsServer(tmp_path / "store")
    server.start()
    stack = None
    try:
        await sim.apply(kube.node("node-a", "192.0.2.10"))
        for i in range(3):
            await sim.apply(kube.service(f"web-{i}", cluster_ip=f"10.96.0.{10 + i}"))
        stack = await start_stack(server.url, sim, tmp_path)
        await eventually(lambda: _vips(stack.kernel) == {"10.96.0.10", "10.96.0.11", "10.96.0.12"}, 60,
                         "node-a programmed from the first store")
        await stack.settled()

        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        shutil.rmtree(server.store)
        server.start()
        # Not green while the nodes hold the old plan: the streams are gone, or empty with nothing planned.
        code, out, err = await kipvs("status", "--nats-url", server.url, capsys=capsys)
        assert code != 0 and "Traceback" not in err, (out, err)
        # The API changes while (and after) the store is gone: the new log must carry them to the node.
        await sim.delete("Service", "default", "web-0")
        await sim.apply(kube.service("web-3", cluster_ip="10.96.0.13"))
        want = {"10.96.0.11", "10.96.0.12", "10.96.0.13"}
        await eventually(lambda: _vips(stack.kernel) == want, 90, "node-a programmed from the new store")

        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            kube_info = await js.stream_info(topology.KUBE_STREAM)
            planner = await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
            assert planner.ack_floor.stream_seq <= kube_info.state.last_seq
            # Exactly once in the new plan stream: every shared delta from 1, once, in order.
            seqs = [events.decode(m.data).record.seq
                    async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]
            assert seqs == list(range(1, len(seqs) + 1)), seqs
        finally:
            await nc.close()
        settled = await stack.settled()
        assert settled.value("kipvs_applier_plan_seq") < 20, "the new plan stream starts again from delta 1"

        async def status_ok() -> bool:
            code, _, _ = await kipvs("status", "--nats-url", server.url, "--max-lag", "60", capsys=capsys)
            return code == 0

        deadline = asyncio.get_running_loop().time() + 30
        while not await status_ok():
            assert asyncio.get_running_loop().time() < deadline, "kipvs status never went green again"
            await asyncio.sleep(0.5)
    finally:
        if stack is not None:
            await stack.close()
        server.stop()


async def test_a_replaced_plan_stream_is_red_in_status_and_nodes_bootstrap_from_it(nats_url: str, sim: Simulator,
                                                                                 tmp_path: Path, capsys) -> None:
    """KIPVS_PLAN deleted and declared again (a store restored without it, an operator's mistake) while the
    snapshot bucket and the status stream are kept: ``kipvs status`` is red until the node holds the new
    plan, and a node that bootstraps before the planner has rewritten the snapshot does not take the old
    snapshot for the new stream's (it started its consumer past every new delta: no change reached it)."""
    await sim.apply(kube.node("node-a", "192.0.2.10"))
    for i in range(2):
        await sim.apply(kube.service(f"web-{i}", cluster_ip=f"10.96.0.{10 + i}"))
    stack = await start_stack(nats_url, sim, tmp_path)
    await eventually(lambda: _vips(stack.kernel) == {"10.96.0.10", "10.96.0.11"}, 60, "node-a programmed")
    await stack.settled()
    await stack.close()
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_stream(topology.PLAN_STREAM)
        js = await bus.setup(nc, consumers=[topology.planner_consumer()])  # what 'kipvs topology apply' does
        code, out, _ = await kipvs("status", "--nats-url", nats_url, capsys=capsys)
        assert code == 1 and "the plan stream was replaced" in out, out

        kernel = MemoryKernel()
        port = free_loopback_port()
        applier_cfg = config.load(ApplierConfig, {"nats_url": nats_url, "node": "node-a", "backend": "memory",
                                                  "http_listen": f"127.0.0.1:{port}", "healthz_bind_address": ""}, {})
        applier, applier_stop = start_service("applier", applier_cfg, lambda ctx: apply_plan(ctx, kernel))
        planner: asyncio.Task | None = None
        try:
            await _until_ready(port)  # bootstrapped before any planner runs: from the stream, not the old snapshot
            planner_cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": ""}, {})
            planner, planner_stop = start_service("planner", planner_cfg, plan)
            await publish_kube(js, [json.dumps({"type": "ADDED", "object": kube.service("web-2",
                                                                                      cluster_ip="10.96.0.12")})],
                               "after-restore")
            await eventually(lambda: _vips(kernel) == {"10.96.0.10", "10.96.0.11", "10.96.0.12"}, 60,
                             "node-a programmed from the new plan stream")
            deadline = asyncio.get_running_loop().time() + 30
            while (await kipvs("status", "--nats-url", nats_url, capsys=capsys))[0] != 0:
                assert asyncio.get_running_loop().time() < deadline, "kipvs status never went green again"
                await asyncio.sleep(0.5)
        finally:
            applier_stop.set()
            if planner is not None:
                planner_stop.set()
            await asyncio.wait_for(asyncio.gather(applier, *([planner] if planner else [])), 30)
    finally:
        await nc.close()


async def _until_ready(port: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "the applier never became ready"
        await asyncio.sleep(0.1)
