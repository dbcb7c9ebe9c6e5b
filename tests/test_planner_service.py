"""The planner service with a real nats-server: events in, deltas out; killed mid-stream and restarted,
it neither loses nor duplicates a delta, and its snapshot matches its deltas."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from services.planner.core import Planner
from shared.contract import events, topology
from shared.messaging import bus
from shared.plan.plan_state import SharedPlan
from tests import kube
from tests.logread import read_stream


def _event(seq: int, obj: dict, action: str = "ADDED") -> tuple[str, events.Envelope]:
    kind = obj["kind"]
    meta = obj["metadata"]
    namespace = meta.get("namespace", "") if kind != "Node" else ""
    obj = {**obj, "metadata": {**meta, "resourceVersion": str(1000 + seq)}}
    record = events.KubeEvent(kind=kind, action=action, namespace=namespace, name=meta["name"],
                              resource_version=str(1000 + seq), object=obj)
    subject = topology.kube_object_subject(kind, namespace, meta["name"])
    return subject, events.Envelope(id=f"{kind}/{namespace}/{meta['name']}@{1000 + seq}", time_ns=seq,
                                    producer="test", record=record)


def workload(n: int, start: int = 0) -> list[tuple[str, events.Envelope]]:
    out = []
    for i in range(start, start + n):
        s = (i // 3) % 60  # each Service, then two versions of its slice
        if i % 3 == 0:
            obj = kube.service(f"svc-{s}", cluster_ip=f"10.96.{s // 250}.{s % 250 + 1}")
        else:
            obj = kube.endpoint_slice(f"svc-{s}-x", f"svc-{s}", [kube.endpoint(f"10.244.{s}.{i % 7 + 1}")])
        out.append(_event(i + 1, obj))
    return out


async def _publish(js, items) -> None:
    for subject, env in items:
        await bus.publish(js, subject, env)


def _planner(nats_url: str) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "kipvs"
    return subprocess.Popen([str(exe), "planner", "--nats-url", nats_url, "--http-listen", "", "--batch", "20",
                             "--snapshot-every", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _plan_count(js) -> int:
    return (await js.stream_info(topology.PLAN_STREAM)).state.messages


async def test_killed_mid_stream_and_restarted_no_loss_no_duplicates(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    first, second = workload(600), workload(300, start=600)
    proc = _planner(nats_url)
    try:
        producer = asyncio.create_task(_publish(js, first))
        deadline = time.monotonic() + 20
        while await _plan_count(js) < 40:
            assert time.monotonic() < deadline, "the planner published nothing"
            await asyncio.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: events are still being published
        proc.wait(5)
        await producer
        await _publish(js, second)
        proc = _planner(nats_url)
        expected = Planner()
        for seq, (_, env) in enumerate(first + second, 1):
            expected.handle(env, seq)
        deadline = time.monotonic() + 30
        while await _plan_count(js) < expected.seq:
            assert time.monotonic() < deadline, f"stuck at {await _plan_count(js)} of {expected.seq} deltas"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # anything extra (a duplicate) would arrive now
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr

    deltas = [env.record for _, env in await read_stream(js, topology.PLAN_STREAM)]
    assert [d.seq for d in deltas] == list(range(1, expected.seq + 1)), "a delta was lost or duplicated"
    shared = SharedPlan()
    for d in deltas:
        shared.apply(d)
    assert shared.services == expected.plans

    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    snap = events.decode((await store.get(topology.snapshot_object("all"))).data).record
    assert isinstance(snap, events.PlanSnapshot) and snap.seq == expected.seq
    assert SharedPlan.from_snapshot(snap).services == expected.plans
    last = await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)
    assert snap.plan_stream_seq == last.seq
    await nc.close()


async def test_restart_resumes_every_subject_without_gaps_or_repeats(nats_url: str) -> None:
    """Shared and node-specific deltas (Calico marks) each keep their own sequence across a restart."""
    from tests.golden.regenerate import DELTAS, EVENTS
    from tests.helpers import publish_kube

    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    lines = EVENTS.read_text().splitlines()
    golden = [events.from_json(line).record for line in DELTAS.read_text().splitlines()]
    expected = {scope: sum(1 for d in golden if d.scope == scope) for scope in {d.scope for d in golden}}

    async def counts() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for _, env in await read_stream(js, topology.PLAN_STREAM):
            out.setdefault(env.record.scope, []).append(env.record.seq)
        return out

    async def wait_for(total: int) -> None:
        deadline = time.monotonic() + 30
        while sum(len(v) for v in (await counts()).values()) < total:
            assert time.monotonic() < deadline, await counts()
            await asyncio.sleep(0.1)

    await publish_kube(js, lines[:10], "first")
    proc = _planner(nats_url)
    await wait_for(1)
    await asyncio.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    await publish_kube(js, lines[10:], "second")
    proc = _planner(nats_url)
    try:
        await wait_for(sum(expected.values()))
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    got = await counts()
    assert {scope: len(seqs) for scope, seqs in got.items()} == expected
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in got.values()), got
    await nc.close()


async def test_live_parity_cases_through_the_planner_service(nats_url: str) -> None:
    """Issue 12's cases, live: the planner process turns them into the deltas `kipvs plan` agrees with
    (a duplicate address resolved to its non-terminating copy as the copies come and go, a load-balancer
    address that is a node's own, two Services on one address)."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    stale = kube.endpoint("10.244.2.7", "node-b", ready=False, serving=False, terminating=True)
    successor = kube.endpoint("10.244.2.7", "node-a")
    lb = kube.service("shop", cluster_ip="10.96.0.30", type="LoadBalancer",
                      ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}  # node-a's own address
    objs = [kube.node("node-a", "192.0.2.10"), kube.node("node-b", "192.0.2.11"), kube.service("web"),
            kube.endpoint_slice("web-new", "web", [successor]), kube.endpoint_slice("web-old", "web", [stale]),
            lb, kube.service("twin", cluster_ip="10.96.0.31", externalIPs=["192.0.2.10"],
                             ports=[{"name": "http", "port": 80, "protocol": "TCP"}])]
    items = [_event(i, o) for i, o in enumerate(objs, 1)]
    items.append(_event(len(objs) + 1, kube.endpoint_slice("web-new", "web", [successor]), "DELETED"))
    proc = _planner(nats_url)
    try:
        await _publish(js, items)
        expected = Planner()
        for seq, (_, env) in enumerate(items, 1):
            expected.handle(env, seq)
        deadline = time.monotonic() + 30
        while await _plan_count(js) < expected.seq:
            assert time.monotonic() < deadline, f"stuck at {await _plan_count(js)} of {expected.seq} deltas"
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    shared = SharedPlan()
    history = []
    for _, env in await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT):
        shared.apply(env.record)
        web = shared.services.get("default/web")
        if web and web.ports[0].endpoints:
            history.append((web.ports[0].endpoints[0].node, web.ports[0].endpoints[0].terminating))
    assert ("node-a", False) in history, "while both copies were listed, the successor won"
    assert history[-1] == ("node-b", True), "once the successor's slice went, only the stale copy is left"
    assert shared.warnings == expected.warnings
    codes = {(w.code, w.object) for w in shared.warnings.values()}
    assert ("service-address-is-node-address", "default/shop") in codes
    assert ("address-conflict", "default/twin") in codes, "shop and twin share 192.0.2.10:80; shop owns it"
    await nc.close()
