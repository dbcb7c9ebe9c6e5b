"""Small helpers for tests that wait on real processes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable


async def eventually(predicate: Callable[[], bool], within: float = 60.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds; fail the test (never hang) when it does not within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 60.0) -> None:
    """``eventually`` for an asynchronous check (a scrape, a stream read): awaited every 0.2 s until it holds;
    the test fails when it does not within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.2)


async def publish_kube(js, lines: list[str], source: str) -> None:
    """Watch-format lines into KIPVS_KUBE as the watcher would log them (``source`` names the ids: distinct
    per batch, or JetStream de-duplicates them)."""
    from services.planner.log_replay import read_events
    from shared.contract import topology
    from shared.messaging import bus

    for env in read_events(lines, source):
        r = env.record
        await bus.publish(js, topology.kube_object_subject(r.kind, r.namespace, r.name), env)


def start_service(name: str, cfg, main) -> tuple[asyncio.Task, asyncio.Event]:
    """Run a service (planner or applier) in this process with its real runtime; set the event to stop it."""
    from shared.contract import topology
    from shared.service import runtime

    stop = asyncio.Event()
    consumers = [topology.planner_consumer()] if name == "planner" else []  # an applier creates its own
    return asyncio.create_task(runtime.run_service(name, cfg, main, consumers=consumers, stop=stop)), stop


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until a server process listens on 127.0.0.1:``port``; fail when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nats-server did not start listening")


async def kipvs(*argv: str, capsys) -> tuple[int, str, str]:
    """Run a kipvs subcommand as a user would (its own event loop, in a thread): (exit code, stdout, stderr)."""
    from shared.service import cli

    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err
