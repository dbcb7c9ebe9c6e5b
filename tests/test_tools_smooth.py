"""Tool defects an operator meets first (issue 16): parked records in `kipvs tap` (the time the server stored
them, their bytes as they are), Calico warnings in tap's lines, `kipvs --version`. Against a real nats-server
and the real planner service, the tools run as a user runs them."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import nats
import pytest

from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import topology
from shared.messaging import bus
from shared.service import cli, config
from tests import kube
from tests.helpers import publish_kube, start_service
from tests.logread import read_stream


async def kipvs(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run a kipvs subcommand as a user would (its own event loop, in a thread)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_parked_records_show_their_time_and_exact_bytes(nats_url: str, capsys) -> None:
    raw = b'{"id": "x", "name": "caf\xc3\xa9 \xff\xfe\x00 tail"}'  # valid UTF-8, then bytes that are not
    text = "plain text: caf\u00e9"
    nc = await nats.connect(nats_url)
    try:
        js = await bus.setup(nc)
        before = time.time()
        headers = {topology.PARK_REASON: "undecodable: not JSON", topology.PARK_SERVICE: "planner",
                   topology.PARK_STREAM: topology.KUBE_STREAM, topology.PARK_SEQUENCE: "12",
                   topology.PARK_SUBJECT: "kipvs.kube.obj.Service.default.web"}
        await js.publish(topology.parked_subject("planner"), raw, headers=headers)
        await js.publish(topology.parked_subject("planner"), text.encode(), headers=headers)
        after = time.time()
    finally:
        await nc.close()

    code, out, err = await kipvs("tap", "--nats-url", nats_url, "--stream", "parked", "--since", "1",
                                 "--no-follow", capsys=capsys)
    assert code == 0, err
    first, second = out.splitlines()
    stream, seq, stamp, rest = first.split(" ", 3)
    assert (stream, seq) == ("PARKED", "#1"), first
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    assert before - 1 <= when <= after + 1, f"the time the server stored it: {stamp}"
    assert rest.endswith(f"kipvs.parked.planner: undecodable: not JSON (KIPVS_KUBE #12 "
                         f"kipvs.kube.obj.Service.default.web, parked by planner): {raw!r}"), rest
    assert "\ufffd" not in out, "no lossy decoding"
    assert second.endswith(f": {text.encode()!r}")

    code, out, err = await kipvs("tap", "--nats-url", nats_url, "--stream", "parked", "--since", "1",
                                 "--no-follow", "--json", capsys=capsys)
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == 0 and base64.b64decode(first["data_base64"]) == raw and "data" not in first, first
    assert first["reason"] == "undecodable: not JSON" and first["headers"][topology.PARK_SEQUENCE] == "12"
    assert before - 1 <= datetime.fromisoformat(first["time"].replace("Z", "+00:00")).timestamp() <= after + 1
    assert second["data"] == text and base64.b64decode(second["data_base64"]) == text.encode(), "UTF-8: exact"


def test_a_long_parked_payload_is_cut_on_its_line_and_says_so() -> None:
    from shared.tools.log_client import Entry
    from shared.tools.records import one_line

    entry = Entry(topology.PARKED_STREAM, 3, "kipvs.parked.applier", None, b"\x01" * 5000, {})
    line = one_line(entry)
    assert line.startswith("PARKED #3 (time not recorded) kipvs.parked.applier: not a kipvs envelope: b'\\x01")
    assert line.endswith("... (5000 bytes, the first 1000 shown; --json has them all)")


def felix(name: str, **spec: object) -> dict:
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration", "metadata": {"name": name},
            "spec": spec}


async def test_tap_shows_a_nodes_calico_warnings(nats_url: str, capsys) -> None:
    pods = [kube.pod(f"p{i}", ip=f"10.244.1.{i + 10}") for i in range(8)]
    objects = [kube.node("node-a", "192.0.2.1"), felix("default", iptablesMarkMask=0x0FF0), *pods]
    lines = [json.dumps({"type": "ADDED", "object": o}) for o in objects]
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, lines, "calico")
    cfg = config.load(PlannerServiceConfig, {"nats_url": nats_url, "http_listen": ""}, {})
    planner, stop = start_service("planner", cfg, plan)
    node_deltas: list = []

    async def poll() -> None:
        while True:
            node_deltas[:] = await read_stream(js, topology.PLAN_STREAM, topology.plan_node_subject("node-a"))
            if any("endpoint-marks-exhausted" in str(env.record) for _, env in node_deltas):
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), 60)
    finally:
        stop.set()
        await asyncio.gather(planner, return_exceptions=True)
        await nc.close()

    code, out, err = await kipvs("tap", "--nats-url", nats_url, "--stream", "plan", "--since", "1",
                                 "--no-follow", "--node", "node-a", capsys=capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "set-node-calico node-a" in line and "WARNING" in line][-1:]
    assert "6 endpoint marks (2 endpoints without a mark)" in line, line
    assert "WARNING endpoint-marks-exhausted node-a: 2 pods on node-a have no endpoint mark (capacity 6)" in line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    expected = f"kipvs {metadata.version('kipvs')}\n"
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == expected
    assert cli.main(["-V"]) == 0 and capsys.readouterr().out == expected
    script = Path(sys.executable).with_name("kipvs")  # the installed command
    if script.exists():
        done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == expected and not done.stderr
