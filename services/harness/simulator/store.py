"""The simulator's object store: the part of kube-apiserver + etcd semantics kipvs depends on, no I/O.

- One global, monotonic resourceVersion (an etcd revision): every write gets the next one, and the
  object carries it in ``metadata.resourceVersion``.
- A history of changes (the etcd watch window) that can be compacted: a watch from a version older than
  the window gets 410 Gone, exactly like the real API server.
- Lists are consistent snapshots at the current version, chunked with ``limit``/``continue``; a continue
  token whose snapshot has been compacted is 410 Gone too.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    kind: str
    plural: str
    group: str  # "" for core
    version: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: tuple[Resource, ...] = (
    Resource("Service", "services", "", "v1", True),
    Resource("Pod", "pods", "", "v1", True),
    Resource("Node", "nodes", "", "v1", False),
    Resource("EndpointSlice", "endpointslices", "discovery.k8s.io", "v1", True),
    Resource("FelixConfiguration", "felixconfigurations", "crd.projectcalico.org", "v1", False),
)
BY_KIND = {r.kind: r for r in RESOURCES}
BY_PLURAL = {(r.group, r.plural): r for r in RESOURCES}


class ApiError(Exception):
    """An API error with the HTTP status and the reason kube-apiserver would give."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


@dataclass(frozen=True)
class Change:
    """One entry of the watch window."""

    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    kind: str
    namespace: str
    object: dict[str, Any]
    previous: dict[str, Any] | None = None  # the object before this change (None when ADDED)


Key = tuple[str, str, str]  # kind, namespace, name


@dataclass
class Store:
    rv: int = 100
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    compacted_rv: int = 100  # watches from a version below this get 410
    # what an etcd snapshot holds (the global version, objects, watch window, compaction point); see restore()
    saved: tuple[int, dict[Key, dict[str, Any]], list[Change], int] | None = field(default=None, repr=False)

    # --- writes ---------------------------------------------------------------------------------

    def _next(self) -> int:
        self.rv += 1
        return self.rv

    def create(self, obj: dict[str, Any], validate: bool = True) -> dict[str, Any]:
        kind = obj.get("kind", "")
        resource = self._resource(kind)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name", "")
        if validate and not name:
            raise ApiError(422, "Invalid", f"{kind}: metadata.name: Required value")
        namespace = meta.get("namespace", "default") if resource.namespaced else ""
        if resource.namespaced:
            meta["namespace"] = namespace
        key = (kind, namespace, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", resource.api_version)
        obj["metadata"].setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{namespace}/{name}/{self.rv}")))
        obj["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        obj["metadata"]["generation"] = 1
        obj["metadata"]["resourceVersion"] = str(self._next())
        self.objects[key] = obj
        self.history.append(Change(self.rv, "ADDED", kind, namespace, obj))
        return obj

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = obj.get("kind", "")
        resource = self._resource(kind)
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace", "default") if resource.namespaced else ""
        key = (kind, namespace, meta.get("name", ""))
        current = self.objects.get(key)
        if current is None:
            raise ApiError(404, "NotFound", f'{resource.plural} "{key[2]}" not found')
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{key[2]}": '
                           "the object has been modified; please apply your changes to the latest version")
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", resource.api_version)
        obj["metadata"]["namespace"] = namespace if resource.namespaced else obj["metadata"].get("namespace")
        if not resource.namespaced:
            obj["metadata"].pop("namespace", None)
        obj["metadata"]["uid"] = current["metadata"].get("uid")
        obj["metadata"]["creationTimestamp"] = current["metadata"].get("creationTimestamp")
        obj["metadata"]["generation"] = current["metadata"].get("generation", 1) + _spec_changed(current, obj)
        obj["metadata"]["resourceVersion"] = str(self._next())
        self.objects[key] = obj
        self.history.append(Change(self.rv, "MODIFIED", kind, namespace, obj, current))
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        resource = self._resource(kind)
        key = (kind, namespace if resource.namespaced else "", name)
        current = self.objects.pop(key, None)
        if current is None:
            raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        gone_obj = copy.deepcopy(current)
        gone_obj["metadata"]["resourceVersion"] = str(self._next())
        self.history.append(Change(self.rv, "DELETED", kind, key[1], gone_obj, current))
        return gone_obj

    def compact(self, upto: int | None = None) -> int:
        """Forget the watch window up to ``upto`` (default: everything so far), like etcd compaction."""
        upto = self.rv if upto is None else upto
        self.history = [c for c in self.history if c.rv > upto]
        self.compacted_rv = max(self.compacted_rv, upto)
        return self.compacted_rv

    def snapshot(self) -> int:
        """Take an etcd snapshot of the store as it is now; returns its resourceVersion."""
        self.saved = (self.rv, copy.deepcopy(self.objects), list(self.history), self.compacted_rv)
        return self.rv

    def restore(self) -> int:
        """Go back to the last :meth:`snapshot`, as ``etcdutl snapshot restore`` without ``--bump-revision``
        does: objects, the watch window and the global resourceVersion return to the snapshot's, so later
        writes hand out versions that were already handed out before the restore. Returns that version;
        ApiError 409 when no snapshot was taken."""
        if self.saved is None:
            raise ApiError(409, "Conflict", "no snapshot to restore: take one first (/_sim/fault/snapshot)")
        rv, objects, history, compacted = self.saved
        self.rv, self.objects, self.history, self.compacted_rv = rv, copy.deepcopy(objects), list(history), compacted
        return rv

    # --- reads ----------------------------------------------------------------------------------

    def patch(self, kind: str, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        """Apply a JSON merge patch (RFC 7386, what ``kubectl annotate``, ``label`` and ``patch --type merge``
        send) to the stored object and store the result as an update (MODIFIED). A patch that changes the
        name, or is not a JSON object, is a 422 / 400 as kube-apiserver answers."""
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "the patch must be a JSON object")
        current = self.get(kind, namespace, name)
        patched = merge_patch(current, patch)
        if not isinstance(patched.get("metadata"), dict) or patched["metadata"].get("name") != name:
            raise ApiError(422, "Invalid", f"{kind} {name!r}: metadata.name: the patch may not change it")
        return self.update(patched)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        resource = self._resource(kind)
        obj = self.objects.get((kind, namespace if resource.namespaced else "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        return obj

    def list(self, kind: str, namespace: str | None, limit: int = 0, continue_token: str = "") -> dict[str, Any]:
        """A consistent list. With a continue token, the next chunk of the snapshot it was taken at."""
        resource = self._resource(kind)
        snapshot_rv, start = self.rv, 0
        if continue_token:
            snapshot_rv, start = decode_continue(continue_token)
            if snapshot_rv < self.compacted_rv:
                raise gone("The provided continue parameter is too old to display a consistent list result. "
                           "You can start a new list without the continue parameter.")
        items = self._snapshot(kind, namespace, snapshot_rv)
        end = start + limit if limit else len(items)
        chunk = items[start:end]
        meta: dict[str, Any] = {"resourceVersion": str(snapshot_rv)}
        if end < len(items):
            meta["continue"] = encode_continue(snapshot_rv, end)
            meta["remainingItemCount"] = len(items) - end
        return {"kind": f"{kind}List", "apiVersion": resource.api_version, "metadata": meta, "items": chunk}

    def _snapshot(self, kind: str, namespace: str | None, at_rv: int) -> list[dict[str, Any]]:
        """The objects of ``kind`` as they were at ``at_rv``: the current set with newer changes undone."""
        current = {k: v for k, v in self.objects.items() if k[0] == kind and (namespace is None or k[1] == namespace)}
        if at_rv < self.rv:
            # Undo changes after at_rv, newest first, using the history (which covers them: at_rv >= compacted).
            later = [c for c in self.history if c.rv > at_rv and c.kind == kind
                     and (namespace is None or c.namespace == namespace)]
            previous: dict[Key, dict[str, Any] | None] = {}
            for change in later:  # oldest first: the first change after at_rv knows the version at at_rv
                previous.setdefault((kind, change.namespace, change.object["metadata"]["name"]), change.previous)
            for key, obj in previous.items():
                if obj is None:
                    current.pop(key, None)
                else:
                    current[key] = obj
        return [current[k] for k in sorted(current)]

    def changes_since(self, kind: str, namespace: str | None, rv: int) -> Iterator[Change]:
        """Watch-window entries after ``rv``; 410 Gone if the window no longer reaches back that far."""
        if rv < self.compacted_rv:
            raise gone(f"too old resource version: {rv} ({self.compacted_rv})")
        for change in self.history:
            if change.rv > rv and change.kind == kind and (namespace is None or change.namespace == namespace):
                yield change

    @staticmethod
    def _resource(kind: str) -> Resource:
        try:
            return BY_KIND[kind]
        except KeyError:
            raise ApiError(400, "BadRequest", f"kind {kind!r} is not served by the simulator") from None


def encode_continue(rv: int, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": offset}).encode()).decode()


def decode_continue(token: str) -> tuple[int, int]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(doc["rv"]), int(doc["start"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "BadRequest", "invalid continue token") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` removes a key, anything else (lists
    included) replaces. A new value; neither argument is changed. (kube-apiserver's strategic merge patch
    differs only for lists with a patch strategy, which the simulator does not model.)"""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _spec_changed(old: dict[str, Any], new: dict[str, Any]) -> int:
    """1 when an update changes the object outside ``metadata`` and ``status`` (and the type fields), else
    0: kube-apiserver bumps ``metadata.generation`` for spec changes only (the registries'
    ``PrepareForUpdate``); a label or annotation, as ``kubectl annotate``/``label`` write, leaves it, except
    an EndpointSlice's labels (its service-name label; pkg/registry/discovery/endpointslice/strategy.go
    ``PrepareForUpdate`` compares ``Labels`` too)."""
    ignored = ("metadata", "status", "apiVersion", "kind")
    if {k: v for k, v in old.items() if k not in ignored} != {k: v for k, v in new.items() if k not in ignored}:
        return 1
    labels = (old["metadata"].get("labels"), new["metadata"].get("labels"))
    return int(new.get("kind") == "EndpointSlice" and labels[0] != labels[1])
