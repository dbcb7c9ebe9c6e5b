"""Planner and applier services over a real nats-server; the applier on the memory kernel (the kernel
itself is tested in the QEMU guest, tests/test_kernel.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import nats

from services.applier.kernel.backend import MemoryKernel
from services.applier.kernel.rules import NftRules, RulesConfig
from services.applier.main import ApplierConfig, apply_plan
from services.applier.ops import digest
from services.planner.active import plan
from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus
from shared.plan.resolve import resolve_node
from shared.service import config
from tests import kube
from tests.golden.regenerate import EVENTS
from tests.helpers import eventually, publish_kube, start_service
from tests.logread import parked_reasons, read_stream


async def test_plan_reaches_the_node_and_a_late_node_bootstraps_from_the_snapshot(nats_url: str) -> None:
    lines = EVENTS.read_text().splitlines()
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, lines[:12], "first")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_cfg = config.load(PlannerServiceConfig, {**common, "snapshot_every": "3"}, {})
    planner_task, planner_stop = start_service("planner", planner_cfg, plan)
    kernel_a = MemoryKernel()
    cfg_a = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "drift_period": "0.5"}, {})
    applier_a, stop_a = start_service("applier", cfg_a, lambda ctx: apply_plan(ctx, kernel_a))
    await publish_kube(js, lines[12:], "second")
    # A Service added later, for node-a to pick up live.
    extra = json.dumps({"type": "ADDED", "object": {**kube.service("late", cluster_ip="10.96.0.77"),
                                                   "metadata": {"name": "late", "namespace": "default",
                                                                "resourceVersion": "999"}}})
    await publish_kube(js, [extra], "extra")
    expected_planner = plan_events(read_events([*lines, extra], "x"), PlannerConfig())
    want = resolve_node(expected_planner.plans.values(), expected_planner.nodes["node-a"])

    async def kernel_matches(kernel: MemoryKernel) -> bool:
        got = await kernel.observe()
        return got.state.ipvs == want.ipvs and got.state.addresses == want.addresses and got.state.ipsets == want.ipsets

    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if kernel_a.ipsets is not None and await kernel_matches(kernel_a):
            break
        await asyncio.sleep(0.05)
    assert await kernel_matches(kernel_a), "node-a never reached its planned state"

    # node-b joins late: it starts from the planner's snapshot, not from the first delta.
    kernel_b = MemoryKernel()
    cfg_b = config.load(ApplierConfig, {**common, "node": "node-b", "backend": "memory"}, {})
    applier_b, stop_b = start_service("applier", cfg_b, lambda ctx: apply_plan(ctx, kernel_b))
    want_b = resolve_node(expected_planner.plans.values(), expected_planner.nodes["node-b"])
    await eventually(lambda: kernel_b.ipsets is not None and {k: v.reals for k, v in kernel_b.ipvs.items()} ==
                     {k: v.reals for k, v in want_b.ipvs.items()}, what="node-b's kernel")

    # Poison on node-a's plan subjects is parked with the reason; node-a keeps serving.
    await js.publish(topology.plan_node_subject("node-a"), b"\x00garbage")
    wrong = events.Envelope(id="wrong-1", time_ns=1, producer="test",
                            record=events.KubeResync(kind="Pod", resource_version="1", live={}))
    await bus.publish(js, topology.plan_node_subject("node-a"), wrong)

    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if len(await parked_reasons(js)) >= 2:
            break
        await asyncio.sleep(0.05)
    reasons = await parked_reasons(js)
    assert any("not a kipvs envelope" in r for r in reasons), reasons
    assert any("KubeResync does not belong on a plan subject" in r for r in reasons), reasons

    # Drift behind node-a's back is repaired by the periodic read-back and reported.
    kernel_a.ipvs.pop(("TCP", "10.96.0.10", 80))
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if await kernel_matches(kernel_a):
            break
        await asyncio.sleep(0.05)
    assert await kernel_matches(kernel_a), "drift was not repaired"

    for stop in (stop_a, stop_b, planner_stop):
        stop.set()
    await asyncio.gather(applier_a, applier_b, planner_task)
    status = [env.record for _, env in await read_stream(js, topology.STATUS_STREAM)]
    reports = [r for r in status if isinstance(r, events.ApplyReport) and r.node == "node-a"]
    assert reports and reports[-1].desired_digest == digest(want)
    drift = [r for r in status if isinstance(r, events.DriftReport) and r.found]
    assert any("AddService ('TCP', '10.96.0.10', 80)" in f for r in drift for f in r.found), drift
    await nc.close()


async def test_node_ports_on_the_hosts_own_addresses_follow_them(nats_url: str) -> None:
    """--node-addresses interfaces: NodePort virtual services on the node's own addresses (as kube-proxy),
    re-resolved when an address comes or goes."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, EVENTS.read_text().splitlines(), "log")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_task, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    kernel = MemoryKernel(interface_addresses=("192.0.2.77",))
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "drift_period": "0.3",
                                      "node_addresses": "interfaces"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    await eventually(lambda: ("TCP", "192.0.2.77", 30080) in kernel.ipvs, what="NodePort on the host's address")
    assert not any(key[1] == "192.168.50.11" for key in kernel.ipvs), "the Node object's InternalIP was used"
    kernel.interface_addresses = ("192.0.2.78",)
    await eventually(lambda: ("TCP", "192.0.2.78", 30080) in kernel.ipvs and ("TCP", "192.0.2.77", 30080)
                     not in kernel.ipvs, what="NodePorts to follow the address change")
    stop.set()
    planner_stop.set()
    await asyncio.gather(applier, planner_task)
    await nc.close()


class SlowKernel(MemoryKernel):
    """A kernel whose writes take a while: a drift check that ran in the middle would see half a batch."""

    async def apply(self, ops) -> None:
        await asyncio.sleep(0.05)
        await super().apply(ops)


async def test_drift_checks_never_interleave_with_a_batch(nats_url: str) -> None:
    lines = EVENTS.read_text().splitlines()
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_task, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    kernel = SlowKernel()
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "drift_period": "0.01",
                                      "batch": "1"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    try:
        for i, line in enumerate(lines):  # one event at a time: many small batches, drift checks between
            await publish_kube(js, [line], f"one-{i}")
        expected = plan_events(read_events(lines, "x"), PlannerConfig())
        want = resolve_node(expected.plans.values(), expected.nodes["node-a"])
        await eventually(lambda: {k: v.reals for k, v in kernel.ipvs.items()} == {k: v.reals for k, v in
                                                                               want.ipvs.items()}, 30, "node-a")
        await asyncio.sleep(0.5)
        assert not applier.done(), applier.exception() if applier.done() else ""
        drift = [env.record for _, env in await read_stream(js, topology.STATUS_STREAM, "kipvs.status.node-a.drift")]
        assert drift and not [d.found for d in drift if d.found], "a drift check 'repaired' a batch in flight"
    finally:
        stop.set()
        planner_stop.set()
        await asyncio.gather(applier, planner_task, return_exceptions=True)
        await nc.close()


async def test_plan_cache_programs_a_rebooted_node_before_nats_is_reachable(nats_url: str, tmp_path) -> None:
    """The applier keeps its last plan on disk; a fresh kernel (a reboot) gets it back with no NATS at all."""
    from services.applier import plan_cache

    lines = EVENTS.read_text().splitlines()
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, lines, "all")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner_task, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    cache = tmp_path / "node-a.plan"
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory", "plan_cache": str(cache)}, {})
    kernel = MemoryKernel()
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    expected = plan_events(read_events(lines, "x"), PlannerConfig())
    want = resolve_node(expected.plans.values(), expected.nodes["node-a"])
    try:
        await eventually(lambda: cache.exists() and plan_cache.read(cache, "node-a") is not None and
                         plan_cache.read(cache, "node-a").snapshot.seq == expected.seq, 30, "the plan cache")
    finally:
        stop.set()
        planner_stop.set()
        await asyncio.gather(applier, planner_task, return_exceptions=True)
        await nc.close()

    rebooted, netns = MemoryKernel(), f"kipvs-cache-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:  # a rebooted node has no nftables table either: the cache installs it (kipvs's real table, in a netns)
        rules = NftRules(RulesConfig(), netns=netns)
        assert await plan_cache.restore(cache, "node-a", rebooted, rules=rules) == len(expected.plans)
        in_table = await rules.members()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
    got = await rebooted.observe()
    assert got.state.ipvs == want.ipvs and got.state.addresses == want.addresses and got.state.ipsets == want.ipsets
    assert in_table == {name: want.ipsets.get(name, set()) for name in in_table}
    assert in_table["KUBE-CLUSTER-IP"], "the table holds the cached Services"
    assert await plan_cache.restore(cache, "node-b", MemoryKernel()) == 0, "another node's cache is not used"
    cache.write_bytes(b"garbage")
    assert await plan_cache.restore(cache, "node-a", MemoryKernel()) == 0, "an unreadable cache is said and skipped"


def test_the_applier_restores_from_its_cache_before_connecting(tmp_path) -> None:
    """Wired in the command: with NATS unreachable, the restore still happens (and is logged)."""
    import subprocess
    import sys
    from pathlib import Path

    from services.applier import plan_cache
    from shared.plan.plan_state import SharedPlan

    expected = plan_events(read_events(EVENTS.read_text().splitlines(), "x"), PlannerConfig())
    shared = SharedPlan(services=dict(expected.plans), nodes=dict(expected.nodes), seq=expected.seq)
    cache = tmp_path / "node-a.plan"
    plan_cache.write(cache, plan_cache.encode("node-a", shared, None))
    kipvs = str(Path(sys.executable).with_name("kipvs"))
    proc = subprocess.Popen([kipvs, "applier", "--node", "node-a", "--backend", "memory", "--plan-cache", str(cache),
                             "--nats-url", "nats://127.0.0.1:9", "--http-listen", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "restored" in line:
                assert f"restored {len(expected.plans)} Services from the plan cache" in line
                break
        else:
            raise AssertionError("no restore logged")
    finally:
        proc.kill()
        proc.wait()


async def test_plan_cache_records_the_version_it_wrote_not_the_one_after(tmp_path) -> None:
    """The plan moves on while the file is written: the next round must write again."""
    from services.applier import plan_cache
    from shared.plan.plan_state import SharedPlan

    shared = SharedPlan(seq=1)
    writer = plan_cache.CacheWriter(tmp_path / "cache", "node-a")
    original = plan_cache.write

    def slow_write(path, data) -> None:
        shared.seq = 2  # a delta applied meanwhile
        original(path, data)

    plan_cache.write = slow_write
    try:
        await writer.maybe_write(shared, None, 0)
    finally:
        plan_cache.write = original
    assert plan_cache.read(tmp_path / "cache", "node-a").snapshot.seq == 1
    await writer.maybe_write(shared, None, 0)
    assert plan_cache.read(tmp_path / "cache", "node-a").snapshot.seq == 2
