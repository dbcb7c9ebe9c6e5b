"""The watcher's pure core: what to log for an object, and what a relist means against the log.

No I/O here. ``LoggedObject`` is what the log says about one object (its last record and that record's
stream sequence on the object's subject); :func:`reconcile` turns a fresh list into the events that bring
the log to the truth, and :func:`event_id` names every event deterministically, so two watchers, or one
watcher restarted, produce identical ids for the same change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.contract import events, topology

NAMESPACED = {"Service": True, "EndpointSlice": True, "Pod": True, "Node": False, "FelixConfiguration": False}
API_VERSIONS = {"Service": "v1", "Pod": "v1", "Node": "v1", "EndpointSlice": "discovery.k8s.io/v1",
                "FelixConfiguration": "crd.projectcalico.org/v1"}

# Dropped before logging: written by the API server for server-side apply bookkeeping and by kubectl for
# three-way merges; no consumer reads them and they are often the larger part of an object.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


# Deepest object logged. Kubernetes objects nest about ten deep (a Pod's env valueFrom); every consumer decodes
# records recursively (msgspec, json) within Python's recursion limit of 1,000 frames, so a far deeper object
# would crash each of them in turn. Checked after decoding, only when the text has more brackets than this.
MAX_DEPTH = 100


class InvalidObject(ValueError):
    """An object the watcher will not log; the message is the parking reason."""


class TooLarge(InvalidObject):
    """An object whose record would not fit in one NATS message (the server's max_payload)."""


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``value`` (decoded JSON) nests, counting each object and array as one level; stops and
    returns ``limit + 1`` as soon as it is deeper than ``limit``. Iterative: no recursion limit."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_depth(kind: str, raw: bytes, value: Any) -> None:
    """InvalidObject if ``value`` (decoded from ``raw``) nests deeper than MAX_DEPTH."""
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and nesting_depth(value) > MAX_DEPTH:
        meta = value.get("metadata") if isinstance(value, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        name = "/".join(str(meta[k]) for k in ("namespace", "name") if meta.get(k))
        raise InvalidObject(f"{kind} {name or '?'}: object nests deeper than {MAX_DEPTH} levels")


@dataclass(frozen=True)
class Identity:
    kind: str
    namespace: str
    name: str
    resource_version: str

    @property
    def key(self) -> str:
        return events.object_key(self.namespace, self.name)

    @property
    def subject(self) -> str:
        return topology.kube_object_subject(self.kind, self.namespace, self.name)


def identify(kind: str, obj: Any) -> Identity:
    """Check that ``obj`` is a loggable ``kind`` object and say who it is; raise InvalidObject otherwise."""
    if not isinstance(obj, dict):
        raise InvalidObject(f"{kind}: object is a {type(obj).__name__}, not a JSON object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise InvalidObject(f"{kind}: object has no metadata")
    name = meta.get("name")
    namespace = meta.get("namespace") or ""
    where = f"{kind} {namespace + '/' if namespace else ''}{name or '?'}"
    if not isinstance(name, str) or not name:
        raise InvalidObject(f"{where}: metadata.name is missing")
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise InvalidObject(f"{where}: metadata.resourceVersion is missing")
    if NAMESPACED[kind] and not namespace:
        raise InvalidObject(f"{where}: metadata.namespace is missing for a namespaced kind")
    if not NAMESPACED[kind]:
        namespace = ""
    try:
        topology.token(name)
        if namespace:
            topology.token(namespace)
    except ValueError as exc:
        raise InvalidObject(f"{where}: {exc}") from None
    if obj.get("kind") not in (None, kind):
        raise InvalidObject(f"{where}: kind is {obj.get('kind')!r} on a {kind} stream")
    return Identity(kind, namespace, name, rv)


def strip(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as logged: managedFields and last-applied dropped, kind/apiVersion filled in (lists omit
    them on items). Everything an auditor needs (metadata, spec, status) is kept."""
    meta = dict(obj["metadata"])
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and any(a in annotations for a in _DROPPED_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in annotations.items() if k not in _DROPPED_ANNOTATIONS}
    out = dict(obj)
    out["metadata"] = meta
    out["kind"] = kind
    out.setdefault("apiVersion", API_VERSIONS[kind])
    return out


def event_id(ident: Identity, action: str, origin: str = "watch") -> str:
    """Deterministic id. An object version (its resourceVersion) is one logical change whether a list or a
    watch reported it; a deletion is its own change; a deletion inferred at resync is named by the list's
    version, the moment the watcher learnt of it."""
    base = f"{ident.kind}/{ident.key}"
    if action == "DELETED":
        return f"{base}@{ident.resource_version}/{'resync-deleted' if origin == 'resync' else 'deleted'}"
    return f"{base}@{ident.resource_version}"


def resync_id(resync: events.KubeResync) -> str:
    """Deterministic; a restored resync names the log position of its list, since a restored API server
    hands out list versions again."""
    base = f"{resync.kind}/resync@{resync.resource_version}"
    return f"{base}/restored@{resync.listed_after_seq}" if resync.restored else base


def rv_newer(a: str, b: str) -> bool:
    """Is version ``a`` newer than ``b``? resourceVersions are etcd revisions: integers that grow. The API
    calls them opaque; if either is not an integer we cannot order them and say 'not newer'."""
    try:
        return int(a) > int(b)
    except ValueError:
        return False


def _not_after(a: str, b: str) -> bool:
    """Is version ``a`` known to be at or before ``b`` (both integers)?"""
    x, y = _rv_int(a), _rv_int(b)
    return x is not None and y is not None and x <= y


def _rv_int(rv: str) -> int | None:
    try:
        return int(rv)
    except ValueError:
        return None


def restore_evidence(kind: str, listed: list[dict[str, Any]], logged: dict[str, LoggedObject], list_rv: str) -> str:
    """Why the API server's history went back (an etcd restored from a snapshot without ``--bump-revision``),
    or "" when nothing says so. ``logged`` must be what the log held before the list was requested: a list
    without a resourceVersion is a consistent read at the current etcd revision, so in a history that only
    grows its version is at least every version logged before, and each object's listed version is at least
    the one logged for it; an equal version is the same object. ``listed`` holds valid objects only."""
    list_v = _rv_int(list_rv)
    highest = max((v for v in (_rv_int(e.resource_version) for e in logged.values()) if v is not None), default=None)
    if list_v is not None and highest is not None and list_v < highest:
        return f"the list's resourceVersion {list_rv} is below {highest}, the highest the log holds"
    for obj in listed:
        ident = identify(kind, obj)
        entry = logged.get(ident.key)
        if entry is None:
            continue
        now, held = _rv_int(ident.resource_version), _rv_int(entry.resource_version)
        if now is None or held is None:
            continue
        if now < held:
            return f"{kind} {ident.key} is at resourceVersion {now}, the log holds {held}"
        if now == held and entry.alive and entry.object != strip(kind, obj):
            # also after an upgrade that defaults a new field on read: re-syncing is right then too
            return f"{kind} {ident.key} at resourceVersion {now} differs from what the log holds at that version"
    return ""


@dataclass
class LoggedObject:
    """What the log holds for one object: its last record there."""

    alive: bool
    resource_version: str
    subject_seq: int  # stream sequence of that record: the expected-last-subject-sequence of the next write
    object: dict[str, Any]


@dataclass(frozen=True)
class Planned:
    """An event to log, with the object identity it is about."""

    ident: Identity
    record: events.KubeEvent
    # > 0: part of the re-sync after a restore of the API server; the event replaces whatever the log holds
    # for the object if that was logged at or below this KUBE stream sequence (before the list was taken)
    resync_seq: int = 0

    @property
    def id(self) -> str:
        base = event_id(self.ident, self.record.action, self.record.origin)
        # versions handed out again after the restore must not be taken for repeats of the old ones
        return f"{base}/restored@{self.resync_seq}" if self.resync_seq else base


def plan_event(kind: str, action: str, obj: dict[str, Any], logged: LoggedObject | None,
               origin: str, resync_seq: int = 0) -> Planned | None:
    """The event to log for one observed object state, or None if the log already has it. With
    ``resync_seq`` (a re-sync after a restore) the observed state is the truth whatever its version: it is
    logged unless the log holds exactly it."""
    ident = identify(kind, obj)
    stripped: dict[str, Any] | None = None
    if logged is not None:
        if action == "DELETED" and not logged.alive:
            return None
        if resync_seq:
            if logged.alive and logged.resource_version == ident.resource_version and logged.object == (
                    stripped := strip(kind, obj)):
                return None
        elif action != "DELETED" and logged.alive and not rv_newer(ident.resource_version, logged.resource_version):
            return None  # this version (or a newer one) is logged already
        elif _not_after(ident.resource_version, logged.resource_version):
            return None  # older than the log's last record (a deletion, or a re-creation): a watcher behind
    if action == "ADDED" and logged is not None and logged.alive:
        action = "MODIFIED"
    elif action == "MODIFIED" and (logged is None or not logged.alive):
        action = "ADDED"
    record = events.KubeEvent(kind=kind, action=action, namespace=ident.namespace, name=ident.name,
                              resource_version=ident.resource_version,
                              object=strip(kind, obj) if stripped is None else stripped, origin=origin)
    return Planned(ident, record, resync_seq)


def reconcile(kind: str, listed: list[dict[str, Any]], logged: dict[str, LoggedObject],
              list_rv: str, resync_seq: int = 0, partial: bool = False) -> tuple[list[Planned], events.KubeResync]:
    """What a fresh list means against the log: ADDED/MODIFIED for objects that appeared or changed,
    DELETED (origin ``resync``) for logged objects that are gone, then the resync record with the live set.
    ``listed`` must hold valid objects only (the caller parks the others).

    ``resync_seq`` > 0 (the KUBE stream's last sequence when the list was requested) says the API server
    was restored (:func:`restore_evidence`): the list is the truth whatever the versions, every logged
    object missing from it is deleted, and the resync record says ``restored``.

    ``partial``: some listed objects could not be taken (parked: too deep, invalid), and one of them may be
    an object the log holds, so none missing from the list is deleted; the live set names them at their
    logged versions, so the planner deletes nothing either."""
    planned: list[Planned] = []
    live: dict[str, str] = {}
    for obj in listed:
        ident = identify(kind, obj)
        live[ident.key] = ident.resource_version
        event = plan_event(kind, "ADDED", obj, logged.get(ident.key), "list", resync_seq)
        if event is not None:
            planned.append(event)
    for key in sorted(logged):
        entry = logged[key]
        if not entry.alive or key in live:
            continue
        if partial:
            live[key] = entry.resource_version
        elif resync_seq or not rv_newer(entry.resource_version, list_rv):
            planned.append(_gone(kind, key, entry, list_rv, resync_seq))
    return planned, events.KubeResync(kind=kind, resource_version=list_rv, live=live, restored=bool(resync_seq),
                                      listed_after_seq=resync_seq)


def _gone(kind: str, key: str, entry: LoggedObject, list_rv: str, resync_seq: int) -> Planned:
    """The resync deletion of a logged object the list lacks, with the last state the log had."""
    gone_obj = dict(entry.object)
    meta = dict(gone_obj.get("metadata") or {}) if isinstance(gone_obj.get("metadata"), dict) else {}
    # The log's key names the object even when the logged object itself is broken (a record whose
    # object lost metadata.name must not stop every watcher start).
    namespace, _, name = key.rpartition("/")
    meta.update(name=name, resourceVersion=list_rv, **({"namespace": namespace} if namespace else {}))
    gone_obj["metadata"] = meta
    ident = identify(kind, gone_obj)
    return Planned(ident, events.KubeEvent(
        kind=kind, action="DELETED", namespace=ident.namespace, name=ident.name,
        resource_version=list_rv, object=gone_obj, origin="resync"), resync_seq)


def split_resync(resync: events.KubeResync, max_bytes: int) -> list[events.KubeResyncRange]:
    """The live set of ``resync`` in key ranges whose records each take at most about ``max_bytes``
    (msgpack: a key and a version cost their lengths plus at most 3 bytes of header each), covering every
    key: the first from "" and the last to "" (no bound)."""
    budget = max(1024, max_bytes - 1024 - 2 * len(resync.resource_version))
    parts: list[dict[str, str]] = [{}]
    size = 0
    for key in sorted(resync.live):
        cost = len(key.encode()) + len(resync.live[key].encode()) + 6
        if size + cost > budget and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][key] = resync.live[key]
        size += cost
    bounds = ["", *(min(part) for part in parts[1:]), ""]
    return [events.KubeResyncRange(kind=resync.kind, resource_version=resync.resource_version, live=part,
                                   key_from=bounds[i], key_to=bounds[i + 1], restored=resync.restored,
                                   listed_after_seq=resync.listed_after_seq) for i, part in enumerate(parts)]


def resync_range_id(part: events.KubeResyncRange) -> str:
    base = f"{part.kind}/resync@{part.resource_version}/from@{part.key_from}"
    return f"{base}/restored@{part.listed_after_seq}" if part.restored else base


def wire_line(record: events.KubeEvent) -> dict[str, Any]:
    """The record as a Kubernetes watch event (what ``--record`` writes and ``kipvs plan`` reads)."""
    return {"type": record.action, "object": record.object}
