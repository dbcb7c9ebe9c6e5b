"""Chunked plan deltas, pure: a delta over the message limit is cut into parts that put back together give
the same envelope byte for byte; a small delta is left as it is; a part missing, repeated, out of order or
garbled is never half applied (shared/contract/delta_chunks.py)."""

from __future__ import annotations

import msgspec
import pytest

from services.planner.core import Planner
from shared.contract import delta_chunks, events
from shared.contract.delta_chunks import Assembler, ChunkGap
from shared.plan.plan_state import SharedPlan
from tests import kube

LIMIT = (1 << 20) - delta_chunks.HEADER_HEADROOM


def big_service(ports: int = 100, endpoints: int = 1000, name: str = "big",
                cluster_ip: str = "10.96.50.50") -> list[events.Envelope]:
    """The issue's Service: ``ports`` ports and one slice of ``ports`` x ``endpoints`` (a 130 KB object)."""
    svc_ports = [{"name": f"p{i}", "port": 1000 + i, "protocol": "TCP", "targetPort": 8000 + i} for i in range(ports)]
    slice_ports = [{"name": f"p{i}", "port": 8000 + i, "protocol": "TCP"} for i in range(ports)]
    eps = [kube.endpoint(f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}") for i in range(endpoints)]
    objects = [kube.service(name, cluster_ip=cluster_ip, ports=svc_ports),
               kube.endpoint_slice(f"{name}-x", name, eps, ports=slice_ports)]
    out = []
    for i, obj in enumerate(objects, 1):
        meta = obj["metadata"]
        obj = {**obj, "metadata": {**meta, "resourceVersion": str(100 + i)}}
        out.append(events.Envelope(id=f"{obj['kind']}/default/{meta['name']}@{100 + i}", time_ns=i, producer="test",
                                   record=events.KubeEvent(kind=obj["kind"], action="ADDED", namespace="default",
                                                           name=meta["name"], resource_version=str(100 + i),
                                                           object=obj)))
    # as the planner meets them: decoded from the bus (msgspec omits a default it decoded, not one it was given)
    return [events.decode(events.encode(env)) for env in out]


def big_delta() -> events.Envelope:
    planner = Planner()
    produced = [d for seq, env in enumerate(big_service(), 1) for d in planner.handle(env, seq)]
    return produced[-1]


def test_a_small_delta_is_one_message_unchanged() -> None:
    planner = Planner()
    delta = planner.handle(big_service(ports=1, endpoints=2)[0], 1)[0]
    assert delta_chunks.split(delta, LIMIT) == [delta]


def test_the_issues_service_is_cut_into_parts_that_give_back_the_same_bytes() -> None:
    delta = big_delta()
    data = events.encode(delta)
    assert len(data) > 3_000_000  # the issue's 3.6 MB delta
    parts = delta_chunks.split(delta, LIMIT)
    assert len(parts) == 4
    assert all(len(events.encode(p)) <= LIMIT for p in parts)
    assert [p.record.part for p in parts] == list(range(1, len(parts) + 1))
    assert len({p.id for p in parts}) == len(parts)  # each part is de-duplicated on its own
    assembler = Assembler()
    out = [assembler.feed(events.decode(events.encode(p))) for p in parts]  # through the bus form
    assert out[:-1] == [None] * (len(parts) - 1)
    assert b"".join(p.record.data for p in parts) == data and out[-1] == delta  # the same envelope
    plan = SharedPlan(seq=out[-1].record.seq - 1)
    assert plan.apply(out[-1].record) and len(plan.services["default/big"].ports) == 100


def test_repeated_parts_and_a_restart_at_part_one_still_give_one_whole_delta() -> None:
    parts = delta_chunks.split(big_delta(), LIMIT)
    assembler = Assembler()
    # a planner restarted after the duplicate window publishes the whole delta again after its first parts
    stream = [parts[0], parts[1], parts[1], *parts]
    wholes = [w for w in (assembler.feed(p) for p in stream) if w is not None]
    assert len(wholes) == 1
    assert assembler.feed(parts[-1], have=wholes[0].record.seq) is None  # redelivered: the plan has it


@pytest.mark.parametrize("damage", ["missing", "garbled", "orphan"])
def test_a_missing_or_garbled_part_is_a_gap_never_half_a_delta(damage: str) -> None:
    parts = delta_chunks.split(big_delta(), LIMIT)
    if damage == "missing":
        parts = [parts[0], *parts[2:]]
    elif damage == "garbled":
        chunk = parts[1].record
        parts[1] = msgspec.structs.replace(parts[1], record=msgspec.structs.replace(
            chunk, data=chunk.data[:-1] + bytes([chunk.data[-1] ^ 1])))
    else:
        parts = parts[1:]
    assembler = Assembler()
    fed = 0
    with pytest.raises(ChunkGap):
        for fed, part in enumerate(parts, 1):  # noqa: B007 (read after the loop)
            assert assembler.feed(part) is None
    # reported once: the broken delta's later parts are dropped quietly, and nothing is ever whole
    for part in parts[fed:]:
        assert assembler.feed(part) is None
    assert assembler.pending("all") == 0


def test_atomic_batches_never_split_a_delta(monkeypatch) -> None:
    """The planner's fenced batches (pure part): a delta's parts always share one batch."""
    from types import SimpleNamespace

    from services.planner import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "ATOMIC_BATCH_MAX", 5)
    planner = Planner()
    log = [big_service(ports=1, endpoints=1, name="small", cluster_ip="10.96.0.10")[0], *big_service()]
    deltas = [d for seq, env in enumerate(log, 1) for d in planner.handle(env, seq)]
    publisher = publisher_module.PlanPublisher(None, {}, nc=SimpleNamespace(max_payload=1 << 20))  # type: ignore[arg-type]
    publisher.add(deltas)
    batches = [[msg.id for _, msg in batch] for batch in publisher._batches()]
    assert batches == [["plan/all/1", "plan/all/2"], [f"plan/all/3/part/{i}-of-4" for i in range(1, 5)]]
    monkeypatch.setattr(publisher_module, "ATOMIC_BATCH_MAX", 3)  # the big delta fits no batch: it is the head's fault
    publisher.outbox = publisher.outbox[2:]
    with pytest.raises(publisher_module.Unpublishable,
                       match="delta plan/all/3 cannot be published: it needs 4 messages"):
        publisher._batches()


def test_a_delta_published_again_whole_settles_its_parts() -> None:
    """A planner killed after two parts, restarted against a server whose max_payload was raised, publishes
    the same delta in one message: the parts held are dropped, and the tools show them as they are."""
    from shared.tools.log_client import Entry, assembled

    delta = big_delta()
    parts = delta_chunks.split(delta, LIMIT)
    assembler = Assembler()
    assert assembler.feed(parts[0]) is None and assembler.feed(parts[1]) is None
    assert assembler.pending("all") == 2
    assembler.settled("all", delta.record.seq)
    assert assembler.pending("all") == 0
    entries = [Entry("KIPVS_PLAN", i, "kipvs.plan.all", env) for i, env in enumerate([*parts[:2], delta], 1)]
    assert [(e.seq, type(e.envelope.record).__name__) for e in assembled(entries)] == [
        (1, "PlanDeltaChunk"), (2, "PlanDeltaChunk"), (3, "PlanDelta")]
    whole = assembled([Entry("KIPVS_PLAN", i, "kipvs.plan.all", env) for i, env in enumerate(parts, 1)])
    assert [(e.seq, e.envelope) for e in whole] == [(4, delta)]
