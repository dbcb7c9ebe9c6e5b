"""Restart and poison faults (issue 13) with a real nats-server, the real planner and applier services:
a restart never rolls a node back, and one bad record read at start never becomes a crash loop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus, plan_log
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_node
from shared.service import config
from tests import kube
from tests.helpers import eventually, publish_kube, start_service
from tests.logread import read_stream

KIPVS = str(Path(sys.executable).with_name("kipvs"))


def _service_lines(first: int, count: int) -> list[str]:
    lines = []
    for i in range(first, first + count):
        svc = kube.service(f"s{i}", cluster_ip=f"10.96.1.{i}")
        svc["metadata"]["resourceVersion"] = str(1000 + i)
        lines.append(json.dumps({"type": "ADDED", "object": svc}))
        sl = kube.endpoint_slice(f"s{i}-x", f"s{i}", [kube.endpoint(f"10.244.1.{i}")])
        sl["metadata"]["resourceVersion"] = str(2000 + i)
        lines.append(json.dumps({"type": "ADDED", "object": sl}))
    return lines


async def _reports(js, node: str) -> list[events.ApplyReport]:
    return [env.record for _, env in await read_stream(js, topology.STATUS_STREAM,
                                                        topology.status_subject(node, "applied"))]


async def test_a_restart_within_the_snapshot_interval_never_rolls_the_node_back(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url, "http_listen": ""}
    node = kube.node("node-a", "192.0.2.1")
    node["metadata"]["resourceVersion"] = "1"
    lines = [json.dumps({"type": "ADDED", "object": node}), *_service_lines(1, 5)]
    await publish_kube(js, lines, "first")
    # A snapshot now (after the first batch), then none for a long time: the restart lands between.
    planner_cfg = config.load(PlannerServiceConfig, {**common, "snapshot_every": "100000",
                                                     "snapshot_interval": "3600"}, {})
    planner_task, planner_stop = start_service("planner", planner_cfg, plan)
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    more = _service_lines(6, 20)
    await publish_kube(js, more, "churn")
    everything = plan_events(read_events([*lines, *more], "x"), PlannerConfig())
    want = resolve_node(everything.plans.values(), everything.nodes["node-a"])
    await eventually(lambda: set(kernel.ipvs) == set(want.ipvs), 30,
                     "node-a to apply the churn")
    snap = events.decode((await (await js.object_store(topology.SNAPSHOT_BUCKET)).get(
        topology.snapshot_object("all"))).data).record
    assert snap.seq < everything.seq, "the snapshot is older than what the node applied (the case under test)"
    stop.set()
    await applier  # everything it applied is acked: the consumer will not deliver it again
    reports_before = len(await _reports(js, "node-a"))

    # The same node restarted: the process is new, the kernel keeps its state.
    rolled_back: list[list] = []

    async def watch_for_rollback() -> None:
        while True:
            missing = set(want.ipvs) - set(kernel.ipvs)
            if missing:
                rolled_back.append(sorted(missing))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch_for_rollback())
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    reports: list[events.ApplyReport] = []
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        reports = await _reports(js, "node-a")
        if reports and reports[-1].plan_seq == everything.seq and len(reports) > reports_before:
            break
        await asyncio.sleep(0.05)
    assert len(reports) > reports_before and reports[-1].plan_seq == everything.seq, \
        "the new instance reports, at once, the newest delta it holds"
    stop.set()
    await applier
    watcher.cancel()
    assert not rolled_back, f"the restart removed services it had applied: {rolled_back[0][:5]}"
    assert set(kernel.ipvs) == set(want.ipvs)
    planner_stop.set()
    await planner_task
    await nc.close()


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([KIPVS, *argv], capture_output=True, text=True, timeout=timeout)


async def test_garbage_or_empty_last_plan_message_is_no_crash_loop(nats_url: str) -> None:
    """The planner reads what it last published at start; the applier reads its node subject's last
    message: garbage or an empty message there is skipped (it is parked when consumed), not a traceback."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url, "http_listen": ""}
    lines = [json.dumps({"type": "ADDED", "object": {**kube.node("node-a", "192.0.2.1"),
                                                     "metadata": {"name": "node-a", "resourceVersion": "1"}}}),
             *_service_lines(1, 3)]
    await publish_kube(js, lines, "first")
    planner_cfg = config.load(PlannerServiceConfig, {**common, "snapshot_every": "1"}, {})
    planner_task, planner_stop = start_service("planner", planner_cfg, plan)
    expected = plan_events(read_events(lines, "x"), PlannerConfig())
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if (await js.stream_info(topology.PLAN_STREAM)).state.messages >= expected.seq:
            break
        await asyncio.sleep(0.05)
    planner_stop.set()
    await planner_task
    for junk in (b"x", b""):
        await js.publish(topology.PLAN_ALL_SUBJECT, junk)
        await js.publish(topology.plan_node_subject("node-a"), junk)
        # The planner restarts on it and goes on planning: a new Service is planned and published.
        planner_task, planner_stop = start_service("planner", planner_cfg, plan)
        kernel = MemoryKernel()
        cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
        applier, stop = start_service("applier", cfg, lambda ctx, k=kernel: apply_plan(ctx, k))
        index = 10 + len(junk)
        await publish_kube(js, _service_lines(index, 1), f"extra-{index}")
        await eventually(lambda k=kernel, vip=("TCP", f"10.96.1.{index}", 80): vip in k.ipvs, 30,
                         "the new Service on node-a")
        assert not applier.done() and not planner_task.done(), "neither service died"
        stop.set()
        planner_stop.set()
        await applier
        await planner_task
    await nc.close()


async def _wait_plan(js, count: int) -> None:
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if (await js.stream_info(topology.PLAN_STREAM)).state.last_seq >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the plan stream never reached {count}")


async def test_a_deleted_log_record_then_a_restart_never_drops_the_next_change(nats_url: str) -> None:
    """Records deleted from the event log (or deltas from the plan stream) make the rebuilt planner
    disagree with what was published; it continues the published sequence with a corrective delta, so
    the next real change is published and every consumer ends at the planner's state."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_cfg = config.load(PlannerServiceConfig, common, {})
    lines = _service_lines(1, 4)
    await publish_kube(js, lines, "first")
    task, stop = start_service("planner", planner_cfg, plan)
    before = plan_events(read_events(lines, "x"), PlannerConfig())
    await _wait_plan(js, before.seq)
    stop.set()
    await task
    # An operator deletes the record of Service s2's slice (KUBE seq 4) from the log.
    await js.delete_msg(topology.KUBE_STREAM, 4)
    task, stop = start_service("planner", planner_cfg, plan)
    extra = _service_lines(9, 1)
    await publish_kube(js, extra, "after")
    survivors = [line for i, line in enumerate(lines, 1) if i != 4]
    want = plan_events(read_events([*survivors, *extra], "x"), PlannerConfig())
    deltas: list[events.PlanDelta] = []
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        deltas = [env.record for _, env in await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)]
        if any(isinstance(op, events.SetService) and op.service.key == "default/s9" for d in deltas for op in d.ops):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert any(isinstance(op, events.SetService) and op.service.key == "default/s9" for d in deltas for op in d.ops), \
        "the change after the restart was published"
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1)), "one unbroken sequence"
    consumer_view = SharedPlan()
    for d in deltas:
        consumer_view.apply(d)
    assert consumer_view.services == want.plans, "consumers hold what the remaining log gives"

    # Now deltas vanish from the plan stream instead (and the snapshot with them): a new node could not
    # bootstrap across the hole; the restarted planner's snapshot and sequence bridge it.
    await js.purge_stream(topology.PLAN_STREAM, subject=topology.PLAN_ALL_SUBJECT, keep=1)
    await (await js.object_store(topology.SNAPSHOT_BUCKET)).delete(topology.snapshot_object("all"))
    task, stop = start_service("planner", planner_cfg, plan)
    plan_reader = bus.LogReader(topology.PLAN_STREAM)
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if (await plan_log.published_plan(js, plan_reader)).services == want.plans:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    again = await plan_log.published_plan(js, plan_reader)
    assert again.services == want.plans, "snapshot + stream give the state again"
    await nc.close()
