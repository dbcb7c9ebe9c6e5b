"""The applier's status reports, paced (services/applier/report_pacer.py): pure logic, an in-memory publisher.
The applier publishing them into a real KIPVS_STATUS is tested in test_applier_service.py and
test_status_truth.py."""

from __future__ import annotations

import asyncio
import itertools

import nats.errors

from services.applier.report_pacer import BUSY_AFTER, ReportPacer
from shared.contract import events

INTERVAL = 0.3


def applied(seq: int, ops: int = 1, digest: str = "d", errors: tuple[str, ...] = ()) -> events.Envelope:
    record = events.ApplyReport(node="n", plan_seq=seq, operations=ops, duration_ms=0.1, desired_digest=digest,
                                errors=list(errors))
    return events.Envelope(id=f"applied/n/{seq}/{ops}", time_ns=seq, producer="applier/n", record=record)


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []
        self.fail = 0

    async def publish(self, kind: str, envelope: events.Envelope) -> None:
        if self.fail:
            self.fail -= 1
            raise nats.errors.TimeoutError
        self.got.append((kind, envelope.record.plan_seq))


async def test_a_burst_is_two_reports_the_first_at_once_and_the_newest_after_the_interval() -> None:
    sink = Sink()
    pacer = ReportPacer(sink.publish, INTERVAL)
    pacer.offer("applied", applied(1))
    await asyncio.sleep(0.05)
    assert sink.got == [("applied", 1)]  # a lone change: no delay
    for seq in range(2, 12):
        pacer.offer("applied", applied(seq))
        await asyncio.sleep(0.01)
    assert sink.got == [("applied", 1)]
    await asyncio.sleep(INTERVAL + 0.2)
    assert sink.got == [("applied", 1), ("applied", 11)]  # ten changes, one report: the newest


async def test_kinds_are_paced_apart() -> None:
    sink = Sink()
    pacer = ReportPacer(sink.publish, INTERVAL)
    pacer.offer("applied", applied(1))
    pacer.offer("drift", applied(1))
    await asyncio.sleep(0.1)
    assert sorted(sink.got) == [("applied", 1), ("drift", 1)]


async def test_a_report_that_says_nothing_new_is_not_published() -> None:
    sink = Sink()
    pacer = ReportPacer(sink.publish, 0.0)
    pacer.offer("applied", applied(5))
    await asyncio.sleep(0.05)
    pacer.offer("applied", applied(5, ops=0))  # same delta, same state, nothing written
    await asyncio.sleep(0.05)
    assert sink.got == [("applied", 5)]
    pacer.offer("applied", applied(5, ops=0, errors=("kernel write failed",)))  # an error is news
    pacer.offer("applied", applied(5, ops=0, digest="other"))  # so is another desired state
    await asyncio.sleep(0.05)
    assert sink.got == [("applied", 5), ("applied", 5)]


async def test_interval_zero_publishes_every_report() -> None:
    sink = Sink()
    pacer = ReportPacer(sink.publish, 0.0)
    for seq in range(1, 4):
        pacer.offer("applied", applied(seq))
        await asyncio.sleep(0.02)
    assert sink.got == [("applied", 1), ("applied", 2), ("applied", 3)]


async def test_a_refused_report_is_kept_and_goes_out_with_the_next_offer() -> None:
    sink = Sink()
    sink.fail = 1
    pacer = ReportPacer(sink.publish, 0.0)
    pacer.offer("applied", applied(1))
    await asyncio.sleep(0.05)
    assert sink.got == [] and "applied" in pacer.unsent
    pacer.offer("drift", applied(1))
    await asyncio.sleep(0.05)
    assert sorted(sink.got) == [("applied", 1), ("drift", 1)]


async def test_flush_publishes_the_held_report_without_waiting_for_the_interval() -> None:
    sink = Sink()
    pacer = ReportPacer(sink.publish, 30.0)
    pacer.offer("applied", applied(1))
    await asyncio.sleep(0.05)
    pacer.offer("applied", applied(2))
    await asyncio.wait_for(pacer.flush(), 2)
    assert sink.got == [("applied", 1), ("applied", 2)]


async def test_sustained_churn_widens_the_pace_until_a_report_goes_out_at_once_again() -> None:
    """Issue 27: BUSY_AFTER reports in a row held back make the node busy: one report per busy interval, the
    newest, and the last position a quiet interval after the churn ends; a quiet busy interval ends it (a
    lone change at once, the next at the short pace)."""
    times: list[float] = []
    sink = Sink()
    loop = asyncio.get_running_loop()

    async def publish(kind: str, envelope: events.Envelope) -> None:
        times.append(loop.time())
        await sink.publish(kind, envelope)

    pacer = ReportPacer(publish, 0.3, busy_interval=2.0)
    end, seq = loop.time() + 3.2, 0
    while loop.time() < end:  # 3.2 s of churn, 50 changes a second
        seq += 1
        pacer.offer("applied", applied(seq))
        await asyncio.sleep(0.02)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= BUSY_AFTER + 1, times
    assert all(g < 1.0 for g in gaps[:BUSY_AFTER]), gaps  # the short pace first: a short burst is not churn
    assert all(g >= 1.9 for g in gaps[BUSY_AFTER:]), gaps  # then the busy pace
    assert len(times) <= BUSY_AFTER + 1 + 1, times
    churn_ended = loop.time()
    await asyncio.sleep(2.6)  # the held report goes out, then a quiet busy interval
    assert sink.got[-1] == ("applied", seq)  # the newest
    assert times[-1] - churn_ended < 0.9, times  # a quiet interval after the churn, not the busy one
    quiet = loop.time()
    pacer.offer("applied", applied(seq + 1))
    await asyncio.sleep(0.02)
    pacer.offer("applied", applied(seq + 2))
    await asyncio.sleep(0.8)
    assert sink.got[-2:] == [("applied", seq + 1), ("applied", seq + 2)]
    assert times[-1] - quiet < 0.75, times  # at the short pace again
