"""The planner is green only when true (issue 21): not ready while the plan stream refuses its deltas, and
its position against the Kubernetes log exported, with how long it has been behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path

import aiohttp
import nats
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy

from services.planner.active import plan
from services.planner.progress import LagClock
from services.planner.service_config import PlannerServiceConfig
from shared.contract import topology
from shared.messaging.embedded_nats import free_loopback_port
from shared.service import config
from tests import kube
from tests.helpers import publish_kube, start_service, until
from tests.stack import Scrape, start_stack


def test_the_lag_clock_runs_only_while_the_log_stays_ahead() -> None:
    clock = LagClock()
    assert clock.observe(10, 10, 100.0) == 0.0
    assert clock.observe(12, 10, 105.0) == 0.0  # a gap seen now
    assert clock.observe(15, 11, 110.0) == 5.0  # what was seen at 105 is not planned yet
    assert clock.observe(18, 12, 115.0) == 0.0  # it is now: the new gap starts now
    assert clock.observe(18, 13, 120.0) == 5.0
    assert clock.observe(18, 18, 125.0) == 0.0


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


def _service(i: int) -> str:
    return json.dumps({"type": "ADDED", "object": kube.service(f"s{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}")})


async def test_the_planner_is_not_ready_while_the_plan_stream_refuses_its_deltas(nats_url: str) -> None:
    port = free_loopback_port()
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": f"127.0.0.1:{port}"}, {})
    task, stop = start_service("planner", cfg, plan)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    churn: asyncio.Task | None = None
    try:
        await until(lambda: _ready(port), "the planner ready")
        await publish_kube(js, [_service(0)], "first")
        await until(lambda: _metric(port, "kipvs_planner_source_seq", 1), "the first record planned")
        # Once the first delta is stored (planned is not yet published; and max_msgs 0 would be no limit to
        # the server), the plan stream is full: it refuses every new delta (a store at its limit).
        await until(lambda: _plan_stream_holds_a_delta(js), "the first delta stored")
        info = await js.stream_info(topology.PLAN_STREAM)
        assert info.state.messages > 0
        await js.update_stream(dataclasses.replace(info.config, max_msgs=info.state.messages,
                                                   discard=DiscardPolicy.NEW))
        counter = itertools.count(1)

        async def keep_changing() -> None:  # steady churn: the planner's consumer never idles
            while True:
                i = next(counter)
                await publish_kube(js, [_service(i)], f"churn-{i}")
                await asyncio.sleep(0.1)

        churn = asyncio.create_task(keep_changing())

        async def refusing() -> bool:
            status, text = await _get(port, "/readyz")
            return status == 503 and "cannot publish" in text

        await until(refusing, "/readyz to say the planner cannot publish", 30)
        scrape = Scrape.parse((await _get(port, "/metrics"))[1])
        assert scrape.value("kipvs_planner_unpublished_deltas") > 0
        assert scrape.value("kipvs_planner_publish_errors_total") > 0
        await until(lambda: _metric(port, "kipvs_planner_behind_seconds", 1.0), "the planner's lag clock running", 30)
        churn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await churn
        info = await js.stream_info(topology.PLAN_STREAM)
        await js.update_stream(dataclasses.replace(info.config, max_msgs=-1, discard=DiscardPolicy.OLD))
        await until(lambda: _ready(port), "the planner ready again once the stream takes deltas", 60)
        head = (await js.stream_info(topology.KUBE_STREAM)).state.last_seq
        await until(lambda: _metric(port, "kipvs_planner_source_seq", head), "every record planned")
        await until(lambda: _exactly(port, "kipvs_planner_behind_seconds", 0.0), "the lag clock back at 0", 30)
    finally:
        if churn is not None:
            churn.cancel()
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()


async def _master_status(port: int) -> float:
    scrape = Scrape.parse((await _get(port, "/metrics"))[1])
    return scrape.value("kipvs_planner_leader_election_master_status")


async def _ready(port: int) -> bool:
    try:
        return (await _get(port, "/readyz"))[0] == 200
    except aiohttp.ClientError:
        return False


async def _plan_stream_holds_a_delta(js: JetStreamContext) -> bool:
    return (await js.stream_info(topology.PLAN_STREAM)).state.messages > 0


async def _metric(port: int, name: str, at_least: float) -> bool:
    return Scrape.parse((await _get(port, "/metrics"))[1]).value(name) >= at_least


async def _exactly(port: int, name: str, value: float) -> bool:
    return Scrape.parse((await _get(port, "/metrics"))[1]).value(name) == value


async def _churn(sim, stop: asyncio.Event) -> int:
    """One EndpointSlice change every 0.1 s (a rollout's pace) until ``stop``; returns how many."""
    n = 0
    while not stop.is_set():
        n += 1
        await sim.apply(kube.endpoint_slice("web-x", "web", [kube.endpoint(f"10.244.0.{n % 7 + 1}")]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return n


async def test_a_restarted_planner_turns_ready_while_the_churn_goes_on(nats_url: str, sim, tmp_path: Path) -> None:
    """Caught up is a position (the log's head when it began consuming), not "a fetch came back empty":
    a planner restarted during a steady churn was not ready until the churn ended (a rollout waiting on its
    readiness would never finish). A standby that takes over goes through the same ``ActivePlanner.consume``."""
    await sim.apply(kube.service("web", cluster_ip="10.96.0.10"))
    stack = await start_stack(nats_url, sim, tmp_path)
    stop_churn = asyncio.Event()
    churn = asyncio.create_task(_churn(sim, stop_churn))
    port = free_loopback_port()
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": f"127.0.0.1:{port}"}, {})
    task, stop = None, asyncio.Event()
    try:
        await stack.until(lambda s: True, "the churn planned and applied", within=60)
        old = stack.tasks.pop(1)  # the planner dies mid-churn, its batch in hand unacked (as kill -9)
        old.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await old
        await asyncio.sleep(1.0)  # the log runs ahead of the planner's ack floor
        restarted = time.monotonic()
        task, stop = start_service("planner", cfg, plan)
        # Generous for a loaded machine; the churn goes on all the while (before the fix: never ready).
        await until(lambda: _active_and_ready(port), "the restarted planner ready during the churn", within=40)
        assert not churn.done(), "the churn stopped"
        print(f"ready {time.monotonic() - restarted:.2f}s after the restart, during the churn")
    finally:
        stop_churn.set()
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await churn
        await stack.close()


async def _active_and_ready(port: int) -> bool:
    """Ready, having consumed a record (so past its "catching up": consuming began under it)."""
    with contextlib.suppress(aiohttp.ClientError):
        scrape = Scrape.parse((await _get(port, "/metrics"))[1])
        if scrape.value("kipvs_planner_events_total") == 0:
            return False
        return (await _get(port, "/readyz"))[0] == 200
    return False
