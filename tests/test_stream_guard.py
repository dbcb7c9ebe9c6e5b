"""A stream's identity (shared/messaging/stream_guard.py): the same stream across a server restart and a purge, another
one once it was deleted and declared again (a wiped store), on a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from shared.contract import topology
from shared.messaging.stream_guard import StreamGuard
from tests.conftest import NatsServer


def test_replacement_reasons() -> None:
    before = topology.StreamIdentity("S", "2026-12-06T05:00:00+00:00", 1, 40)
    assert topology.replacement(before, topology.StreamIdentity("S", before.created, 41, 40)) == ""  # purged
    assert "no longer exists" in topology.replacement(before, None)
    assert "was created again" in topology.replacement(
        before, topology.StreamIdentity("S", "2026-12-06T06:00:00+00:00", 1, 90))
    assert "went back from 40 to 3" in topology.replacement(before, topology.StreamIdentity("S", "", 1, 3))


async def test_a_restart_and_a_purge_keep_the_stream_a_wipe_replaces_it(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store")
    server.start()
    tripped: list[str] = []
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="S", subjects=["s.>"])
        for _ in range(3):
            await js.publish("s.a", b"x")
        guard = StreamGuard(js, ["S"], tripped.append)
        await guard.pin()
        server.stop()
        server.start()  # the same store: the same stream
        for _ in range(100):
            if nc.is_connected:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # JetStream recovers the stream
        assert await guard.check() == "" and not tripped
        await js.purge_stream("S")
        assert await guard.check() == "" and not tripped
        await js.delete_stream("S")
        assert await guard.check() == "" and not tripped  # missing once: maybe a cluster electing its leaders
        reason = await guard.check()
        assert "stream S no longer exists" in reason and tripped == [reason]
        await js.add_stream(name="S", subjects=["s.>"])
        again = StreamGuard(js, ["S"], tripped.append)
        again.pinned = dict(guard.pinned)
        reason = await again.check()
        assert "stream S was created again" in reason and tripped[-1] == reason
        await nc.close()
    finally:
        server.stop()
