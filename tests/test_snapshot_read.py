"""Reading the plan snapshot on a real nats-server while it is being replaced (issue 17): the planner's next
snapshot purges the chunks of the one a bootstrapping applier is reading, and nats-py's object-store reader
then waits for them forever. The read is bounded and retried, so the reader gets the new snapshot."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.planner.core import Planner
from shared.contract import events, topology
from shared.messaging import bus, plan_log


def _snapshot(stream_seq: int) -> bytes:
    snap = Planner().snapshot(plan_stream_seq=stream_seq)
    return events.encode(events.Envelope(id=f"snapshot/all/{stream_seq}", time_ns=1, producer="test", record=snap))


async def _orphan_the_snapshot(js) -> None:
    """What a reader sees when the snapshot is replaced under it: its object's chunks gone."""
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    info = await store.get_info(topology.snapshot_object("all"))
    await js.purge_stream(f"OBJ_{topology.SNAPSHOT_BUCKET}",
                          subject=f"$O.{topology.SNAPSHOT_BUCKET}.C.{info.nuid}")


async def test_a_snapshot_replaced_while_read_is_read_again(nc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_log, "SNAPSHOT_READ_S", 1.0)

    async def same_stream(js: object, snap: object) -> str:
        return ""  # these snapshots name plan-stream positions this test never fills: about reading the object only

    monkeypatch.setattr(plan_log, "_other_stream", same_stream)
    js = await bus.setup(nc)
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    await store.put(topology.snapshot_object("all"), _snapshot(7))
    await _orphan_the_snapshot(js)
    reader = asyncio.create_task(plan_log.load_snapshot(js, bus.LogReader(topology.PLAN_STREAM)))
    await asyncio.sleep(0.3)
    await store.put(topology.snapshot_object("all"), _snapshot(9))  # the planner's next snapshot
    _, stream_seq = await asyncio.wait_for(reader, 10)
    assert stream_seq == 9


async def test_a_snapshot_that_cannot_be_read_is_a_bus_error_not_a_hang(nc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_log, "SNAPSHOT_READ_S", 0.5)
    js = await bus.setup(nc)
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    await store.put(topology.snapshot_object("all"), _snapshot(7))
    await _orphan_the_snapshot(js)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="could not be read in 3 attempts"):
        await plan_log.load_snapshot(js, bus.LogReader(topology.PLAN_STREAM))
    assert time.monotonic() - started < 10
