"""The list/watch loop for one kind (after kopf's ``_cogs/clients/watching.py``).

    read the log's view of the kind
    loop:
        list (in chunks) -> log what changed, log deletions the log missed, log the resync record
        watch from the list's version, with bookmarks and a read timeout:
            each event -> log it (invalid objects and lines are parked), remember its version
            stream ended (timeoutSeconds)       -> watch again from the last version
            connection error / half-open stream -> back off, watch again from the last version
            410 Gone                            -> relist

The version to resume from is taken only after an event is logged, from objects and BOOKMARKs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats.errors
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from prometheus_client import Counter

from kipvs.shared import bus
from kipvs.shared import events as kipvs_events
from kipvs.shared.backoff import Backoff
from kipvs.shared.metrics import Registry

from .event_log import EventLog
from .objects import InvalidObject, identify, plan_event, reconcile

log = logging.getLogger("kipvs.watcher")


class Gone(Exception):
    """The watch's version was compacted away (410): relist."""


class WatchError(Exception):
    """The watch stream said ERROR with something other than 410."""


ListFn = Callable[..., Any]


def list_function(api: client.ApiClient, kind: str) -> ListFn:
    """kubernetes-asyncio's list-or-watch call for ``kind``, across all namespaces."""
    if kind == "Service":
        return client.CoreV1Api(api).list_service_for_all_namespaces
    if kind == "Pod":
        return client.CoreV1Api(api).list_pod_for_all_namespaces
    if kind == "Node":
        return client.CoreV1Api(api).list_node
    if kind == "EndpointSlice":
        return client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces
    if kind == "FelixConfiguration":
        return functools.partial(client.CustomObjectsApi(api).list_cluster_custom_object,
                                 "crd.projectcalico.org", "v1", "felixconfigurations")
    raise ValueError(f"kind {kind!r} is not watched")


RELIST_REASONS = ("list", "gone")  # every list, and among them those after a 410 Gone
RESTART_REASONS = ("timeout", "api-error", "event-log", "connection")


@dataclass
class WatchMetrics:
    """The list/watch counters, one series per kind (and reason), all declared at start."""

    relists: Counter
    restarts: Counter
    parked: Counter

    @classmethod
    def declare(cls, metrics: Registry) -> WatchMetrics:
        kinds = kipvs_events.KUBE_KINDS
        return cls(
            relists=metrics.counter("kipvs_watcher_relists_total",
                                    "lists of a kind: reason list = every list (initial, after a 410, after errors); "
                                    "reason gone = the watch's version expired (410 Gone)",
                                    labels={"kind": kinds, "reason": RELIST_REASONS}),
            restarts=metrics.counter("kipvs_watcher_watch_restarts_total",
                                     "watch requests of a kind after the first, by reason",
                                     labels={"kind": kinds, "reason": RESTART_REASONS}),
            parked=metrics.counter("kipvs_watcher_parked_total", "objects or watch lines of a kind parked as invalid",
                                   labels={"kind": kinds}))


@dataclass
class WatchSettings:
    list_chunk: int = 500
    watch_timeout: int = 300  # timeoutSeconds asked of the server per watch request
    read_timeout: float = 90.0  # no byte for this long (not even a bookmark): the stream is dead
    connect_timeout: float = 10.0
    absent_retry: float = 60.0  # a kind the server does not serve (no Calico CRD) is retried this often


class KindWatcher:
    def __init__(self, kind: str, list_fn: ListFn, event_log: EventLog, js: JetStreamContext,
                 settings: WatchSettings, metrics: WatchMetrics, stop: asyncio.Event) -> None:
        self.kind = kind
        self.list_fn = list_fn
        self.log = event_log
        self.js = js
        self.settings = settings
        self.stop = stop
        self.listed = asyncio.Event()  # set once the first list is logged (or the kind is absent)
        self.metrics = metrics
        self._timeout = (settings.connect_timeout, settings.read_timeout)

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=30.0)
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = await self._list()
                    backoff.reset()
                version = await self._watch(version)
                backoff.reset()
                self.metrics.restarts.labels(self.kind, "timeout").inc()
            except Gone:
                log.info("%s watch: version expired (410); relisting", self.kind)
                self.metrics.relists.labels(self.kind, "gone").inc()
                version = None
            except ApiException as exc:
                if exc.status == 404 and version is None:
                    log.warning("the API server does not serve %ss (not installed?); retrying in %.0fs",
                                self.kind, self.settings.absent_retry)
                    self.listed.set()
                    await self._sleep(self.settings.absent_retry)
                    continue
                delay = backoff.next()
                log.warning("%s: API error %s %s; retrying in %.1fs", self.kind, exc.status, exc.reason, delay)
                self.metrics.restarts.labels(self.kind, "api-error").inc()
                await self._sleep(delay)
            except nats.errors.Error as exc:
                # the event log refused an append (full store, timeout, no connection): nothing is lost,
                # the watch resumes from the last version whose events are all logged
                delay = backoff.next()
                log.warning("%s: the event log is not taking appends (%s: %s); resuming in %.1fs", self.kind,
                            type(exc).__name__, exc or "", delay)
                self.metrics.restarts.labels(self.kind, "event-log").inc()
                await self._sleep(delay)
            except (aiohttp.ClientError, TimeoutError, OSError, WatchError, json.JSONDecodeError) as exc:
                delay = backoff.next()
                log.warning("%s: %s: %s; resuming in %.1fs", self.kind, type(exc).__name__, exc, delay)
                self.metrics.restarts.labels(self.kind, "connection").inc()
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _list(self) -> str:
        """List everything in chunks, log what changed, then the resync record. Returns the list version."""
        items: list[dict[str, Any]] = []
        token, list_rv = None, ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.settings.list_chunk, "_preload_content": False,
                                      "_request_timeout": self._timeout}
            if token:
                kwargs["_continue"] = token
            resp = await self.list_fn(**kwargs)
            try:
                body = json.loads(await resp.read())
            finally:
                resp.release()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            list_rv = meta.get("resourceVersion", list_rv)
            token = meta.get("continue")
            if not token:
                break
        valid = []
        for obj in items:
            try:
                identify(self.kind, obj)
            except InvalidObject as exc:
                await self._park(json.dumps(obj).encode(), str(exc))
                continue
            valid.append(obj)
        planned, resync = reconcile(self.kind, valid, self.log.logged, list_rv)
        appended = await self.log.append_many(planned)
        await self.log.append_resync(resync)
        self.metrics.relists.labels(self.kind, "list").inc()
        log.info("%s: listed %d at version %s, logged %d changes", self.kind, len(valid), list_rv, appended)
        self.listed.set()
        return list_rv

    async def _watch(self, version: str) -> str:
        resp = await self.list_fn(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                  timeout_seconds=self.settings.watch_timeout, _preload_content=False,
                                  _request_timeout=self._timeout)
        try:
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        version = await self._take_line(line, version)
                if self.stop.is_set():
                    break
            if buffer.strip():
                version = await self._take_line(buffer, version)
        finally:
            resp.release()
        return version

    async def _take_line(self, line: bytes, version: str) -> str:
        try:
            event = json.loads(line)
        except ValueError as exc:
            await self._park(line, f"{self.kind} watch line is not valid JSON: {exc}")
            return version
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            await self._park(line, f"{self.kind} watch line is not a watch event")
            return version
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""))
            raise WatchError(f"watch ERROR event: {obj.get('code')} {obj.get('message')}")
        if kind == "BOOKMARK":
            return (obj.get("metadata") or {}).get("resourceVersion") or version
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            await self._park(line, f"{self.kind} watch event has unknown type {kind!r}")
            return version
        try:
            planned = plan_event(self.kind, kind, obj, self.log.logged.get(identify(self.kind, obj).key), "watch")
        except InvalidObject as exc:
            await self._park(line, str(exc))
            return version
        if planned is not None:
            await self.log.append(planned)
        return obj["metadata"]["resourceVersion"]

    async def _park(self, data: bytes, reason: str) -> None:
        self.metrics.parked.labels(self.kind).inc()
        await bus.park(self.js, "watcher", None, data, reason, subject=f"kube.{self.kind}")
