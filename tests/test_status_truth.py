"""``kipvs status`` tells the truth about every stage (issue 21, "Green only when true"): a planner that
does not follow the log, a node that lags for longer than a change takes, a node holding a plan the
stream no longer has (a wiped store), and report ages by the server's clock, not the reporter's."""

from __future__ import annotations

import asyncio
import json
import time

import nats

from services.tools.pipeline import delta_times, planner_verdict
from services.tools.status import collect
from shared.contract import delta_chunks, events, topology
from shared.messaging import bus
from tests import kube
from tests.helpers import kipvs, publish_kube


def _applied(node: str, seq: int, at_ns: int) -> events.Envelope:
    return events.Envelope(id=f"applied/{node}/{seq}", time_ns=at_ns, producer=f"applier/{node}",
                           record=events.ApplyReport(node=node, plan_seq=seq, operations=0, duration_ms=0))


async def _declared(url: str) -> tuple[nats.NATS, object]:
    nc = await nats.connect(url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    return nc, js


async def test_a_report_is_aged_by_the_server_not_by_a_node_clock_an_hour_off(nats_url: str, capsys) -> None:
    nc, js = await _declared(nats_url)
    try:
        skewed = time.time_ns() - 3600 * 10**9  # the node's clock is an hour behind
        await bus.publish(js, topology.status_subject("node-a", "applied"), _applied("node-a", 0, skewed))
    finally:
        await nc.close()
    code, out, _ = await kipvs("status", "--nats-url", nats_url, "--node", "node-a", "--json", capsys=capsys)
    doc = json.loads(out)
    assert doc["report_age_s"] < 60 and doc["ok"] and code == 0, out


async def test_a_planner_that_does_not_follow_the_log_fails_the_check_after_the_lag_limit(nats_url: str,
                                                                                       capsys) -> None:
    nc, js = await _declared(nats_url)
    try:
        lines = [json.dumps({"type": "ADDED", "object": kube.service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}")})
                 for i in range(3)]
        await publish_kube(js, lines, "stuck")  # no planner runs: nothing takes them
        # a node that holds the (empty) plan: the nodes are not what this test is about
        await bus.publish(js, topology.status_subject("node-a", "applied"), _applied("node-a", 0, time.time_ns()))
    finally:
        await nc.close()
    code, out, _ = await kipvs("status", "--nats-url", nats_url, "--max-lag", "20", capsys=capsys)
    assert code == 0 and "3 records behind" in out and "ok" in out.splitlines()[0], out  # in flight: tolerated
    await asyncio.sleep(1.5)
    code, out, _ = await kipvs("status", "--nats-url", nats_url, "--max-lag", "1", capsys=capsys)
    assert code == 1, out
    assert "3 log records not planned, the oldest stored" in out.splitlines()[0], out


def test_planner_verdicts() -> None:
    now = 100 * 10**9
    assert planner_verdict(10, 10, None, now, 30).ok  # caught up
    assert planner_verdict(12, 10, now - 5 * 10**9, now, 30).ok  # two records in flight for 5 s
    late = planner_verdict(12, 10, now - 40 * 10**9, now, 30)
    assert late.problems == ["2 log records not planned, the oldest stored 40s ago (limit 30s)"]
    wiped = planner_verdict(3, 500, None, now, 30)
    assert "below the planner's position 500: the stream was replaced" in wiped.problems[0]
    assert "does not exist" in planner_verdict(3, None, None, now, 30).problems[0]


def test_node_lag_is_judged_by_the_age_of_the_first_delta_it_lacks() -> None:
    now = 1_000 * 10**9
    last = {f"kipvs.status.{n}.applied": _applied(n, seq, now) for n, seq in
            (("in-flight", 9), ("stuck", 5), ("ahead", 40), ("current", 10))}
    times = {9: now - 50 * 10**9, 10: now - 2 * 10**9}  # delta 10 published 2 s ago, 9 before; 6 out of the window
    got = {s.node: s for s in collect(last, 10, set(), now, 0, 300, times, 30)}
    assert got["current"].ok and got["in-flight"].ok, got["in-flight"].problems
    assert got["stuck"].problems == ["5 deltas behind the planner for over 30s"]
    assert "the plan stream was replaced" in got["ahead"].problems[0]
    times[10] = now - 45 * 10**9
    got = {s.node: s for s in collect(last, 10, set(), now, 0, 300, times, 30)}
    assert got["in-flight"].problems == ["1 deltas behind the planner for 45s (limit 30s)"]


async def test_status_on_a_store_without_streams_is_one_line_and_exit_2(nats_url: str, capsys) -> None:
    code, _, err = await kipvs("status", "--nats-url", nats_url, capsys=capsys)
    assert code == 2 and "Traceback" not in err and "a stream kipvs needs does not exist" in err, err


async def test_status_reads_what_it_needs_as_the_tools_identity(tmp_path, capsys) -> None:
    """The planner's consumer, the log's head and the plan's server times: all within the tools' rights."""
    from tests.secure_nats import SecureNats

    server = SecureNats(tmp_path)
    server.start()
    try:
        nc = await server.connect("admin")
        js = await bus.setup(nc, 1, [topology.planner_consumer()])
        await publish_kube(js, [json.dumps({"type": "ADDED", "object": kube.service("web")})], "tools")
        await bus.publish(js, topology.status_subject("node-a", "applied"), _applied("node-a", 0, time.time_ns()))
        await nc.close()
        tools = server.identity("tools")
        code, out, err = await kipvs("status", "--nats-url", server.url, "--nats-nkey-file", str(tools.nkey_file),
                                     "--nats-ca-file", str(tools.ca_file), capsys=capsys)
        assert code == 0 and "Traceback" not in err, err
        assert "at log seq 0 of KIPVS_KUBE (last seq 1), 1 records behind" in out.splitlines()[0], out
    finally:
        server.stop()


async def test_a_store_with_nothing_planned_and_no_report_is_not_green(nats_url: str, capsys) -> None:
    """A wiped store once the streams are declared again, before the Nodes are logged: nothing to compare,
    and nothing programmed by this plan either."""
    nc, _ = await _declared(nats_url)
    await nc.close()
    code, out, _ = await kipvs("status", "--nats-url", nats_url, capsys=capsys)
    assert code == 1 and "the plan holds no Node and no node has reported" in out.splitlines()[0], out


async def test_a_delta_in_parts_is_timed_by_when_it_was_stored(nats_url: str) -> None:
    """``kipvs status`` ages a node's lag by when the first delta it lacks was stored; a delta in parts
    (PlanDeltaChunk) had no time, so a node a second behind a large change was "behind for over 30s"."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    ops = tuple(events.RemoveService(key=f"default/s{i}") for i in range(3000))
    delta = events.Envelope(id="plan/all/1", time_ns=1, producer="planner",
                            record=events.PlanDelta(scope="all", seq=1, source_seq=1, ops=ops))
    parts = delta_chunks.split(delta, 16_000)
    assert len(parts) > 1
    before = time.time_ns() - 1_000_000_000
    for part in parts:
        await js.publish(topology.PLAN_ALL_SUBJECT, events.encode(part))
    times = await delta_times(js, bus.LogReader(topology.PLAN_STREAM), before)
    await nc.close()
    assert set(times) == {1} and before < times[1] <= time.time_ns()
