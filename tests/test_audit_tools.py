"""The SREs' tools (kipvs tap, history, why, replay, plan --at) against a real nats-server holding a log
written by the real planner and applier services (the applier on the memory kernel)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from pathlib import Path

import nats
import pytest

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from services.tools import tap as tap_module
from shared.contract import events, topology
from shared.messaging import bus
from shared.service import cli, config
from tests.golden.regenerate import EVENTS
from tests.helpers import kipvs, publish_kube, start_service
from tests.logread import read_stream

LINES = EVENTS.read_text().splitlines()





@pytest.fixture
async def system(nats_url: str):
    """The small cluster's log through the planner and node-a's applier; both stopped afterwards."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, LINES, "golden")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
    applier, applier_stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel()))

    async def settled() -> bool:
        info = await js.stream_info(topology.PLAN_STREAM)
        reports = await read_stream(js, topology.STATUS_STREAM, "kipvs.status.node-a.applied")
        shared = [env for subject, env in await read_stream(js, topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)]
        return info.state.messages > 0 and bool(reports) and reports[-1][1].record.plan_seq == len(shared)

    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if await settled():
            break
        await asyncio.sleep(0.05)
    assert await settled(), "the planner and applier did not settle"
    try:
        yield js
    finally:
        planner_stop.set()
        applier_stop.set()
        await asyncio.gather(planner, applier, return_exceptions=True)
        await nc.close()


async def test_tap_history_and_filters(system, nats_url: str, capsys) -> None:
    code, out, _ = await kipvs("tap", "--nats-url", nats_url, "--stream", "kube", "--since", "1", "--no-follow",
                               capsys=capsys)
    assert code == 0 and len(out.splitlines()) == len(LINES)
    assert out.splitlines()[3].startswith("KUBE #4 ") and "ADDED Service default/web" in out.splitlines()[3]

    code, out, _ = await kipvs("tap", "--nats-url", nats_url, "--since", "1h", "--no-follow", "--node", "node-b",
                               capsys=capsys)
    assert code == 0 and "node-b" in out
    assert "node-a applied" not in out and "Pod default/web-1 " not in out, "web-1 runs on node-a"
    assert "ADDED Pod default/session-1" in out, "session-1 runs on node-b"

    code, out, _ = await kipvs("tap", "--nats-url", nats_url, "--since", "1h", "--no-follow", "--vip",
                               "10.96.0.10:80", capsys=capsys)
    kinds = {line.split()[0] for line in out.splitlines()}
    assert code == 0 and kinds == {"KUBE", "PLAN"} and all("default/web" in line for line in out.splitlines())

    code, out, _ = await kipvs("tap", "--nats-url", nats_url, "--since", "15", "--stream", "kube,plan",
                               "--no-follow", capsys=capsys)
    heads = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert code == 0 and ("KUBE", "#15") in heads and ("PLAN", "#15") in heads, "a sequence of each stream"
    assert not {h for h in heads if int(h[1][1:]) < 15}, out

    code, out, _ = await kipvs("history", "--nats-url", nats_url, "EndpointSlice/default/web-x1", capsys=capsys)
    assert code == 0 and out.startswith("EndpointSlice default/web-x1: 2 recorded changes")
    assert '- endpoints[1].addresses: ["10.244.2.11"]' in out, "what changed in the object"
    assert "-> PLAN #" in out and "set-service default/web" in out, "the deltas each change caused"

    code, out, _ = await kipvs("history", "--nats-url", nats_url, "Service/default/nope", capsys=capsys)
    assert code == 1 and "no recorded change" in out
    code, _, err = await kipvs("history", "--nats-url", nats_url, "Gadget/x", capsys=capsys)
    assert code == 2 and "expected KIND/NAMESPACE/NAME" in err


async def test_tap_follows_live(system, nats_url: str) -> None:
    args = argparse.Namespace(nats_url=nats_url, state_dir="", stream="kube", node="", object="", vip="",
                                         since="", no_follow=False, json=True)
    out = io.StringIO()
    task = asyncio.create_task(tap_module.tap(args, out))
    await asyncio.sleep(1.0)  # the tap subscribes to what comes next
    extra = json.dumps({"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "late", "namespace": "default", "resourceVersion": "900"}, "spec": {"clusterIP": "10.96.0.99",
        "ports": [{"port": 80, "protocol": "TCP"}]}}})
    await publish_kube(system, [extra], "live")
    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if out.getvalue():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["stream"] == topology.KUBE_STREAM and doc["envelope"]["record"]["name"] == "late"


async def test_why_names_the_events_deltas_and_applies(system, nats_url: str, capsys) -> None:
    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "10.96.0.10:80", capsys=capsys)
    assert code == 0, out
    assert out.startswith("node-a forwards TCP 10.96.0.10:80 for Service default/web (scheduler rr)")
    assert "from  KUBE #4 " in out and "ADDED Service default/web" in out, "the Service event created it"
    assert "10.244.1.11:8080 weight 1" in out
    assert "MODIFIED EndpointSlice default/web-x1" in out or "ADDED EndpointSlice default/web-x1" in out
    assert "applied STATUS #" in out and "ms after the Kubernetes change" in out
    assert "real server" in out and "history of this virtual service" in out

    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "192.168.50.11:30080",
                               "--json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["service"] == "default/api" and doc["real_servers"][0]["address"] == "10.244.3.21:8080"

    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "10.96.0.10:81", capsys=capsys)
    assert code == 1 and "does not forward" in out


async def test_the_readmes_export_command_makes_a_file_replay_accepts(system, nats_url: str, capsys,
                                                                       tmp_path: Path) -> None:
    """README: ``kipvs tap --stream kube,plan --since 1 --no-follow --json > log.jsonl``, then
    ``kipvs replay --log log.jsonl``."""
    code, recorded, err = await kipvs("tap", "--nats-url", nats_url, "--stream", "kube,plan", "--since", "1",
                                      "--no-follow", "--json", capsys=capsys)
    assert code == 0, err
    docs = [json.loads(line) for line in recorded.splitlines()]
    kube_info = await system.stream_info(topology.KUBE_STREAM)
    plan_info = await system.stream_info(topology.PLAN_STREAM)
    assert sorted(d["seq"] for d in docs if d["stream"] == topology.KUBE_STREAM) == list(
        range(1, kube_info.state.last_seq + 1)), "every KUBE record, from the first"
    assert sorted(d["seq"] for d in docs if d["stream"] == topology.PLAN_STREAM) == list(
        range(1, plan_info.state.last_seq + 1)), "every PLAN record, from the first"
    assert {d["stream"] for d in docs} == {topology.KUBE_STREAM, topology.PLAN_STREAM}
    log = tmp_path / "log.jsonl"
    log.write_text(recorded)
    code, out, err = await kipvs("replay", "--log", str(log), capsys=capsys)
    assert code == 0 and "identical" in out, out + err


async def test_why_for_an_unknown_node_says_so(system, nats_url: str, capsys) -> None:
    code, out, err = await kipvs("why", "--nats-url", nats_url, "--node", "node-z", "10.96.0.10:80", capsys=capsys)
    assert code == 1 and out == ("kipvs why: unknown node 'node-z': no Node object in the log and no reports "
                                 "from it\n"), out + err
    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-z", "10.96.0.10:80", "--json",
                               capsys=capsys)
    assert code == 1 and json.loads(out)["known_node"] is False
    # node-c runs no applier here (no report) but has its Node object: known, and it forwards the VIP.
    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-c", "10.96.0.10:80", capsys=capsys)
    assert code == 0 and out.startswith("node-c forwards TCP 10.96.0.10:80")
    assert "applied: no apply report from node-c covers it yet" in out
    # a node with no Node object whose applier reported (say, one named differently): known, by its reports
    facts = events.NodeFactsReport(node="node-x", ipvs_available=True, kube_ipvs0="created", endpoint_marks="enforce",
                                   endpoint_marks_reason="", conflicts=())
    await bus.publish(system, topology.status_subject("node-x", "facts"),
                      events.Envelope(id="facts-x", time_ns=1, producer="test", record=facts))
    code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-x", "10.96.0.10:80", capsys=capsys)
    assert code == 0 and out.startswith("node-x forwards TCP 10.96.0.10:80"), out
    code, out, err = await kipvs("why", "--nats-url", nats_url, "--node", "Node_A", "10.96.0.10:80", capsys=capsys)
    assert code == 2 and err == "kipvs why: --node: 'Node_A' is not a valid Kubernetes name (DNS-1123)\n", err


async def test_replay_matches_and_catches_a_difference(system, nats_url: str, capsys, tmp_path: Path) -> None:
    code, out, _ = await kipvs("replay", "--nats-url", nats_url, capsys=capsys)
    assert code == 0 and "identical" in out, out
    code, out, _ = await kipvs("replay", "--nats-url", nats_url, "--from", "13", "--to", "16", capsys=capsys)
    assert code == 0 and "KUBE #13..#16" in out

    code, recorded, _ = await kipvs("tap", "--nats-url", nats_url, "--since", "1h", "--no-follow", "--json",
                                    capsys=capsys)
    log = tmp_path / "log.jsonl"
    log.write_text(recorded)
    code, out, _ = await kipvs("replay", "--log", str(log), capsys=capsys)
    assert code == 0 and "identical" in out

    # Every tool reads a recording as it reads the live log (an archived incident; the demo's log).
    for argv in (("why", "--node", "node-a", "10.96.0.10:80"), ("history", "EndpointSlice/default/web-x1"),
                 ("plan", "--node", "node-a", "--at", "14"), ("tap", "--stream", "plan", "--node", "node-b")):
        code, from_file, _ = await kipvs(*argv, "--log", str(log), capsys=capsys)
        code2, live, _ = await kipvs(*argv, "--nats-url", nats_url, *(("--since", "1", "--no-follow")
                                                                      if argv[0] == "tap" else ()), capsys=capsys)
        assert code == code2 == 0 and from_file == live and from_file, argv

    # A published delta that the planner would not produce (say, a planner bug fixed since): exit 1.
    lines = recorded.splitlines()
    for i, line in enumerate(lines):
        doc = json.loads(line)
        if doc["stream"] == topology.PLAN_STREAM and doc["envelope"]["record"]["scope"] == "all":
            op = doc["envelope"]["record"]["ops"][0]
            if op["op"] == "set-service":
                op["service"]["scheduler"] = "wrr"
                lines[i] = json.dumps(doc)
                break
    log.write_text("\n".join(lines) + "\n")
    code, out, _ = await kipvs("replay", "--log", str(log), capsys=capsys)
    assert code == 1 and "differs: plan/all/" in out and "1 differences" in out
    code, out, _ = await kipvs("replay", "--scheduler", "wrr", "--log", str(log), capsys=capsys)
    assert code == 1, "another default scheduler changes every delta"


async def test_plan_at_a_past_moment(system, nats_url: str, capsys, tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    events_file.write_text("\n".join(LINES) + "\n")
    for at in ("14", "18"):
        code, from_log, _ = await kipvs("plan", "--nats-url", nats_url, "--node", "node-a", "--at", at, capsys=capsys)
        code2, from_file, _ = await kipvs("plan", "--events", str(events_file), "--node", "node-a", "--at", at,
                                          capsys=capsys)
        assert code == code2 == 0 and from_log == from_file
    code, early, _ = await kipvs("plan", "--nats-url", nats_url, "--node", "node-a", "--at", "12", capsys=capsys)
    assert "-a -t 10.96.0.10:80" not in early, "before the EndpointSlices: no real servers"
    code, _, err = await kipvs("plan", "--events", str(events_file), "--node", "node-a", "--at", "10m",
                               capsys=capsys)
    assert code == 2 and "number of lines" in err
    first_time = (await read_stream(system, topology.KUBE_STREAM))[0][1].time_ns
    from shared.tools.log_client import clock

    # the first record's time as the tools show it (to the millisecond) covers that millisecond: it is not
    # "before the log" (tests/test_rough_edges.py), and what was logged within it is planned
    code, at_time, _ = await kipvs("plan", "--nats-url", nats_url, "--node", "node-a", "--at", clock(first_time),
                                   capsys=capsys)
    assert code == 0, at_time


def test_object_filter_matches_plan_deltas_by_the_objects_key() -> None:
    from shared.tools.log_client import Entry
    from shared.tools.records import Filter

    def delta(*ops) -> Entry:
        record = events.PlanDelta(scope="all", seq=1, source_seq=1, ops=ops)
        return Entry(topology.PLAN_STREAM, 1, "kipvs.plan.all", events.Envelope(id="d", time_ns=1, producer="t",
                                                                                record=record))

    web = delta(events.SetService(events.ServicePlan(key="default/web")))
    node = delta(events.SetNode(events.NodeFacts(name="node-a")))
    assert Filter(object="Service/default/web").keep(web) and Filter(object="default/web").keep(web)
    assert not Filter(object="Service/default/api").keep(web)
    assert Filter(object="Node/node-a").keep(node) and not Filter(object="Node/node-b").keep(node)


async def test_an_unreachable_nats_is_a_sentence_not_a_hang(capsys) -> None:
    for argv in (("tap", "--since", "1m", "--no-follow"), ("why", "--node", "n", "10.96.0.10:80"),
                 ("history", "Service/default/web"), ("replay",), ("plan", "--node", "n")):
        code, _, err = await asyncio.wait_for(kipvs(*argv, "--nats-url", "nats://127.0.0.1:9", capsys=capsys), 30)
        assert code == 2 and "cannot reach NATS at nats://127.0.0.1:9" in err, (argv, err)


async def test_status_shows_each_node_and_fails_for_a_node_behind(system, nats_url: str, capsys) -> None:
    code, out, _ = await kipvs("status", "--nats-url", nats_url, capsys=capsys)
    lines = out.splitlines()
    node_a = next(line for line in lines if line.startswith("node-a "))
    assert "ok" in node_a and " 0 " in node_a, out
    # node-b and node-c are in the plan but run no applier here: never reported, the check fails.
    assert code == 1 and any(line.startswith("node-b ") and "never reported" in line for line in lines), out
    code, out, _ = await kipvs("status", "--nats-url", nats_url, "--node", "node-a", "--json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["node"] == "node-a" and doc["behind"] == 0 and doc["ok"], out
    code, out, _ = await kipvs("status", "--nats-url", nats_url, "--node", "node-z", capsys=capsys)
    assert code == 1 and "unknown node" in out


def test_status_verdicts_behind_old_and_conflicting() -> None:
    from services.tools.status import collect

    def env(record, at_s: float) -> events.Envelope:
        return events.Envelope(id="x", time_ns=int(at_s * 1e9), producer="t", record=record)

    now = 1_000.0
    last = {
        "kipvs.status.a.applied": env(events.ApplyReport(node="a", plan_seq=10, operations=0, duration_ms=0), now - 1),
        "kipvs.status.b.applied": env(events.ApplyReport(node="b", plan_seq=7, operations=0, duration_ms=0), now - 1),
        "kipvs.status.c.drift": env(events.DriftReport(node="c", plan_seq=10, found=("IPVS service gone",),
                                                       repaired=True, desired_digest="d", observed_digest="d"),
                                   now - 400),
        "kipvs.status.c.facts": env(events.NodeFactsReport(node="c", ipvs_available=True, kube_ipvs0="other",
                                                           endpoint_marks="observe", endpoint_marks_reason="",
                                                           conflicts=("a kube-proxy process runs",)), now - 400),
    }
    got = {s.node: s for s in collect(last, 10, {"a", "b", "c", "d"}, int(now * 1e9), 2, 300)}
    assert got["a"].ok and got["a"].behind == 0
    assert got["b"].problems == ["3 deltas behind the planner (limit 2)"]
    assert got["c"].drift_repaired == 1 and got["c"].problems == ["last report 400s ago (limit 300s)", "1 conflicts"]
    assert got["d"].problems == ["never reported"]


async def test_history_shows_an_unreadable_record_instead_of_failing(system, nats_url: str, capsys) -> None:
    """Garbage, and a well-formed record whose object lost its name, on an object's subject (issue 13)."""
    subject = topology.kube_object_subject("Service", "default", "web")
    await system.publish(subject, b"x")
    broken = events.Envelope(id="broken-1", time_ns=1, producer="test", record=events.KubeEvent(
        kind="Service", action="MODIFIED", namespace="default", name="web", resource_version="99999",
        object={"kind": "Service", "metadata": {"namespace": "default"}}))
    await bus.publish(system, subject, broken)
    code, out, err = await kipvs("history", "--nats-url", nats_url, "Service/default/web", capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "unreadable record skipped (not a kipvs envelope)" in out
    assert "rv=99999" in out, "the nameless record is shown as the change it is"


def test_status_a_node_that_left_the_cluster_does_not_fail_the_check(capsys) -> None:
    from services.tools.status import collect

    old = events.Envelope(id="x", time_ns=1, producer="t",
                          record=events.ApplyReport(node="gone", plan_seq=1, operations=0, duration_ms=0))
    got = {s.node: s for s in collect({"kipvs.status.gone.applied": old}, 50, {"other"}, 10**18, 0, 300)}
    assert got["gone"].ok and got["gone"].gone
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status", "--max-behind", "-1"])
    assert exit_.value.code == 2 and "is negative" in capsys.readouterr().err


async def test_replay_says_whether_the_log_is_missing_or_empty(nats_url: str, capsys) -> None:
    """No streams at all (a wiped store nobody declared again) is not "an empty log": each is said as it is."""
    code, _, err = await kipvs("replay", "--nats-url", nats_url, capsys=capsys)
    assert code == 2 and "there is no KIPVS_KUBE stream on this NATS" in err, err
    nc = await nats.connect(nats_url)
    await bus.setup(nc)
    await nc.close()
    code, _, err = await kipvs("replay", "--nats-url", nats_url, capsys=capsys)
    assert code == 2 and "the Kubernetes log is empty: nothing to replay" in err, err


def test_status_a_node_whose_kernel_refuses_an_operation_is_not_ok() -> None:
    """A node that follows the log but whose kernel refuses part of it (a scheduler module it lacks) is red
    while its newest report says so; a report without refusals clears it."""
    from services.tools.status import collect

    refused = "the kernel refused 1 operation(s): AddService(...): the kernel has no IPVS scheduler 'twos'"

    def at(record: events.ApplyReport | events.DriftReport, time_ns: int) -> events.Envelope:
        return events.Envelope(id=str(time_ns), time_ns=time_ns, producer="t", record=record)

    now = 10**12
    drift = events.DriftReport(node="a", plan_seq=5, found=("AddService ...", refused), repaired=True,
                               desired_digest="d", observed_digest="o")
    last = {"kipvs.status.a.applied": at(events.ApplyReport(node="a", plan_seq=5, operations=3, duration_ms=1,
                                                            errors=(refused,)), now - 10),
            "kipvs.status.a.drift": at(drift, now - 5)}
    (status,) = collect(last, 5, {"a"}, now, 0, 300)
    assert not status.ok and status.problems == [refused]
    last["kipvs.status.a.applied"] = at(events.ApplyReport(node="a", plan_seq=5, operations=0, duration_ms=1), now)
    (status,) = collect(last, 5, {"a"}, now, 0, 300)
    assert status.ok, status.problems
