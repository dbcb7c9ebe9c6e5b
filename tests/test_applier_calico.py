"""Calico's side end to end: real nats-server, the planner service, and the applier service writing the
endpoint-mark rules into a real nftables table in a network namespace this test creates (the applier's
IPVS side runs on the memory kernel here; the IPVS kernel is tested in the QEMU guest)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import nats
import pytest

from services.applier.kernel.backend import MemoryKernel
from services.applier.kernel.rules import NftRules, RulesConfig
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.core import PlannerConfig
from services.planner.endpoint_marks import interface_name
from services.planner.log_replay import plan_events, read_events
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus
from shared.service import config
from tests import kube
from tests.helpers import publish_kube, start_service
from tests.logread import read_stream


@pytest.fixture
def netns():
    name = f"kipvs-calico-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def _line(action: str, obj: dict, rv: int) -> str:
    obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}
    return json.dumps({"type": action, "object": obj})




async def _facts(js) -> list[events.NodeFactsReport]:
    return [env.record for _, env in await read_stream(js, topology.STATUS_STREAM, "kipvs.status.node-a.facts")]


async def _until(check, what: str, within: float = 15.0):
    deadline = asyncio.get_running_loop().time() + within
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_enforce_writes_the_planned_marks_and_auto_steps_back_for_felix(nats_url: str, netns: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    web1, web2 = kube.pod("web-1", ip="10.244.1.5"), kube.pod("web-2", ip="10.244.1.6")
    lines = [_line("ADDED", kube.node("node-a"), 1), _line("ADDED", web1, 2), _line("ADDED", web2, 3)]
    await publish_kube(js, lines, "one")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    rules = NftRules(RulesConfig(), netns=netns)
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "drift_period": "0.5"}, {})
    applier, applier_stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel(), rules))
    try:
        want = plan_events(read_events(lines, "x"), PlannerConfig()).node_calico("node-a").endpoint_marks
        assert set(want) == {interface_name("default", "web-1"), interface_name("default", "web-2")}
        await _until(lambda: _marks_are(rules, want), "the planned marks in the table")
        facts = await _until(lambda: _latest(js, "enforce"), "a report of enforce mode")
        assert "no calico-node pod" in facts.endpoint_marks_reason and facts.conflicts == ()

        # A pod goes: its mark leaves the table (element changes, the rest stays).
        more = [_line("DELETED", web2, 4)]
        await publish_kube(js, more, "two")
        await _until(lambda: _marks_are(rules, {interface_name("default", "web-1"): want[interface_name(
            "default", "web-1")]}), "web-2's mark removed")

        # calico-node starts on node-a: Felix writes the rules there now; kipvs only observes.
        calico_node = kube.pod("calico-node-1", ns="kube-system", labels={"k8s-app": "calico-node"})
        calico_node["spec"]["hostNetwork"] = True
        await publish_kube(js, [_line("ADDED", calico_node, 5)], "three")
        await _until(lambda: _marks_are(rules, None), "the marking rules removed")
        facts = await _until(lambda: _latest(js, "observe"), "a report of observe mode")
        assert "calico-node pod runs on this node" in facts.endpoint_marks_reason

        # Restarted, the applier reads the node's state from the subject's last message: still observe.
        applier_stop.set()
        await applier
        rules2 = NftRules(RulesConfig(), netns=netns)
        applier, applier_stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel(), rules2))
        count = len(await _facts(js))
        await _until(lambda: _facts_after(js, count), "a report after the restart")
        assert (await _facts(js))[count].endpoint_marks == "observe"
        assert await rules2.installed_marks() is None
    finally:
        applier_stop.set()
        planner_stop.set()
        await asyncio.gather(applier, planner, return_exceptions=True)
        await nc.close()


async def _marks_are(rules: NftRules, want: dict[str, int] | None) -> bool:
    try:
        return await rules.installed_marks() == want
    except Exception:  # the table is not there yet
        return False


async def _latest(js, mode: str) -> events.NodeFactsReport | None:
    reports = await _facts(js)
    return reports[-1] if reports and reports[-1].endpoint_marks == mode else None


async def _facts_after(js, count: int) -> bool:
    return len(await _facts(js)) > count


async def test_a_poisoned_node_subject_does_not_stop_a_restart(nats_url: str) -> None:
    """Garbage as the last message on the node's subject (parked when consumed): the applier reads the subject
    back to the last usable state instead of crash-looping."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    lines = [_line("ADDED", kube.node("node-a"), 1), _line("ADDED", kube.pod("web-1", ip="10.244.1.5"), 2)]
    await publish_kube(js, lines, "one")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    try:
        await _until(lambda: _node_deltas(js), "node-a's Calico state")
    finally:
        planner_stop.set()
        await planner
    await js.publish(topology.plan_node_subject("node-a"), b"\x00garbage")
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel()))
    try:
        # memory backend, no rules: "observe" (not "off", which is what no state at all would give)
        facts = await _until(lambda: _latest(js, "observe"), "the applier running with node-a's state")
        assert "--rules none" in facts.endpoint_marks_reason
        assert not applier.done()
    finally:
        stop.set()
        await asyncio.gather(applier, return_exceptions=True)
        await nc.close()


async def _node_deltas(js) -> bool:
    return bool(await read_stream(js, topology.PLAN_STREAM, topology.plan_node_subject("node-a")))
