"""``kipvs ipvs --node`` and shadow mode over a real nats-server: the planner and applier services (the
applier on the memory kernel; the netlink read is tested in the guest, tests/guest/kernel_shadow.py)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from services.applier import inspect
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.applier.shadow import run_shadow
from services.planner.active import plan
from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus
from shared.plan.node_state import VirtualService
from shared.plan.resolve import resolve_node
from shared.service import config, runtime
from tests.golden.regenerate import EVENTS
from tests.helpers import eventually, kipvs, publish_kube, start_service, until
from tests.logread import read_stream

LINES = EVENTS.read_text().splitlines()



def planned_node_a():
    planner = plan_events(read_events(LINES, "x"), PlannerConfig())
    return resolve_node(planner.plans.values(), planner.nodes["node-a"])


@pytest.fixture
async def planned(nats_url: str):
    """The small cluster's log through the real planner; yields the JetStream context."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, LINES, "golden")
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": ""}, {})
    task, stop = start_service("planner", cfg, plan)
    want = planned_node_a()

    async def published() -> bool:
        from shared.messaging import plan_log

        got = await plan_log.published_plan(js, bus.LogReader(topology.PLAN_STREAM))
        return resolve_node(got.services.values(), got.nodes.get("node-a")).ipvs == want.ipvs

    for _ in range(1200):
        if await published():
            break
        await asyncio.sleep(0.05)
    assert await published(), "the planner did not publish the plan"
    try:
        yield js
    finally:
        stop.set()
        await task
        await nc.close()


async def test_kernel_view_of_a_running_applier_and_its_diff(planned, nats_url: str, capsys) -> None:
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a",
                                      "backend": "memory"}, {})
    task, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    want = planned_node_a()
    try:
        await eventually(lambda: kernel.ipvs == want.ipvs, what="node-a's kernel programmed")
        for _ in range(200):  # the inspect subscription comes up right after bootstrap
            code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--timeout", "2",
                                         capsys=capsys)
            if code == 0:
                break
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "IP Virtual Server version simulated (size=0)"
        assert lines[1] == "Prot LocalAddress:Port Scheduler Flags"
        assert "TCP  10.96.0.10:80 rr" in lines
        assert sum(line.startswith(("TCP  ", "UDP  ", "SCTP ")) for line in lines) == len(want.ipvs)
        assert sum(line.startswith("  -> ") for line in lines) == 1 + sum(len(vs.reals) for vs in want.ipvs.values())

        code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--json", capsys=capsys)
        reply = json.loads(out)
        assert code == 0 and reply["node"] == "node-a" and reply["mode"] == "apply"
        assert reply["backend"].startswith("memory") and reply["table"]["link"] is True
        assert sorted(reply["table"]["addresses"]) == sorted(want.addresses)

        code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--diff", capsys=capsys)
        assert (code, out) == (0, ""), err
        assert "0 differences" in err

        # Behind the applier's back (its drift check runs every 60 s): one weight and one address.
        key = ("TCP", "10.96.0.10", 80)
        real = sorted(kernel.ipvs[key].reals)[0]
        kernel.ipvs[key].reals[real] = 5
        kernel.addresses.add("10.96.0.250")
        code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--diff", capsys=capsys)
        assert code == 1, err
        assert out.splitlines() == [
            f"real server {real[0]}:{real[1]} of TCP 10.96.0.10:80 weight 5, planned {want.ipvs[key].reals[real]}",
            "address 10.96.0.250 extra on kube-ipvs0"]
    finally:
        stop.set()
        await task


async def test_diff_leaves_out_the_nodes_excluded_ranges(planned, nats_url: str, capsys) -> None:
    """--ipvs-exclude-cidrs: the applier never programs there, and another program's virtual service
    there is not kipvs's business; --diff reported the planned ones missing forever, and the other's extra.
    With the pod network excluded too, the hairpin entries (KUBE-LOOP-BACK, keyed by pod IP) stay."""
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a", "backend": "memory",
                                      "ipvs_exclude_cidrs": ["10.96.0.10/32, fd00:97::/64", "10.244.0.0/16"]}, {})
    task, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))
    programmed = {key for key in planned_node_a().ipvs if key[1] != "10.96.0.10"}
    hairpin = planned_node_a().ipsets["KUBE-LOOP-BACK"]
    assert hairpin, "the small cluster has pods on node-a behind their own Service"
    try:
        await eventually(lambda: set(kernel.ipvs) == programmed, what="node-a's kernel programmed")
        await eventually(lambda: kernel.ipsets.get("KUBE-LOOP-BACK") == hairpin, what="the hairpin entries kept")
        kernel.ipvs[("TCP", "10.96.0.10", 9999)] = VirtualService("TCP", "10.96.0.10", 9999, "wrr")  # not ours
        for _ in range(200):  # the inspect subscription comes up right after bootstrap
            code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--diff",
                                         "--timeout", "2", capsys=capsys)
            if "no applier answered" not in err:
                break
        assert (code, out) == (0, ""), err
        assert "0 differences" in err
    finally:
        stop.set()
        await task


async def test_no_applier_answering_is_one_sentence(nats_url: str, capsys) -> None:
    code, out, err = await kipvs("ipvs", "--node", "node-q", "--nats-url", nats_url, "--timeout", "0.5",
                                 capsys=capsys)
    assert code == 2 and out == ""
    assert err.strip() == ("kipvs ipvs: no applier answered for node node-q on kipvs.inspect.node-q.ipvs: is "
                           "'kipvs applier --node node-q' running and connected to this NATS?")


async def test_a_request_of_a_newer_version_is_answered_with_an_error(nats_url: str) -> None:
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a",
                                      "backend": "memory", "shadow": "true"}, {})
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel), stop=stop))
    nc = await nats.connect(nats_url)
    try:
        for _ in range(200):
            try:
                msg = await nc.request(topology.inspect_subject("node-a"), msgspec.msgpack.encode({"v": 99}),
                                       timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.05)
        reply = msgspec.msgpack.decode(msg.data, type=events.IpvsInspectReply)
        assert reply.table is None and reply.mode == "shadow"
        assert reply.error == "request version 99; this applier answers up to 1: upgrade it"
    finally:
        await nc.close()
        stop.set()
        await task


async def test_shadow_mode_reports_exactly_the_divergence_and_writes_nothing(planned, nats_url: str,
                                                                              capsys) -> None:
    """kube-proxy's kernel = the plan with one real server's weight changed; shadow mode reports that line
    on the status stream, in the metric and in kipvs status, and leaves the kernel as it was."""
    want = planned_node_a()
    kernel = MemoryKernel()
    await kernel.setup()  # the sets exist, as kube-proxy makes them
    kernel.ipvs = {k: VirtualService(v.protocol, v.ip, v.port, v.scheduler, v.persistence_timeout, dict(v.reals))
                   for k, v in want.ipvs.items()}
    kernel.addresses = set(want.addresses)
    for name, entries in want.ipsets.items():
        kernel.ipsets[name] = set(entries)
    key = ("TCP", "10.96.0.10", 80)
    real = sorted(kernel.ipvs[key].reals)[0]
    kernel.ipvs[key].reals[real] = 3
    before = await kernel.kernel_table()

    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "127.0.0.1:0", "node": "node-a",
                                      "backend": "memory", "shadow": "true", "shadow_sync_period": "0.2"}, {})
    stop = asyncio.Event()
    contexts: list[runtime.ServiceContext] = []

    async def main(ctx: runtime.ServiceContext) -> None:
        contexts.append(ctx)
        await run_shadow(ctx, kernel)

    task = asyncio.create_task(runtime.run_service("applier", cfg, main, stop=stop))
    expected = f"real server {real[0]}:{real[1]} of TCP 10.96.0.10:80 weight 3, planned {want.ipvs[key].reals[real]}"
    try:
        reports = await _shadow_reports(planned)
        record = reports[-1][1].record
        assert isinstance(record, events.ShadowReport)
        assert record.divergences == (expected,)
        assert record.virtual_servers == len(want.ipvs)
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{contexts[0].http_port}/metrics") as response:
            scraped = {sample.name: sample.value for family in text_string_to_metric_families(await response.text())
                       for sample in family.samples}
        assert scraped["kipvs_shadow_divergences"] == 1

        code, out, _ = await kipvs("status", "--nats-url", nats_url, "--node", "node-a", capsys=capsys)
        assert code == 1
        head, row, detail = out.splitlines()[1:4]
        assert "SHADOW" in head and row.split()[6] == "1"  # node applied behind Ns ago drift SHADOW
        assert "shadow: 1 divergences from kipvs's plan" in row
        assert detail.strip() == f"shadow: {expected}"

        code, out, _ = await kipvs("tap", "--nats-url", nats_url, "--stream", "status", "--node", "node-a",
                                   "--since", "1", "--no-follow", capsys=capsys)
        assert code == 0
        assert out.splitlines()[-1].endswith(f"node-a shadow comparison at plan seq={record.plan_seq} "
                                             f"({len(want.ipvs)} virtual servers in the kernel): 1 divergences: "
                                             f"{expected}"), out

        await asyncio.sleep(0.5)  # a few more comparisons
        assert await kernel.kernel_table() == before, "shadow mode changed the kernel"
        again = await read_stream(planned, topology.STATUS_STREAM, "kipvs.status.node-a.shadow")
        assert len(again) == 1, "an unchanged comparison must not be published again before the heartbeat"

        kernel.ipvs[key].reals[real] = want.ipvs[key].reals[real]  # kube-proxy catches up: no divergence left
        for _ in range(1200):
            reports = await read_stream(planned, topology.STATUS_STREAM, "kipvs.status.node-a.shadow")
            if reports[-1][1].record.divergences == ():
                break
            await asyncio.sleep(0.05)
        assert reports[-1][1].record.divergences == ()
        code, out, _ = await kipvs("status", "--nats-url", nats_url, "--node", "node-a", capsys=capsys)
        assert code == 0, out
    finally:
        stop.set()
        await task


async def test_shadow_mode_leaves_out_the_nodes_excluded_ranges(planned, nats_url: str, capsys) -> None:
    """--shadow with --ipvs-exclude-cidrs: kube-proxy's kernel matches the plan outside the ranges, and in
    them holds another program's service and not the planned one. A kipvs applier would leave both alone
    there, so the shadow reports no divergence (it reported both) and ``kipvs ipvs --diff`` is quiet."""
    want = planned_node_a()
    kernel = MemoryKernel()
    await kernel.setup()
    kernel.ipvs = {k: VirtualService(v.protocol, v.ip, v.port, v.scheduler, v.persistence_timeout, dict(v.reals))
                   for k, v in want.ipvs.items() if k[1] != "10.96.0.10"}
    kernel.ipvs[("TCP", "10.96.0.10", 9999)] = VirtualService("TCP", "10.96.0.10", 9999, "wrr")  # not kipvs's
    kernel.addresses = set(want.addresses) - {"10.96.0.10"}
    for name, entries in want.ipsets.items():
        kernel.ipsets[name] = {e for e in entries if e.split(",")[0] != "10.96.0.10"}
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a", "backend": "memory",
                                      "shadow": "true", "shadow_sync_period": "0.2",
                                      "ipvs_exclude_cidrs": ["10.96.0.10/32"]}, {})
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel), stop=stop))
    try:
        reports = await _shadow_reports(planned)
        assert reports[-1][1].record.divergences == ()
        code, out, err = await kipvs("ipvs", "--node", "node-a", "--nats-url", nats_url, "--diff", capsys=capsys)
        assert (code, out) == (0, ""), err
        assert "0 differences" in err
    finally:
        stop.set()
        await task


async def test_shadow_mode_follows_the_plans_deltas(planned, nats_url: str, monkeypatch) -> None:
    """After its first comparison, shadow mode reads only the deltas published since (no snapshot read
    again, no whole-plan resolve): a Service added later shows as missing from kube-proxy's kernel at the
    next comparisons, and goes once the kernel has it. (It reread the snapshot and resolved every Service
    each --shadow-sync-period.)"""
    from services.applier import shadow as shadow_module

    loads = []
    original = shadow_module.plan_log.load_snapshot

    async def counted(*args, **kwargs):
        loads.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(shadow_module.plan_log, "load_snapshot", counted)
    want = planned_node_a()
    kernel = MemoryKernel()
    await kernel.setup()
    kernel.ipvs = {k: VirtualService(v.protocol, v.ip, v.port, v.scheduler, v.persistence_timeout, dict(v.reals))
                   for k, v in want.ipvs.items()}
    kernel.addresses = set(want.addresses)
    for name, entries in want.ipsets.items():
        kernel.ipsets[name] = set(entries)
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-a", "backend": "memory",
                                      "shadow": "true", "shadow_sync_period": "0.2"}, {})
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel), stop=stop))
    try:
        assert (await _shadow_reports(planned))[-1][1].record.divergences == ()
        web = next(json.loads(line) for line in LINES if json.loads(line)["object"]["metadata"]["name"] == "web")
        meta = web["object"]["metadata"]
        web["object"] = {**web["object"], "metadata": {**meta, "name": "web2", "resourceVersion": "900"},
                         "spec": {**web["object"]["spec"], "clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"]}}
        await publish_kube(planned, [json.dumps(web)], "later")

        async def shadow_says(check) -> bool:
            reports = await read_stream(planned, topology.STATUS_STREAM, "kipvs.status.node-a.shadow")
            return check(reports[-1][1].record.divergences)

        await until(lambda: shadow_says(lambda found: any("10.96.0.99" in line for line in found)),
                    "the added Service reported missing")
        kernel.ipvs[("TCP", "10.96.0.99", 80)] = VirtualService("TCP", "10.96.0.99", 80, "rr")
        kernel.addresses.add("10.96.0.99")
        kernel.ipsets["KUBE-CLUSTER-IP"].add("10.96.0.99,tcp:80")
        kernel.ipsets["KUBE-IPVS-IPS"].add("10.96.0.99")
        await until(lambda: shadow_says(lambda found: not any("10.96.0.99" in line for line in found)),
                    "the added Service no longer reported once the kernel has it")
        assert len(loads) == 1, f"the snapshot was read {len(loads)} times"
    finally:
        stop.set()
        await task


async def test_a_table_over_the_max_payload_is_shown_whole(nats_url: str, capsys) -> None:
    """10,000 Services with 3 real servers each (a reply of several MB, over the 1 MiB max_payload) comes in
    parts and is shown whole, as text and as JSON (it was an error: issue 21)."""
    kernel = MemoryKernel()
    for i in range(10_000):
        key = ("TCP", f"10.96.{i >> 8}.{i & 255}", 80)
        kernel.ipvs[key] = VirtualService(*key, "rr", 0, {(f"10.244.{i >> 8}.{(i & 255)}", 8080 + r): 1
                                                          for r in range(3)})
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": "", "node": "node-big",
                                      "backend": "memory", "shadow": "true", "shadow_sync_period": "60"}, {})
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel), stop=stop))
    try:
        for _ in range(200):
            code, out, err = await kipvs("ipvs", "--node", "node-big", "--nats-url", nats_url, "--timeout", "10",
                                         capsys=capsys)
            if "no applier answered" not in err:
                break
        assert code == 0, err
        lines = out.splitlines()
        assert sum(1 for line in lines if line.startswith("TCP  ")) == 10_000
        assert sum(1 for line in lines if line.startswith("  -> 10.244.")) == 30_000
        assert "TCP  10.96.39.15:80 rr" in out and "  -> 10.244.39.15:8082" in out
        code, out, err = await kipvs("ipvs", "--node", "node-big", "--nats-url", nats_url, "--timeout", "10",
                                     "--json", capsys=capsys)
        assert code == 0, err
        assert len(out) > 1_048_576 and len(json.loads(out)["table"]["virtual_servers"]) == 10_000
    finally:
        stop.set()
        await task


def test_a_reply_in_parts_only_for_an_asker_that_takes_them() -> None:
    """An older tool (no ``parts`` in its request) is told in one message that the table does not fit."""
    from services.applier import inspect

    table = events.KernelTable(virtual_servers=tuple(
        events.KernelVirtualServer(protocol="TCP", address=f"10.96.{i >> 8}.{i & 255}", port=80, scheduler="rr")
        for i in range(5_000)))
    reply = events.IpvsInspectReply(node="n", backend="memory", table=table)
    assert len(inspect.reply_messages(reply, 1 << 20, True)) == 1  # fits
    whole = inspect.reply_messages(reply, 64 << 10, True)
    assert len(whole) > 1 and all(len(data) <= 64 << 10 for data, _ in whole)
    assert [h[events.INSPECT_PART_HEADER] for _, h in whole] == [f"{i}/{len(whole)}" for i in range(1, len(whole) + 1)]
    parts = [msgspec.msgpack.decode(data, type=events.IpvsInspectPart) for data, _ in whole]
    assert msgspec.msgpack.decode(b"".join(p.data for p in parts), type=events.IpvsInspectReply) == reply
    [(data, headers)] = inspect.reply_messages(reply, 64 << 10, False)
    old = msgspec.msgpack.decode(data, type=events.IpvsInspectReply)
    assert not headers and old.table is None and "more than this NATS server's max_payload (65536)" in old.error


async def test_unreadable_requests_and_kernel_failures_are_answered_not_dropped() -> None:
    from services.applier import inspect

    def context() -> tuple[str, int, tuple[str, ...]]:
        return ("apply", 3, ())

    garbage = await inspect.answer("node-a", MemoryKernel(), context, data=b"\xc1")
    assert garbage.table is None and garbage.error.startswith("not an inspect request: ")

    async def refused() -> events.KernelTable:
        raise PermissionError(1, "Operation not permitted")

    failed = await inspect.answer("node-a", MemoryKernel(), context, refused)
    assert failed.table is None and failed.error == "cannot read the kernel: [Errno 1] Operation not permitted"
    assert (failed.node, failed.plan_seq, failed.mode) == ("node-a", 3, "apply")

    kernel = MemoryKernel()
    await kernel.setup()
    fine = await inspect.answer("node-a", kernel, context)
    assert fine.error == "" and fine.table is not None and fine.table.link


async def test_stream_messages_pushed_to_the_inspect_subject_are_not_answered(nats_url: str) -> None:
    """A node may create its own reader on KIPVS_PLAN with any config, and nats-server does not check the
    creator's publish rights on ``deliver_subject``: pointed at another node's inspect subject, every plan
    message made that applier read its whole kernel and publish the table (3,015 kernel dumps from three
    requests). Only a request with an inbox to answer is answered; a tool's request still is."""
    reads = 0
    kernel = MemoryKernel()

    async def counted_read() -> events.KernelTable:
        nonlocal reads
        reads += 1
        return await kernel.kernel_table()

    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    sub = await inspect.serve(nc, "node-b", kernel, lambda: ("apply", 0, ()), counted_read)

    try:
        await js.add_consumer(topology.PLAN_STREAM, ConsumerConfig(
            name="reader-node-a", deliver_subject=topology.inspect_subject("node-b"), ack_policy=AckPolicy.NONE,
            filter_subject="kipvs.plan.all", deliver_policy=DeliverPolicy.ALL))
        for seq in range(1, 21):  # plan envelopes: msgpack maps, which decode as a request with defaults
            delta = events.PlanDelta(scope="all", seq=seq, source_seq=seq, ops=())
            await js.publish("kipvs.plan.all", events.encode(events.Envelope(
                id=f"plan/all/{seq}", time_ns=seq, producer="planner", record=delta)))
        await asyncio.sleep(1.0)
        assert reads == 0
        reply = await nc.request(topology.inspect_subject("node-b"), b"", timeout=5)
        assert msgspec.msgpack.decode(reply.data, type=events.IpvsInspectReply).error == ""
        assert reads == 1
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _shadow_reports(js) -> list:
    """The node's shadow reports, once there is one (within 60 s)."""
    for _ in range(1200):
        reports = await read_stream(js, topology.STATUS_STREAM, "kipvs.status.node-a.shadow")
        if reports:
            return reports
        await asyncio.sleep(0.05)
    raise AssertionError("no shadow report")
