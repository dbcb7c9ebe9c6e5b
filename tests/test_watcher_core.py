"""The watcher's pure core: validation, stripping, ids, relist reconciliation."""

from __future__ import annotations

import itertools

import pytest

from services.planner.core import Planner
from services.watcher.list_watch import LineSplitter
from services.watcher.objects import (
    MAX_DEPTH,
    InvalidObject,
    LoggedObject,
    event_id,
    identify,
    nesting_depth,
    plan_event,
    reconcile,
    restore_evidence,
    split_resync,
    strip,
)
from shared.contract import events
from tests import kube


def svc(name: str, rv: str) -> dict:
    obj = kube.service(name)
    obj["metadata"]["resourceVersion"] = rv
    return obj


@pytest.mark.parametrize(("obj", "match"), [
    ("text", "not a JSON object"),
    ({"spec": {}}, "no metadata"),
    ({"metadata": {"namespace": "d", "resourceVersion": "1"}}, "metadata.name is missing"),
    ({"metadata": {"name": "a", "namespace": "d"}}, "resourceVersion is missing"),
    ({"metadata": {"name": "a", "resourceVersion": "1"}}, "namespace is missing"),
    ({"metadata": {"name": "Bad_Name", "namespace": "d", "resourceVersion": "1"}}, "not a valid Kubernetes name"),
    ({"kind": "Pod", "metadata": {"name": "a", "namespace": "d", "resourceVersion": "1"}}, "kind is 'Pod'"),
])
def test_invalid_objects_are_named_precisely(obj, match: str) -> None:
    with pytest.raises(InvalidObject, match=match):
        identify("Service", obj)


def test_strip_drops_bookkeeping_and_keeps_the_rest() -> None:
    obj = svc("web", "5")
    obj.pop("kind")
    obj["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    obj["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}
    obj["status"] = {"loadBalancer": {}}
    out = strip("Service", obj)
    assert "managedFields" not in out["metadata"]
    assert out["metadata"]["annotations"] == {"team": "a"}
    assert out["kind"] == "Service" and out["status"] == {"loadBalancer": {}} and out["spec"] == obj["spec"]
    assert "managedFields" in obj["metadata"], "the input must not be mutated"


def test_event_ids_are_deterministic_per_change() -> None:
    ident = identify("Service", svc("web", "7"))
    assert event_id(ident, "ADDED") == event_id(ident, "MODIFIED") == "Service/default/web@7"
    assert event_id(ident, "DELETED") == "Service/default/web@7/deleted"
    assert event_id(ident, "DELETED", "resync") == "Service/default/web@7/resync-deleted"


def test_plan_event_skips_what_is_logged_and_fixes_the_action() -> None:
    logged = LoggedObject(True, "7", 3, svc("web", "7"))
    assert plan_event("Service", "MODIFIED", svc("web", "7"), logged, "watch") is None
    assert plan_event("Service", "ADDED", svc("web", "6"), logged, "watch") is None  # older than the log
    newer = plan_event("Service", "ADDED", svc("web", "9"), logged, "list")
    assert newer is not None and newer.record.action == "MODIFIED"
    assert plan_event("Service", "MODIFIED", svc("web", "9"), None, "watch").record.action == "ADDED"
    dead = LoggedObject(False, "8", 4, svc("web", "8"))
    assert plan_event("Service", "DELETED", svc("web", "8"), dead, "watch") is None


def test_reconcile_adds_changes_deletes_and_reports_the_live_set() -> None:
    logged = {
        "default/same": LoggedObject(True, "5", 1, svc("same", "5")),
        "default/changed": LoggedObject(True, "5", 2, svc("changed", "5")),
        "default/vanished": LoggedObject(True, "5", 3, svc("vanished", "5")),
        "default/already-gone": LoggedObject(False, "6", 4, svc("already-gone", "6")),
        "default/newer-than-list": LoggedObject(True, "50", 5, svc("newer-than-list", "50")),
    }
    listed = [svc("same", "5"), svc("changed", "8"), svc("new", "9")]
    planned, resync = reconcile("Service", listed, logged, "10")
    got = [(p.record.name, p.record.action, p.record.origin, p.record.resource_version) for p in planned]
    assert got == [("changed", "MODIFIED", "list", "8"), ("new", "ADDED", "list", "9"),
                   ("vanished", "DELETED", "resync", "10")]
    assert resync.live == {"default/same": "5", "default/changed": "8", "default/new": "9"}
    assert resync.resource_version == "10"


def test_reconcile_names_a_vanished_object_from_the_log_even_if_its_logged_copy_is_broken() -> None:
    """A well-formed record whose object lost metadata.name, last on its subject: the watcher's start
    must not fail on it at every restart (issue 13); the log's key names the object."""
    broken = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default"}, "spec": {}}
    planned, _ = reconcile("Service", [], {"default/lost": LoggedObject(True, "5", 7, broken)}, "10")
    assert [(p.record.namespace, p.record.name, p.record.action) for p in planned] == [
        ("default", "lost", "DELETED")]
    assert planned[0].record.object["metadata"]["name"] == "lost"
    node = {"kind": "Node", "metadata": "garbage"}
    planned, _ = reconcile("Node", [], {"n1": LoggedObject(True, "5", 8, node)}, "10")
    assert [(p.record.namespace, p.record.name) for p in planned] == [("", "n1")]


# --- a restored API server (issue 21) ------------------------------------------------------------------------


def logged_svc(name: str, rv: str, seq: int, alive: bool = True) -> LoggedObject:
    return LoggedObject(alive, rv, seq, strip("Service", svc(name, rv)))


def test_restore_evidence_names_what_went_back() -> None:
    logged = {"default/a": logged_svc("a", "190", 5), "default/b": logged_svc("b", "120", 6)}
    assert restore_evidence("Service", [svc("a", "190"), svc("b", "120")], logged, "200") == ""
    assert "below 190" in restore_evidence("Service", [svc("a", "140")], logged, "180")
    assert "default/a is at resourceVersion 140, the log holds 190" in restore_evidence(
        "Service", [svc("a", "140")], logged, "250")
    changed = svc("b", "120")
    changed["spec"]["clusterIP"] = "10.96.9.9"  # the same version handed out again, to another change
    assert "differs from what the log holds" in restore_evidence("Service", [changed], logged, "250")
    assert restore_evidence("Service", [svc("a", "x")], {"default/a": logged_svc("a", "y", 1)}, "z") == ""


def test_reconcile_after_a_restore_takes_the_list_whatever_its_versions() -> None:
    logged = {"default/a": logged_svc("a", "190", 5), "default/b": logged_svc("b", "120", 6),
              "default/gone": logged_svc("gone", "195", 7)}
    listed = [svc("a", "140"), svc("b", "120")]
    normal, resync = reconcile("Service", listed, logged, "180")
    assert normal == [] and not resync.restored, "without the restore flag older versions are not news"
    planned, resync = reconcile("Service", listed, logged, "180", resync_seq=9)
    assert [(p.record.action, p.record.name, p.record.resource_version) for p in planned] == [
        ("MODIFIED", "a", "140"), ("DELETED", "gone", "180")]  # b is logged exactly as listed
    assert [p.id for p in planned] == ["Service/default/a@140/restored@9",
                                       "Service/default/gone@180/resync-deleted/restored@9"]
    assert resync.restored and resync.listed_after_seq == 9 and resync.live == {"default/a": "140",
                                                                                 "default/b": "120"}


def test_planner_restored_resync_deletes_by_log_position_not_version() -> None:
    planner = Planner()

    def feed(record: events.AnyRecord, seq: int) -> None:
        planner.handle(events.Envelope(id=f"e{seq}", time_ns=seq, producer="t", record=record), seq)

    for seq, (name, rv) in enumerate([("old", "190"), ("kept", "150"), ("late", "185")], start=1):
        obj = svc(name, rv)
        feed(events.KubeEvent(kind="Service", action="ADDED", namespace="default", name=name, resource_version=rv,
                              object=obj), seq)
    # a resync at 180 from a restored server, without the restore flag: "old" (190) looks newer and stays
    feed(events.KubeResync(kind="Service", resource_version="180", live={"default/kept": "150"}), 4)
    assert set(planner.services) == {"default/old", "default/kept", "default/late"}
    # restored: what was taken from the log at or below sequence 2 and is not live goes; "late" (logged at 3,
    # after the list was requested) stays
    feed(events.KubeResync(kind="Service", resource_version="180", live={"default/kept": "150"}, restored=True,
                           listed_after_seq=2), 5)
    assert set(planner.services) == {"default/kept", "default/late"}


def test_nesting_depth_is_bounded_without_recursion() -> None:
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": [deep]}
    assert nesting_depth(deep) == MAX_DEPTH + 1
    assert nesting_depth({"a": [1, {"b": "c"}]}) == 3
    assert nesting_depth("text") == 0


def test_watch_lines_are_split_across_chunks_and_bounded() -> None:
    lines = LineSplitter(10)
    assert lines.feed(b"ab") == []
    assert lines.feed(b"c\nde\n\nf") == [(b"abc", False), (b"de", False), (b"", False)]
    assert lines.feed(b"ghijklmnop") == [(b"fghijklmnop", True)], "over the limit: reported once, by its start"
    assert lines.feed(b"qrstuvwxyz" * 3) == []
    assert lines.feed(b"z\nok\nlast") == [(b"ok", False)]
    assert lines.rest() == b"last"


def test_a_watcher_behind_never_logs_an_older_change_over_a_newer_one() -> None:
    """Two watchers: the slower one meets changes the log already holds newer ones of. Its id would be a
    duplicate of the old record; a reused id (a restore) is appended again, so these must not get that far."""
    deleted = LoggedObject(False, "212", 9, strip("Service", svc("a", "212")))
    assert plan_event("Service", "MODIFIED", svc("a", "210"), deleted, "watch") is None
    assert plan_event("Service", "ADDED", svc("a", "213"), deleted, "watch") is not None, "re-created later"
    recreated = LoggedObject(True, "220", 10, strip("Service", svc("a", "220")))
    assert plan_event("Service", "DELETED", svc("a", "212"), recreated, "watch") is None
    assert plan_event("Service", "DELETED", svc("a", "221"), recreated, "watch") is not None


def test_a_live_set_split_into_key_ranges_covers_every_key_once() -> None:
    live = {f"ns-{i % 7}/obj-{i:04d}": str(i) for i in range(2000)}
    resync = events.KubeResync(kind="Pod", resource_version="9", live=live, restored=True, listed_after_seq=4)
    parts = split_resync(resync, 8000)
    assert len(parts) > 3
    assert parts[0].key_from == "" and parts[-1].key_to == ""
    for before, after in itertools.pairwise(parts):
        assert before.key_to == after.key_from
    for part in parts:
        assert all(part.key_from <= k and (not part.key_to or k < part.key_to) for k in part.live)
        assert part.restored and part.listed_after_seq == 4
        assert len(events.encode(events.Envelope(id="x" * 100, time_ns=1, producer="p", record=part))) <= 8000
    assert sum(len(p.live) for p in parts) == len(live) and {k for p in parts for k in p.live} == set(live)
