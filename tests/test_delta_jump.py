"""A shared plan delta whose sequence jumps (an admin's publish, not the planner's) makes a node re-bootstrap
once, find that nothing published explains the jump, and park the delta with the reason; the planner's
deltas after it go on reaching the node (issue 21, medium: it re-bootstrapped three times a second, forever)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats

from services.applier.shell import Applier
from services.harness.simulator.server import Simulator
from shared.contract import events, topology
from shared.messaging import bus
from tests import kube
from tests.helpers import eventually
from tests.stack import start_stack


async def _parked_reasons(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        reasons = []
        async for msg in bus.read_stream(nc.jetstream(), bus.LogReader(topology.PARKED_STREAM)):
            reasons.append((msg.headers or {}).get(topology.PARK_REASON, ""))
        return reasons
    finally:
        await nc.close()


async def test_a_delta_with_a_sequence_jump_is_parked_not_retried_forever(nats_url: str, sim: Simulator,
                                                                         tmp_path: Path, monkeypatch) -> None:
    bootstraps: list[float] = []
    real_bootstrap = Applier.bootstrap

    async def counted(self: Applier) -> None:
        bootstraps.append(time.monotonic())
        await real_bootstrap(self)

    monkeypatch.setattr(Applier, "bootstrap", counted)
    await sim.apply(kube.node("node-a", "192.0.2.10"))
    await sim.apply(kube.service("web-0", cluster_ip="10.96.0.10"))
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        settled = await stack.settled()
        seq = int(settled.value("kipvs_applier_plan_seq"))
        nc = await nats.connect(nats_url)
        try:
            bogus = events.Envelope(id="admin/jump", time_ns=time.time_ns(), producer="admin",
                                    record=events.PlanDelta(scope="all", seq=seq + 50, source_seq=0, ops=()))
            await bus.publish(nc.jetstream(), topology.PLAN_ALL_SUBJECT, bogus)
        finally:
            await nc.close()
        await asyncio.sleep(4)  # long enough for a dozen re-bootstraps at the old pace
        assert len(bootstraps) == 2, f"{len(bootstraps) - 1} re-bootstraps for one bad delta"
        reasons = await _parked_reasons(nats_url)
        assert any(f"plan delta {seq + 50} jumps past delta {seq + 1}" in r for r in reasons), reasons
        await sim.apply(kube.service("web-1", cluster_ip="10.96.0.11"))
        await eventually(lambda: any(vs.ip == "10.96.0.11" for vs in stack.kernel.ipvs.values()), 60,
                         "the planner's next delta on node-a")
    finally:
        await stack.close()
