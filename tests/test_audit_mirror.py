"""The audit mirror follows the current KIPVS_PLAN (issue 21): the tools read the plan through the mirror
KIPVS_PLAN_AUDIT, and a server's mirror outlives the stream it mirrors. After KIPVS_PLAN was deleted and
declared again under running services, the old mirror kept the old stream's deltas 1..N, skipped the new
stream's up to N and joined the rest onto the old ones, for good: 'kipvs status' and 'kipvs replay' failed
for correct nodes, 'kipvs tap' showed none of the new deltas, and 'kipvs topology apply' did not repair it.
Now a declare replaces a mirror of an older KIPVS_PLAN, and until then the tools say so in one line."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import events, topology
from shared.messaging import bus
from shared.service import config
from tests import kube
from tests.helpers import kipvs, publish_kube, start_service, until
from tests.secure_nats import SecureNats


def _service(name: str, ip: str) -> str:
    return json.dumps({"type": "ADDED", "object": kube.service(name, cluster_ip=ip)})


async def _plan(js) -> list[tuple[int, str, str]]:
    """KIPVS_PLAN itself as the admin reads it: (stream seq, subject, envelope id)."""
    return [(m.metadata.sequence.stream, m.subject, events.decode(m.data).id)
            async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]


async def _shared_head(js) -> int:
    """The newest shared delta's sequence in KIPVS_PLAN (0 when none)."""
    records = [events.decode(m.data).record
               async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]
    return max((getattr(r, "seq", 0) for r in records), default=0)


def test_a_mirror_is_stale_when_its_recorded_source_is_not_the_current_stream() -> None:
    now = topology.StreamIdentity(topology.PLAN_STREAM, "2026-12-06T07:00:00+00:00", 1, 5)
    assert topology.stale_mirror(now, now.created, 5) == ""
    assert topology.stale_mirror(now, now.created, 3) == ""  # catching up
    assert "is of an older KIPVS_PLAN (created at 2026-12-05" in topology.stale_mirror(
        now, "2026-12-05T07:00:00+00:00", 3)
    assert "holds sequence 9, KIPVS_PLAN ends at 5" in topology.stale_mirror(now, now.created, 9)
    assert "does not record which KIPVS_PLAN" in topology.stale_mirror(now, "", 0)


@pytest.fixture
def secure(tmp_path: Path):
    server = SecureNats(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_a_replaced_plan_stream_gets_a_new_mirror_and_the_tools_read_it(secure: SecureNats,
                                                                              capsys) -> None:
    admin = await secure.connect("admin")
    js = await bus.setup(admin, 1, [topology.planner_consumer()])
    watcher = await secure.connect("watcher", inbox_prefix="_INBOX_watcher")
    wjs = watcher.jetstream(timeout=5)
    await publish_kube(wjs, [_service(f"web-{i}", f"10.96.0.{10 + i}") for i in range(6)], "first")
    cfg = config.load(PlannerServiceConfig, {"nats_url": secure.url, "http_listen": "",
                                             "nats_nkey_file": str(secure.dir / "planner.nk"),
                                             "nats_ca_file": str(secure.dir / "ca.pem")}, {})
    planner, stop = start_service("planner", cfg, plan)
    tools = secure.identity("tools")
    as_tools = ("--nats-url", secure.url, "--nats-nkey-file", str(tools.nkey_file),
                "--nats-ca-file", str(tools.ca_file))

    async def mirrored() -> bool:
        head = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
        return head > 0 and (await js.stream_info(topology.PLAN_AUDIT_STREAM)).state.last_seq == head

    async def report_applied(seq: int) -> None:  # a node that holds the current plan
        await bus.publish(js, topology.status_subject("node-a", "applied"), events.Envelope(
            id=f"applied/node-a/{seq}/{time.time_ns()}", time_ns=time.time_ns(), producer="applier/node-a",
            record=events.ApplyReport(node="node-a", plan_seq=seq, operations=0, duration_ms=0)))

    try:
        await until(mirrored, "the first plan mirrored")
        old = await _plan(js)
        assert len(old) >= 6, old

        # KIPVS_PLAN replaced under the running planner (a store restored without it, an operator's
        # 'nats stream rm' and a new declare of the stream alone): the planner starts again from it.
        plan_spec = next(s for s in topology.streams(1) if s.config.name == topology.PLAN_STREAM)
        await js.delete_stream(topology.PLAN_STREAM)
        await js.add_stream(plan_spec.config)
        await until(lambda: _plan_has(js, 1), "the planner published into the new KIPVS_PLAN")
        # Until the mirror is declared again, the tools name it in one line instead of false lag.
        for tool in (("status",), ("replay",), ("tap", "--stream", "plan", "--since", "1", "--no-follow")):
            code, out, err = await kipvs(*tool, *as_tools, capsys=capsys)
            assert code != 0 and "Traceback" not in err, (tool, out, err)
            said = [line for line in err.splitlines() if "audit mirror" in line]
            assert len(said) == 1 and "is of an older KIPVS_PLAN" in said[0] \
                and "run 'kipvs topology apply'" in said[0], (tool, err)

        await bus.setup(admin, 1, [topology.planner_consumer()])  # what 'kipvs topology apply' does
        await publish_kube(wjs, [_service("web-late", "10.96.0.99")], "after")
        await until(mirrored, "the new plan mirrored")
        await until(lambda: _has_vip(js, "10.96.0.99"), "the late change planned")
        await until(mirrored, "the late change mirrored")

        new = await _plan(js)
        code, out, err = await kipvs("tap", "--stream", "plan", "--since", "1", "--no-follow", "--json",
                                     *as_tools, capsys=capsys)
        assert code == 0, err
        tapped = [json.loads(line) for line in out.splitlines() if line.strip()]
        # (tap orders by record time: the test's Kubernetes records carry made-up times)
        assert sorted((t["seq"], t["subject"], t["envelope"]["id"]) for t in tapped) == new, (tapped, new)

        # replay compares the new stream's deltas, not the old ones (it is not green here: the new stream
        # opens with the planner's reconcile of everything logged, which a replay of the log does not produce)
        code, out, err = await kipvs("replay", *as_tools, capsys=capsys)
        assert f"({len(new)} published deltas)" in out.splitlines()[-1] and "Traceback" not in err, out + err
        first = next(line for line in out.splitlines() if "published: PLAN #1 " in line)
        assert "(from KUBE #6)" in first, out  # the new stream's reconcile, not the old delta 1
        await report_applied(await _shared_head(js))
        code, out, err = await kipvs("status", *as_tools, "--max-lag", "60", capsys=capsys)
        assert code == 0 and "Traceback" not in err, out + err

        # The mirror alone deleted: every plan read found nothing ("does not forward", "no plan change")
        # and said so with exit 0; now the tools name the missing mirror in one line.
        await js.delete_stream(topology.PLAN_AUDIT_STREAM)
        for tool in (("why", "--node", "node-a", "10.96.0.99:80"), ("history", "Service/default/web-late"),
                     ("tap", "--stream", "plan", "--since", "1", "--no-follow"), ("status",)):
            code, out, err = await kipvs(*tool, *as_tools, capsys=capsys)
            said = [line for line in err.splitlines() if "audit mirror" in line]
            assert code != 0 and len(said) == 1 and "does not exist" in said[0] \
                and "run 'kipvs topology apply'" in said[0], (tool, out, err)
    finally:
        stop.set()
        await asyncio.wait_for(planner, 30)
        await watcher.close()
        await admin.close()


async def _plan_has(js, count: int) -> bool:
    try:
        return (await js.stream_info(topology.PLAN_STREAM)).state.last_seq >= count
    except NotFoundError:  # between its delete and its add
        return False


async def _has_vip(js, ip: str) -> bool:
    return any([ip in m.data.decode("utf-8", "replace")
                async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)])


