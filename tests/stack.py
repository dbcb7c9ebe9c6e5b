"""The whole pipeline in this process for tests that read its metrics: the Kubernetes API simulator, the
watcher, the planner and node-a's applier (memory kernel) on a real nats-server, each serving its own
/metrics on a loopback port; scrapes parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.harness.simulator.server import Simulator
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from services.watcher.main import WatcherConfig, watch
from shared.contract import topology
from shared.messaging.embedded_nats import free_loopback_port
from shared.service import config, runtime


@dataclass
class Scrape:
    """One /metrics answer: sample name -> [(labels, value)], and the families as parsed."""

    text: str
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)  # family name -> type

    @classmethod
    def parse(cls, text: str) -> Scrape:
        out = cls(text)
        for family in text_string_to_metric_families(text):
            out.families[family.name] = family.type
            for s in family.samples:
                out.samples.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with these labels (AssertionError naming it when absent)."""
        for have, value in self.samples.get(name, []):
            if all(have.get(k) == v for k, v in labels.items()):
                return value
        raise AssertionError(f"no sample {name}{labels or ''} in the scrape")


@dataclass
class Stack:
    sim: Simulator
    kernel: MemoryKernel
    ports: dict[str, int]
    tasks: list[asyncio.Task]
    stop: asyncio.Event

    async def scrape(self, service: str) -> Scrape:
        content_type, text = await self.get_metrics(service)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8", content_type
        return Scrape.parse(text)

    async def get_metrics(self, service: str, accept: str = "") -> tuple[str, str]:
        """(Content-Type, body) of the service's /metrics for this Accept header."""
        headers = {"Accept": accept} if accept else {}
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{self.ports[service]}/metrics", headers=headers) as r:
            assert r.status == 200, r.status
            return r.headers["Content-Type"], await r.text()

    async def ready(self, service: str) -> bool:
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{self.ports[service]}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def settled(self, within: float = 60.0) -> Scrape:
        """Wait until node-a's applier holds the planner's last delta; its scrape then."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            planner, applier = await self.scrape("planner"), await self.scrape("applier")
            seq = planner.value("kipvs_planner_delta_seq")
            if seq > 0 and applier.value("kipvs_applier_plan_seq") == seq:
                return applier
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"node-a never reached planner delta {seq}")
            await asyncio.sleep(0.1)

    async def until(self, holds, what: str, within: float = 60.0) -> Scrape:
        """node-a's applier scrape once ``holds(scrape)`` and it holds the planner's last delta."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            scrape = await self.settled(within)
            if holds(scrape):
                return scrape
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {what}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)


async def start_stack(nats_url: str, sim: Simulator, tmp_path: Path) -> Stack:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    ports = {name: free_loopback_port() for name in ("watcher", "planner", "applier")}
    common = {"nats_url": nats_url}
    stop = asyncio.Event()
    kernel = MemoryKernel()
    watcher = config.load(WatcherConfig, {**common, "http_listen": f"127.0.0.1:{ports['watcher']}",
                                          "kubeconfig": str(kubeconfig), "read_timeout": 2.0}, {})
    planner = config.load(PlannerServiceConfig, {**common, "http_listen": f"127.0.0.1:{ports['planner']}"}, {})
    applier = config.load(ApplierConfig, {**common, "http_listen": f"127.0.0.1:{ports['applier']}", "node": "node-a",
                                          "backend": "memory", "healthz_bind_address": ""}, {})
    tasks = [
        asyncio.create_task(runtime.run_service("watcher", watcher, watch, stop=stop)),
        asyncio.create_task(runtime.run_service("planner", planner, plan, consumers=[topology.planner_consumer()],
                                                stop=stop)),
        asyncio.create_task(runtime.run_service("applier", applier, lambda ctx: apply_plan(ctx, kernel),
                                                consumers=[topology.applier_consumer("node-a")], stop=stop)),
    ]
    stack = Stack(sim, kernel, ports, tasks, stop)
    deadline = asyncio.get_running_loop().time() + 60
    for name in ports:
        while not await stack.ready(name):
            if any(t.done() for t in tasks) or asyncio.get_running_loop().time() > deadline:
                await stack.close()
                raise AssertionError(f"{name} did not become ready")
            await asyncio.sleep(0.1)
    return stack
