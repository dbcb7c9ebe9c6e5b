"""The list/watch loop for one kind (after kopf's ``_cogs/clients/watching.py``).

    read the log's view of the kind
    loop:
        list (in chunks) -> log what changed, log deletions the log missed, log the resync record;
                            versions gone back (a restored API server) -> re-sync the log to the list
        watch from the list's version, with bookmarks and a read timeout:
            each event -> log it (invalid, too deep or too large objects and lines are parked), remember
                          its version
            stream ended (timeoutSeconds)       -> watch again from the last version
            connection error / half-open stream -> back off, watch again from the last version
            410 Gone                            -> relist
        before watching again: the server's version below ours (a restored API server) -> relist

The version to resume from is taken only after an event is logged, from objects and BOOKMARKs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats.errors
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from prometheus_client import Counter

from shared.contract import events as kipvs_events
from shared.messaging import bus
from shared.messaging.backoff import Backoff
from shared.service.metrics import Registry

from .event_log import EventLog
from .objects import InvalidObject, Planned, TooLarge, check_depth, identify, plan_event, reconcile, restore_evidence

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


# every list; among them those after a 410 Gone, and those that found the API server restored (versions back)
RELIST_REASONS = ("list", "gone", "restored")
# A parked object or line keeps at most this much of its bytes (the parking stream takes one message)
PARK_KEEP = 64 * 1024
# Bounds on what is read from the API server: one watch line (one object; kube-apiserver's etcd request
# limit is 1.5 MiB, NATS's max_payload at most 64 MiB) and one list page (``limit`` objects; halved when over).
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_PAGE_BYTES = 256 * 1024 * 1024
_CONTINUE = re.compile(rb'"continue"\s*:\s*"([^"]*)"')
_LIST_RV = re.compile(rb'"resourceVersion"\s*:\s*"([^"]*)"')
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
                                    "reason gone = the watch's version expired (410 Gone); reason restored = the "
                                    "list found the API server's resourceVersions gone back and re-synced the log",
                                    labels={"kind": kinds, "reason": RELIST_REASONS}),
            restarts=metrics.counter("kipvs_watcher_watch_restarts_total",
                                     "watch requests of a kind after the first, by reason",
                                     labels={"kind": kinds, "reason": RESTART_REASONS}),
            parked=metrics.counter("kipvs_watcher_parked_total",
                                   "objects or watch lines of a kind parked as invalid, too deep or too large",
                                   labels={"kind": kinds}))


@dataclass
class WatchSettings:
    list_chunk: int = 500
    watch_timeout: int = 300  # timeoutSeconds asked of the server per watch request
    read_timeout: float = 90.0  # no byte for this long (not even a bookmark): the stream is dead
    connect_timeout: float = 10.0
    absent_retry: float = 60.0  # a kind the server does not serve (no Calico CRD) is retried this often
    max_page_bytes: int = MAX_PAGE_BYTES  # one list response; over it, the page is asked again with half the limit


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
        # the version of the last watch line handled: where a watch that failed resumes (its events before
        # it are all logged), and what the API server's version must not be below when watching again
        self.progress = ""
        self.parked_count = 0  # objects and lines of this kind parked, since the start

    async def run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=30.0)
        version: str | None = None
        listed_now = False  # the watch about to start follows a list: no need to check the server's version
        while not self.stop.is_set():
            try:
                if version is None:
                    version = await self._list()
                    listed_now = True
                    backoff.reset()
                elif not listed_now and await self._went_back(version):
                    version = None
                    continue
                listed_now = False
                self.progress = version
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
                version = self.progress if version is not None else None
                await self._sleep(delay)
            except nats.errors.Error as exc:
                # the event log refused an append (full store, timeout, no connection): nothing is lost,
                # the watch resumes from the last version whose events are all logged
                delay = backoff.next()
                log.warning("%s: the event log is not taking appends (%s: %s); resuming in %.1fs", self.kind,
                            type(exc).__name__, exc or "", delay)
                self.metrics.restarts.labels(self.kind, "event-log").inc()
                version = self.progress if version is not None else None
                await self._sleep(delay)
            except (aiohttp.ClientError, TimeoutError, OSError, WatchError, ListError, json.JSONDecodeError) as exc:
                delay = backoff.next()
                log.warning("%s: %s: %s; resuming in %.1fs", self.kind, type(exc).__name__, exc, delay)
                self.metrics.restarts.labels(self.kind, "connection").inc()
                version = self.progress if version is not None else None
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _went_back(self, version: str) -> bool:
        """Before watching again: is the API server's current version (a one-object list, a consistent read)
        below the version the watch would resume from? Only a restored API server goes back (etcd restored
        without ``--bump-revision``); a watch from a version it has not reached yet hears nothing, not even
        bookmarks, until it gets there, so the kind is relisted instead (like client-go's reflector on
        "Too large resource version")."""
        resp = await self.list_fn(limit=1, _preload_content=False, _request_timeout=self._timeout)
        try:
            body = await _read_bounded(resp, MAX_PAGE_BYTES)
        finally:
            resp.release()
        # the list's own version, from the text before the items: the one item may be too deep to decode
        found = _LIST_RV.search(body[:body.find(b'"items"')] if b'"items"' in body else body)
        now = found.group(1).decode() if found else ""
        if not (now.isdigit() and version.isdigit() and int(now) < int(version)):
            return False
        log.warning("%s: the API server is at resourceVersion %s, below %s where the watch would resume: it "
                    "went back (restored from an older etcd snapshot?); relisting", self.kind, now, version)
        return True

    async def _list(self) -> str:
        """List everything in chunks, log what changed, then the resync record. Returns the list version.
        When the versions went back (:func:`restore_evidence`) the log is re-synced to the list."""
        before_seq = await self.log.last_seq()  # every record at or below was logged before this list
        parked_before = self.parked_count
        items, list_rv = await self._list_items()
        valid = []
        for obj in items:
            try:
                identify(self.kind, obj)
            except InvalidObject as exc:
                await self._park(json.dumps(obj).encode(), str(exc))
                continue
            valid.append(obj)
        evidence = restore_evidence(self.kind, valid, self.log.logged, list_rv)
        if evidence:
            log.warning("%s: the API server's resourceVersions went back (%s): restored from an older etcd "
                        "snapshot without a revision bump? re-syncing the log to the %d objects it holds now",
                        self.kind, evidence, len(valid))
            self.metrics.relists.labels(self.kind, "restored").inc()
        # A listed object that could not be taken may be one the log holds: missing from this list is no
        # proof it is gone, so nothing is deleted until a list where every object could be taken.
        partial = self.parked_count > parked_before
        if partial:
            log.warning("%s: %d listed objects were parked; logged objects missing from this list are kept "
                        "until a list without them", self.kind, self.parked_count - parked_before)
        planned, resync = reconcile(self.kind, valid, self.log.logged, list_rv,
                                    max(before_seq, 1) if evidence else 0, partial=partial)
        appended, refused = await self.log.append_many(planned)
        for event, reason in refused:
            await self._park_too_large(event, reason)
        await self.log.append_resync(resync)
        self.metrics.relists.labels(self.kind, "list").inc()
        log.info("%s: listed %d at version %s, logged %d changes", self.kind, len(valid), list_rv, appended)
        self.listed.set()
        return list_rv

    async def _list_items(self) -> tuple[list[dict[str, Any]], str]:
        """Every object of the kind, in pages of ``list_chunk`` (fewer when a page is over MAX_PAGE_BYTES);
        an object that nests too deep to decode is parked and passed by. Returns them and the list version."""
        items: list[dict[str, Any]] = []
        token, list_rv, limit, single = None, "", self.settings.list_chunk, 0
        while True:
            kwargs: dict[str, Any] = {"limit": 1 if single else limit, "_preload_content": False,
                                      "_request_timeout": self._timeout}
            if token:
                kwargs["_continue"] = token
            resp = await self.list_fn(**kwargs)
            try:
                raw = await _read_bounded(resp, self.settings.max_page_bytes)
            except ListError:
                if limit == 1:
                    raise
                limit = max(1, limit // 2)
                log.warning("%s: a list page is over %d bytes; asking for %d objects a page", self.kind,
                            self.settings.max_page_bytes, limit)
                continue
            finally:
                resp.release()
            try:
                body = json.loads(raw)
            except RecursionError:
                if not single:
                    single = limit  # go one object a page until past the one that cannot be decoded
                    continue
                body = await self._pass_undecodable(raw)
            single = max(0, single - 1)
            page = body.get("items") or []
            for obj in page:
                try:
                    check_depth(self.kind, raw, obj)
                except InvalidObject as exc:
                    await self._park(json.dumps(obj).encode()[:PARK_KEEP], str(exc))
                    continue
                items.append(obj)
            meta = body.get("metadata") or {}
            list_rv = meta.get("resourceVersion", list_rv)
            token = meta.get("continue")
            if not token:
                return items, list_rv

    async def _pass_undecodable(self, raw: bytes) -> dict[str, Any]:
        """A one-object page that nests too deep to decode: park it, and take its list metadata (which the
        API server writes before the items) from the text, so the list goes on past it."""
        await self._park(raw[:PARK_KEEP], f"a {self.kind} in the list nests too deep to decode "
                         f"(more than {sys.getrecursionlimit()} levels; {len(raw)} bytes, the first {PARK_KEEP} kept)")
        head = raw[:raw.find(b'"items"')] if b'"items"' in raw else b""
        meta: dict[str, str] = {}
        for key, pattern in (("continue", _CONTINUE), ("resourceVersion", _LIST_RV)):
            found = pattern.search(head)
            if found:
                meta[key] = found.group(1).decode()
        return {"metadata": meta, "items": []}

    async def _watch(self, version: str) -> str:
        resp = await self.list_fn(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                  timeout_seconds=self.settings.watch_timeout, _preload_content=False,
                                  _request_timeout=self._timeout)
        lines = LineSplitter(MAX_LINE_BYTES)
        try:
            async for chunk in resp.content.iter_any():
                for line, too_long in lines.feed(chunk):
                    if too_long:
                        await self._park(line, f"{self.kind} watch line is over {MAX_LINE_BYTES} bytes (the first "
                                         f"{len(line)} kept); passed over")
                    elif line.strip():
                        version = self.progress = await self._take_line(line, version)
                if self.stop.is_set():
                    break
            last = lines.rest()
            if last.strip():
                version = await self._take_line(last, version)
        finally:
            resp.release()
        return version

    async def _take_line(self, line: bytes, version: str) -> str:
        try:
            event = json.loads(line)
        except RecursionError:
            await self._park(line[:PARK_KEEP], f"{self.kind} watch line nests too deep to decode (more than "
                             f"{sys.getrecursionlimit()} levels; {len(line)} bytes, the first {PARK_KEEP} kept)")
            return version
        except ValueError as exc:
            await self._park(line[:PARK_KEEP], f"{self.kind} watch line is not valid JSON: {exc}")
            return version
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            await self._park(line[:PARK_KEEP], f"{self.kind} watch line is not a watch event")
            return version
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""))
            raise WatchError(f"watch ERROR event: {obj.get('code')} {obj.get('message')}")
        if kind == "BOOKMARK":
            return (obj.get("metadata") or {}).get("resourceVersion") or version
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            await self._park(line[:PARK_KEEP], f"{self.kind} watch event has unknown type {kind!r}")
            return version
        try:
            check_depth(self.kind, line, obj)
            planned = plan_event(self.kind, kind, obj, self.log.logged.get(identify(self.kind, obj).key), "watch")
            if planned is not None:
                await self.log.append(planned)
        except TooLarge as exc:
            await self._park(line[:PARK_KEEP], f"{exc} (the first {PARK_KEEP} bytes of the watch line kept)")
        except InvalidObject as exc:
            await self._park(line[:PARK_KEEP], str(exc))
            return version
        return obj["metadata"]["resourceVersion"]

    async def _park_too_large(self, event: Planned, reason: str) -> None:
        data = json.dumps(event.record.object, separators=(",", ":")).encode()
        await self._park(data[:PARK_KEEP], f"{reason} (the first {PARK_KEEP} bytes of the object kept)")

    async def _park(self, data: bytes, reason: str) -> None:
        self.parked_count += 1
        self.metrics.parked.labels(self.kind).inc()
        await bus.park(self.js, "watcher", None, data, reason, subject=f"kube.{self.kind}")


class LineSplitter:
    """Splits a byte stream into lines of at most ``limit`` bytes without copying what it holds again and
    again; a longer line is reported once, by its first PARK_KEEP bytes, and the rest of it dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.skipping = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        """(line, False) for every line ``chunk`` completes; (first bytes, True) when a line passes the limit."""
        out: list[tuple[bytes, bool]] = []
        start = 0
        while start <= len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self.skipping and piece:
                self.parts.append(piece)
                self.size += len(piece)
                if self.size > self.limit:
                    out.append((b"".join(self.parts)[:PARK_KEEP], True))
                    self.parts, self.size, self.skipping = [], 0, True
            if end < 0:
                break
            if not self.skipping:
                out.append((b"".join(self.parts), False))
            self.parts, self.size, self.skipping = [], 0, False
            start = end + 1
        return out

    def rest(self) -> bytes:
        """What followed the last newline (a last line without one); empty when it was too long."""
        return b"" if self.skipping else b"".join(self.parts)


class ListError(Exception):
    """A list page over its byte bound."""


async def _read_bounded(resp: Any, limit: int) -> bytes:
    """The whole response body, at most ``limit`` bytes (ListError past that); a body that ends early
    raises aiohttp.ClientPayloadError."""
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(1024 * 1024):
        total += len(chunk)
        if total > limit:
            raise ListError(f"a list response is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
