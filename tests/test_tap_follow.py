"""``kipvs tap`` following the live log through what a busy cluster does to it (issue 26): a real nats-server
restarted under it, stalled (SIGSTOP) under it, and a burst of large records far over the server's
``max_pending`` read by a slow reader. Every record shows once, in order; the tool never exits or stalls
on its own, and says a lost connection in one line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from services.tools import tap
from shared.contract import topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from tests.conftest import NatsServer
from tests.helpers import wait_port

KIPVS = str(Path(sys.executable).with_name("kipvs"))
STATUS = "kipvs.status.node-a.applied"
WAIT = 60.0  # seconds a record may take to show on a loaded machine


class Tap:
    """``kipvs tap --json`` as a user runs it, in its own process; its output read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seqs: list[int] = []
        self.errors: list[str] = []
        self._err_reader = asyncio.create_task(self._read_errors())

    @classmethod
    async def start(cls, url: str, *argv: str) -> Tap:
        proc = await asyncio.create_subprocess_exec(KIPVS, "tap", "--nats-url", url, "--json", *argv,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    limit=2**24)
        return cls(proc)

    async def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.errors.append(line.decode().rstrip("\n"))

    async def read_until(self, count: int) -> list[int]:
        """Read lines until ``count`` records have shown (failing when the tool stops or stalls)."""
        assert self.proc.stdout is not None
        while len(self.seqs) < count:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
            except TimeoutError:
                raise AssertionError(f"tap stalled after {self.seqs[-1:]} ({len(self.seqs)} of {count} records); "
                                     f"stderr: {self.errors}") from None
            assert line, f"tap exited ({await self.proc.wait()}) after {len(self.seqs)} records: {self.errors}"
            self.seqs.append(json.loads(line)["seq"])
        return self.seqs

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), WAIT)
        await asyncio.wait_for(self._err_reader, WAIT)
        return code


async def _publish(js, count: int, size: int = 16) -> None:
    for _ in range(count):
        await js.publish(STATUS, os.urandom(size))


async def test_live_tap_follows_through_a_server_restart(tmp_path: Path) -> None:
    """The server stops and starts again (same store) while ``kipvs tap`` follows: the tool says the loss
    in one line, keeps running, and resumes after the last record it showed: nothing missed, nothing twice.
    (It exited with "NATS at ... failed" before.)"""
    server = NatsServer(tmp_path / "store")
    server.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = await bus.setup(nc)
        await _publish(js, 30)
        follower = await Tap.start(server.url, "--stream", "status", "--since", "1")
        try:
            await follower.read_until(30)
            server.stop()
            await asyncio.sleep(1.0)
            server.start()
            await _published_once_back(js, 30)
            assert await follower.read_until(60) == list(range(1, 61))
            await _publish(js, 10)
            assert await follower.read_until(70) == list(range(1, 71))
            assert follower.proc.returncode is None, follower.errors
        finally:
            code = await follower.stop()
        lost = [line for line in follower.errors if "was lost" in line]
        assert len(lost) == 1 and lost[0].startswith("kipvs tap: the connection to NATS at"), follower.errors
        assert not any("Server Shutdown" in line for line in follower.errors), "the loss is said once"
        assert any("again; following on" in line for line in follower.errors), follower.errors
        assert not any("Traceback" in line for line in follower.errors), follower.errors
        assert code == 0, (code, follower.errors)
    finally:
        await nc.close()
        server.stop()


async def _published_once_back(js, count: int) -> None:
    """Publish ``count`` records once the restarted server's JetStream takes them."""
    for _ in range(600):
        try:
            await js.publish(STATUS, b"probe-free", timeout=1)
            break
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the restarted server never took a record")
    await _publish(js, count - 1)


@pytest.fixture
async def small_pending(tmp_path: Path) -> AsyncIterator[str]:
    """A server that drops a subscriber with 8 MiB pending as a slow consumer (the default is 64 MiB)."""
    port = free_loopback_port()
    conf = tmp_path / "server.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_pending: {8 * 2**20}\n'
                    f'jetstream {{ store_dir: "{tmp_path / "store"}" }}\n')
    proc = subprocess.Popen([server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def test_live_tap_takes_a_burst_over_max_pending_with_a_slow_reader(small_pending: str) -> None:
    """150 records of 200 KB (30 MB, nearly 4x the server's max_pending) arrive while nobody reads the tool's
    output: pulls bounded by bytes keep the tool from being dropped as a slow consumer, and every record
    shows once, in order."""
    nc = await nats.connect(small_pending)
    try:
        js = await bus.setup(nc)
        follower = await Tap.start(small_pending, "--stream", "status", "--since", "1")
        try:
            await _publish(js, 1)
            await follower.read_until(1)
            await _publish(js, 150, size=200_000)
            await asyncio.sleep(2.0)  # the tool's output pipe is full: it waits on its reader
            assert await follower.read_until(151) == list(range(1, 152))
        finally:
            code = await follower.stop()
        assert code == 0 and not any("again" in line for line in follower.errors), (code, follower.errors)
    finally:
        await nc.close()


async def test_follow_goes_on_after_a_stalled_server(tmp_path: Path, monkeypatch) -> None:
    """A server that answers nothing for a while (stopped with SIGSTOP, as a loaded machine can): pulls and
    requests time out (nats-py's TimeoutError or a bare asyncio one) and are retried; once it answers
    again the follow goes on, nothing missed, nothing twice."""
    monkeypatch.setattr(tap, "FOLLOW_WAIT", 0.5)
    monkeypatch.setattr(tap, "ANSWER_MARGIN", 1.0)
    server = NatsServer(tmp_path / "store")
    server.start()
    assert server.proc is not None
    nc = await nats.connect(server.url)
    seen: list[bytes] = []

    async def pump() -> None:
        async for entry in tap.follow(js, bus.LogReader(topology.STATUS_STREAM), "status", 0):
            seen.append(entry.raw)

    try:
        js = await bus.setup(nc)
        await js.publish(STATUS, b"before")
        task = asyncio.create_task(pump())
        await asyncio.sleep(1.0)
        await js.publish(STATUS, b"1")
        await _until(lambda: seen == [b"1"], "the first record")
        server.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(4.0)  # several pulls time out meanwhile
        server.proc.send_signal(signal.SIGCONT)
        for n in range(2, 6):
            await js.publish(STATUS, str(n).encode())
        await _until(lambda: seen == [b"1", b"2", b"3", b"4", b"5"], "the records after the stall")
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        await nc.close()
        server.stop()


async def _until(check, what: str) -> None:
    for _ in range(int(WAIT * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_follow_of_a_missing_stream_says_so_once_and_starts_when_it_comes(nats_url: str, capsys,
                                                                                monkeypatch) -> None:
    """A stream that does not exist (yet) is said once, not every second, and followed once it exists."""
    monkeypatch.setattr(tap, "RETRY_PAUSE", 0.2)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    seen: list[bytes] = []

    async def pump() -> None:
        async for entry in tap.follow(js, bus.LogReader(topology.STATUS_STREAM), "status", 1):
            seen.append(entry.raw)

    task = asyncio.create_task(pump())
    try:
        await asyncio.sleep(3.0)  # about 15 attempts
        js = await bus.setup(nc)
        await js.publish(STATUS, b"1")
        await js.publish(STATUS, b"2")
        await _until(lambda: seen == [b"2"], "the record after seq 1 once the stream exists")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "again after seq" in line]
    assert len(lines) == 1 and topology.STATUS_STREAM in lines[0] and "NotFound" in lines[0], lines
