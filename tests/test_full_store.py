"""A full JetStream store (issue 13): a real nats-server whose file store is capped, the real watcher
(against the simulator), planner and applier. While the store is full nothing crashes, nothing valid is
parked, the planner does not claim to be ready; once the store is enlarged (the server restarted with a
larger limit, as an operator would) everything converges to `kipvs plan`'s answer, and every service
stops on request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import nats
import pytest

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from services.planner.service_config import PlannerServiceConfig
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.plan.resolve import resolve_node
from shared.service import config
from tests import kube
from tests.helpers import start_service, wait_port
from tests.logread import parked_reasons
from tests.test_watcher import kube_events, kubeconfig_for, start_watcher


class CappedNats:
    """nats-server with JetStream's file store capped at ``limit`` bytes (its own config file)."""

    def __init__(self, store: Path) -> None:
        self.store, self.port = store, free_loopback_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, limit: str) -> None:
        conf = self.store.parent / f"nats-{limit}.conf"
        conf.write_text(f"listen: 127.0.0.1:{self.port}\njetstream {{ store_dir: {json.dumps(str(self.store))}, "
                        f"max_file_store: {limit}, max_memory_store: 64MB }}\n")
        self.proc = subprocess.Popen([server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@pytest.fixture
def capped(tmp_path: Path):
    server = CappedNats(tmp_path / "store")
    server.start("600KB")
    yield server
    server.stop()


def _fat_service(i: int) -> dict:
    svc = kube.service(f"fat-{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}")
    svc["metadata"]["annotations"] = {"note": "x" * 3000}  # fills the store quickly
    return svc


async def test_full_store_nothing_crashes_nothing_valid_is_parked_and_it_converges(capped: CappedNats, sim,
                                                                                   tmp_path: Path) -> None:
    await sim.apply(kube.node("node-a", "192.0.2.1"))
    watcher = start_watcher(capped.url, kubeconfig_for(sim, tmp_path))
    common = {"nats_url": capped.url, "http_listen": ""}
    planner_task, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    kernel = MemoryKernel()
    applier_cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
    applier_task, applier_stop = start_service("applier", applier_cfg, lambda ctx: apply_plan(ctx, kernel))
    for i in range(400):  # far more than the capped store holds
        await sim.apply(_fat_service(i))
    await asyncio.sleep(8)  # the store fills; every service meets refused writes
    for name, task in (("watcher", watcher.task), ("planner", planner_task), ("applier", applier_task)):
        assert not task.done(), f"the {name} died on a full store: {task.exception() if task.done() else ''}"

    # The operator enlarges the store: the server restarts with a larger limit, same store, same port.
    capped.stop()
    capped.start("256MB")
    objects = [json.dumps({"type": "ADDED", "object": o}) for o in
               [kube.node("node-a", "192.0.2.1"), *(_fat_service(i) for i in range(400))]]
    want = resolve_node(plan_events(read_events(objects, "x"), PlannerConfig()).plans.values(),
                        plan_events(read_events(objects[:1], "x"), PlannerConfig()).nodes["node-a"])
    deadline = time.monotonic() + 60
    while set(kernel.ipvs) != set(want.ipvs):
        assert time.monotonic() < deadline, f"node-a holds {len(kernel.ipvs)} of {len(want.ipvs)} services"
        for name, task in (("watcher", watcher.task), ("planner", planner_task), ("applier", applier_task)):
            assert not task.done(), f"the {name} died after the store was enlarged"
        await asyncio.sleep(0.5)
    logged = {r.name for r in await kube_events(capped.url) if r.kind == "Service"}
    assert logged == {f"fat-{i}" for i in range(400)}, "every change reached the log"
    nc = await nats.connect(capped.url)
    reasons = await parked_reasons(nc.jetstream())
    await nc.close()
    assert reasons == [], f"valid input was parked: {reasons[:3]}"
    started = time.monotonic()
    applier_stop.set()
    planner_stop.set()
    await asyncio.wait_for(asyncio.gather(applier_task, planner_task, watcher.close()), 60)
    assert time.monotonic() - started < 60, "every service stops on request"
