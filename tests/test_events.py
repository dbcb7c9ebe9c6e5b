"""The event contract: round trips, forward compatibility (unknown records, newer schema), bad input."""

from __future__ import annotations

import msgspec
import pytest

from shared.contract import events, topology

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default",
           "resourceVersion": "12"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}


def kube_event(**over) -> events.Envelope:
    record = events.KubeEvent(kind="Service", action="ADDED", namespace="default", name="web",
                              resource_version="12", object=SERVICE, origin="list")
    return events.Envelope(id="Service/default/web/12/ADDED", time_ns=1_700_000_000_000_000_000,
                           producer="watcher/test", record=record, **over)


def test_msgpack_round_trip_keeps_every_field() -> None:
    env = kube_event(causation=("a", "b"))
    assert events.decode(events.encode(env)) == env


def test_json_round_trip_and_json_is_readable() -> None:
    env = events.Envelope(id="r1", time_ns=1, producer="watcher/x",
                          record=events.KubeResync(kind="Pod", resource_version="99", live={"ns/a": "5"}))
    text = events.to_json(env)
    assert b'"type":"kube.resync"' in text
    assert events.from_json(text) == env
    assert events.from_json(text.decode()) == env


def test_encoding_is_deterministic() -> None:
    assert events.encode(kube_event()) == events.encode(kube_event())


def _raw_envelope(record: dict, v: int = events.SCHEMA_VERSION) -> bytes:
    return msgspec.msgpack.encode({"v": v, "id": "x1", "time_ns": 1, "producer": "future", "record": record})


def test_unknown_record_type_is_named() -> None:
    with pytest.raises(events.UnknownRecord, match=r"unknown record type 'plan\.teleport'"):
        events.decode(_raw_envelope({"type": "plan.teleport", "where": "mars"}))


def test_newer_schema_version_is_refused_with_advice() -> None:
    data = _raw_envelope({"type": "kube.resync", "kind": "Pod", "resource_version": "1", "live": {}}, v=99)
    with pytest.raises(events.NewerSchema, match=r"schema version 99.*upgrade"):
        events.decode(data)


def test_new_optional_field_from_newer_producer_is_ignored() -> None:
    data = _raw_envelope({"type": "kube.resync", "kind": "Pod", "resource_version": "1", "live": {},
                          "added_later": True})
    assert events.decode(data).record == events.KubeResync(kind="Pod", resource_version="1", live={})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1garbage", "not a kipvs envelope"),
        (msgspec.msgpack.encode([1, 2, 3]), "not a kipvs envelope"),
        (_raw_envelope({"type": "kube.event", "kind": "Service"}), "invalid kube.event record"),
        (_raw_envelope({"type": "kube.event", "kind": "Gateway", "action": "ADDED", "namespace": "",
                        "name": "x", "resource_version": "1", "object": {}}), "invalid kube.event record"),
        (_raw_envelope("not-a-record"), "record is not an object"),
    ],
)
def test_malformed_messages_get_a_precise_reason(data: bytes, match: str) -> None:
    with pytest.raises(events.MalformedMessage, match=match):
        events.decode(data)


def test_object_key() -> None:
    assert events.object_key("default", "web") == "default/web"
    assert events.object_key("", "node-1") == "node-1"


def test_a_record_nested_too_deep_is_malformed_not_a_crash() -> None:
    """An object nested past the recursion limit (logged by a watcher without a depth bound) made every
    consumer's decode raise RecursionError; now it is a ContractError, parked like any unusable message."""
    placeholder = "P" * 40
    env = events.Envelope(id="deep", time_ns=1, producer="t", record=events.KubeEvent(
        kind="Service", action="ADDED", namespace="d", name="a", resource_version="1", object={"x": placeholder}))
    data = events.encode(env)
    nested = b"\x81\xa1a" * 5000 + b"\x01"  # {"a": {"a": ... 1}} 5,000 deep, in msgpack
    data = data.replace(b"\xd9\x28" + placeholder.encode(), nested)
    assert nested in data
    with pytest.raises(events.ContractError, match="nests too deep"):
        events.decode(data)


def test_a_report_of_a_whole_flushed_table_fits_the_status_streams_message_bound() -> None:
    """A drift check after the table was flushed at 10,000 Services x 10 real servers finds 110,000
    objects: the report lists the first ones and counts the rest, and fits KIPVS_STATUS's per-message
    bound (the server refuses bigger; the report was lost and retried forever)."""
    found = [f"add real server TCP 10.96.{i // 250}.{i % 250}:80 -> 10.244.{i // 250}.{i % 250}:8080"
             for i in range(110_000)]
    report = events.DriftReport(node="node-a", plan_seq=7, found=events.summarised(found), repaired=True,
                                desired_digest="d" * 64, observed_digest="o" * 64)
    envelope = events.Envelope(id="drift/node-a/7/1", time_ns=1, producer="applier/node-a", record=report)
    assert len(events.encode(envelope)) < topology.STATUS_MAX_MSG
    assert len(report.found) == events.REPORT_MAX_LINES
    assert report.found[:2] == tuple(found[:2])
    assert report.found[-1] == f"... and {110_000 - events.REPORT_MAX_LINES + 1} more"
    assert events.summarised(found[:3]) == tuple(found[:3])
