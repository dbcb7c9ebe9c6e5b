"""The watcher's pure core: validation, stripping, ids, relist reconciliation."""

from __future__ import annotations

import pytest

from kipvs.watcher.objects import InvalidObject, LoggedObject, event_id, identify, plan_event, reconcile, strip
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
