"""The Kubernetes API simulator's HTTP server (aiohttp): list/watch/get/create/update/patch/delete, faults.

The wire protocol follows kube-apiserver closely enough that the real kubernetes-asyncio client cannot
tell the difference for what kipvs uses: collection resourceVersion on lists, ``limit``/``continue``,
watches from a resourceVersion as JSON lines with ADDED/MODIFIED/DELETED, BOOKMARK events when asked,
``timeoutSeconds``, a 410 ``ERROR`` event (a Status object) for a compacted version, and the capitalised
booleans the client sends (``watch=True``).

Faults for tests (also over HTTP under ``/_sim/``): drop every watch connection, stall watches (keep the
connection, send nothing: a half-open stream), compact the history (410 for older versions), and write a
raw line into open watches (a malformed object on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from .store import BY_KIND, BY_PLURAL, RESOURCES, ApiError, Resource, Store, decode_continue, encode_continue
from .tokens import TokenAuthority

log = logging.getLogger("kipvs.simulator")


_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
# kubectl annotate/label send a merge patch; a strategic one is the same for the maps they change.
_MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_SHORT_NAMES = {"Service": ["svc"], "Pod": ["po"], "Node": ["no"], "FelixConfiguration": ["felixconfig"]}
# What the simulator serves besides the stored kinds: the token request and review kipvs auth uses.
_SUBRESOURCES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("", "v1"): [{"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                  "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}],
    ("authentication.k8s.io", "v1"): [{"name": "tokenreviews", "singularName": "tokenreview",
                                       "namespaced": False, "kind": "TokenReview", "verbs": ["create"]}],
}


def _discovered(resource: Resource) -> dict[str, Any]:
    """An APIResource (meta/v1) for a stored kind."""
    return {"name": resource.plural, "singularName": resource.kind.lower(), "namespaced": resource.namespaced,
            "kind": resource.kind, "verbs": _VERBS, "shortNames": _SHORT_NAMES.get(resource.kind, [])}


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


@dataclass(eq=False)
class _Watch:
    kind: str
    namespace: str | None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: bool = False
    raw_lines: list[str] = field(default_factory=list)


class Simulator:
    """The store plus the HTTP app. Tests drive it directly; ``kipvs simulate`` serves it."""

    def __init__(self, bookmark_interval: float = 60.0) -> None:
        self.store = Store()
        self.bookmark_interval = bookmark_interval
        self.watches: set[_Watch] = set()
        self._changed = asyncio.Condition()
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every API request, for tests
        self.raw_items: dict[str, list[str]] = {}  # kind -> verbatim JSON texts served as extra list items
        self.tokens = TokenAuthority(self.store)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- driving the cluster (from tests, scenarios and the /_sim API) -----------------------------

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or replace it if it exists (like ``kubectl apply`` without the merge)."""
        resource = BY_KIND.get(obj.get("kind", ""))
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace", "default") if resource and resource.namespaced else ""
        if resource and (obj["kind"], namespace, meta.get("name", "")) in self.store.objects:
            obj = json.loads(json.dumps(obj))
            obj["metadata"].pop("resourceVersion", None)
            result = self.store.update(obj)
        else:
            result = self.store.create(obj)
        await self._notify()
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        result = self.store.delete(kind, namespace, name)
        await self._notify()
        return result

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def drop_watches(self) -> int:
        """Close every open watch connection abruptly (what a load-balancer reset looks like)."""
        for watch in self.watches:
            watch.dropped.set()
        return len(self.watches)

    def stall_watches(self) -> int:
        """Open watches stay connected but receive nothing more, ever: a half-open stream."""
        for watch in self.watches:
            watch.stalled = True
        return len(self.watches)

    def compact(self) -> int:
        """Forget the watch history so far: watches from older versions get 410 Gone."""
        return self.store.compact()

    def snapshot(self) -> int:
        """Take an etcd snapshot (see :meth:`restore`); returns its resourceVersion."""
        return self.store.snapshot()

    async def restore(self) -> int:
        """Restore the last snapshot without a revision bump, as an operator restoring etcd does: the
        resourceVersions go back to the snapshot's and every watch connection is cut (the API servers
        restart). Returns the restored resourceVersion."""
        rv = self.store.restore()
        self.drop_watches()
        await self._notify()
        return rv

    def inject_list_item(self, kind: str, text: str) -> int:
        """Serve ``text`` verbatim as one more item at the end of every list of ``kind`` from now on (an
        object this server could not even encode: nested too deep, say). Returns how many such items."""
        self.raw_items.setdefault(kind, []).append(text)
        return len(self.raw_items[kind])

    async def inject_watch_line(self, kind: str, line: str) -> int:
        """Write ``line`` verbatim into every open watch of ``kind`` (malformed input on the wire)."""
        targets = [w for w in self.watches if w.kind == kind]
        for watch in targets:
            watch.raw_lines.append(line)
        await self._notify()
        return len(targets)

    # --- serving ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kipvs-simulator",
            "clusters": [{"name": "kipvs-simulator", "cluster": {"server": self.url}}],
            "users": [{"name": "kipvs-simulator", "user": {"token": "simulated"}}],
            "contexts": [{"name": "kipvs-simulator",
                          "context": {"cluster": "kipvs-simulator", "user": "kipvs-simulator"}}],
        })

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/version", self._version)
        r.add_get("/_sim/kubeconfig", self._get_kubeconfig)
        r.add_post("/_sim/fault/{fault}", self._fault)
        # before the generic routes, which would take them for unknown resources
        r.add_post("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", self._token_request)
        r.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        for slash in ("", "/"):  # the Kubernetes client asks for /api/v1/, kubectl for /api/v1
            r.add_get("/api" + slash, self._core_versions)
            r.add_get("/apis" + slash, self._groups)
            r.add_get("/api/{version}" + slash, self._resources)
            r.add_get("/apis/{group}/{version}" + slash, self._resources)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}", self._collection)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", self._item)
            r.add_route("*", prefix + "/{plural}", self._collection)
            r.add_route("*", prefix + "/{plural}/{name}", self._item)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        try:
            return await handler(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _token_request(self, request: web.Request) -> web.Response:
        issued = self.tokens.request(request.match_info["namespace"], request.match_info["name"], await request.json())
        return web.json_response(issued, status=201)

    async def _token_review(self, request: web.Request) -> web.Response:
        return web.json_response(self.tokens.review(await request.json()), status=201)

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "34", "gitVersion": "v1.34.0-kipvs-simulator"})

    # Discovery, as kube-apiserver serves it without aggregation (what kubectl falls back to when the
    # answer is plain JSON, not an APIGroupDiscoveryList): staging/src/k8s.io/apiserver/pkg/endpoints/
    # discovery (legacy.go, root.go, version.go). kubectl needs it before any request for a resource.

    async def _core_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}]})

    async def _groups(self, _: web.Request) -> web.Response:
        groups = sorted({(r.group, r.version) for r in RESOURCES if r.group} | {("authentication.k8s.io", "v1")})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": group, "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
             "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version}}
            for group, version in groups]})

    async def _resources(self, request: web.Request) -> web.Response:
        group, version = request.match_info.get("group", ""), request.match_info["version"]
        served = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
        extra = _SUBRESOURCES.get((group, version), [])
        if not served and not extra:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": f"{group}/{version}" if group else version,
                                  "resources": [_discovered(r) for r in served] + extra})

    async def _get_kubeconfig(self, _: web.Request) -> web.Response:
        return web.Response(text=self.kubeconfig(), content_type="application/yaml")

    async def _fault(self, request: web.Request) -> web.Response:
        fault = request.match_info["fault"]
        if fault == "drop":
            return web.json_response({"dropped": self.drop_watches()})
        if fault == "stall":
            return web.json_response({"stalled": self.stall_watches()})
        if fault == "compact":
            return web.json_response({"compacted_to": self.compact()})
        if fault == "snapshot":
            return web.json_response({"snapshot": self.snapshot()})
        if fault == "restore":
            return web.json_response({"restored_to": await self.restore()})
        if fault == "inject-list-item":
            return web.json_response({"items": self.inject_list_item(request.query.get("kind", ""),
                                                                     await request.text())})
        if fault == "inject-line":
            n = await self.inject_watch_line(request.query.get("kind", ""), await request.text())
            return web.json_response({"watches": n})
        raise ApiError(404, "NotFound",
                       f"unknown fault {fault!r} (drop, stall, compact, snapshot, restore, inject-line, "
                       "inject-list-item)")

    def _resource(self, request: web.Request) -> Resource:
        group = request.match_info.get("group", "")
        version = request.match_info["version"]
        resource = BY_PLURAL.get((group, request.match_info["plural"]))
        if resource is None or resource.version != version:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({request.path})")
        if "namespace" in request.match_info and not resource.namespaced:
            raise ApiError(404, "NotFound", f"{resource.plural} is not namespaced")
        return resource

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        resource = self._resource(request)
        namespace = request.match_info.get("namespace")
        if request.method == "GET":
            if truthy(request.query.get("watch")):
                return await self._watch(request, resource, namespace)
            limit = int(request.query.get("limit") or 0)
            listed = self.store.list(resource.kind, namespace, limit, request.query.get("continue", ""))
            raw = self.raw_items.get(resource.kind)
            if not raw or "continue" in listed["metadata"]:
                return web.json_response(listed)
            if limit and listed["items"]:  # the injected items come on a page of their own, after the store's
                token = request.query.get("continue", "")
                start = decode_continue(token)[1] if token else 0
                listed["metadata"]["continue"] = encode_continue(int(listed["metadata"]["resourceVersion"]),
                                                                 start + len(listed["items"]))
                return web.json_response(listed)
            # metadata first, as kube-apiserver writes it
            head = json.dumps({k: v for k, v in listed.items() if k != "items"})[:-1]
            items = ", ".join([*(json.dumps(i) for i in listed["items"]), *raw])
            return web.Response(text=f'{head}, "items": [{items}]}}', content_type="application/json")
        if request.method == "POST":
            body = await request.json()
            body.setdefault("kind", resource.kind)
            if namespace:
                body.setdefault("metadata", {}).setdefault("namespace", namespace)
            created = self.store.create(body)
            await self._notify()
            return web.json_response(created, status=201)
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on a collection")

    async def _item(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        namespace = request.match_info.get("namespace", "")
        name = request.match_info["name"]
        if request.method == "GET":
            return web.json_response(self.store.get(resource.kind, namespace, name))
        if request.method == "PUT":
            body = await request.json()
            body.setdefault("kind", resource.kind)
            body.setdefault("metadata", {})["name"] = name
            if namespace:
                body["metadata"]["namespace"] = namespace
            updated = self.store.update(body)
            await self._notify()
            return web.json_response(updated)
        if request.method == "PATCH":
            if request.content_type not in _MERGE_PATCHES:
                raise ApiError(415, "UnsupportedMediaType", f"the simulator takes {' or '.join(_MERGE_PATCHES)} "
                               f"patches, not {request.content_type}")
            patched = self.store.patch(resource.kind, namespace, name, await request.json())
            await self._notify()
            return web.json_response(patched)
        if request.method == "DELETE":
            deleted = self.store.delete(resource.kind, namespace, name)
            await self._notify()
            return web.json_response(deleted)
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on an object")

    async def _watch(self, request: web.Request, resource: Resource, namespace: str | None) -> web.StreamResponse:
        bookmarks = truthy(request.query.get("allowWatchBookmarks"))
        timeout = float(request.query.get("timeoutSeconds") or 0) or None
        raw_rv = request.query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watch = _Watch(resource.kind, namespace)
        self.watches.add(watch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            if raw_rv in ("", "0"):
                # No version: start with synthetic ADDED events for the current state, as the API does.
                for obj in self.store.list(resource.kind, namespace)["items"]:
                    await self._send(response, "ADDED", obj)
                last = self.store.rv
            else:
                last = int(raw_rv)
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                if watch.dropped.is_set():
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if watch.stalled:
                    await watch.dropped.wait()  # half-open: silence until the client gives up
                    continue
                for line in watch.raw_lines:
                    await response.write(line.encode() + b"\n")
                watch.raw_lines.clear()
                flushed_to = self.store.rv  # the window is read synchronously: consistent up to here
                try:
                    pending = list(self.store.changes_since(resource.kind, namespace, last))
                except ApiError as exc:
                    await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
                    return response
                for change in pending:
                    await self._send(response, change.type, change.object)
                last = max(last, flushed_to)
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return response
                # kube-apiserver's cacheWatcher sends no bookmark older than the version the watch started
                # from: a watch from a future version (after a restore) hears nothing at all
                if bookmarks and now >= next_bookmark and self.store.rv >= last:
                    await self._send(response, "BOOKMARK", {
                        "kind": resource.kind, "apiVersion": resource.api_version,
                        "metadata": {"resourceVersion": str(last)}})
                    next_bookmark = now + self.bookmark_interval
                wake = min(x for x in (deadline, next_bookmark if bookmarks else None, now + 1.0) if x is not None)
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), max(0.0, wake - loop.time()))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            self.watches.discard(watch)

    @staticmethod
    async def _send(response: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
