"""NATS restarted with a wiped store while every service runs (issue 21, High 6): the streams come back
empty, declared again by the services (an open server: each declares the topology, as at its start). Every
service must notice that the streams it holds positions in were replaced and start again from the new ones:
the watcher relists and logs everything, the planner rebuilds and publishes from delta 1, the applier
bootstraps from the new plan. Before the fix the planner skipped every new record at or below its old
position and the applier's consumer started past the new stream's end: no change reached a node."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats

from kipvs.shared import topology
from kipvs.simulator.server import Simulator
from tests import kube
from tests.conftest import NatsServer
from tests.helpers import eventually, kipvs
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
