"""The simulator's open watch connections: the stream each one writes (kube-apiserver's watch wire format:
JSON lines of ADDED/MODIFIED/DELETED, BOOKMARK when asked, a 410 ``ERROR`` for a compacted version,
``timeoutSeconds``), what a change wakes, and the faults that reach them (drop, stall, a raw line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .store import ApiError, Resource, Store


def truthy(value: str | None) -> bool:
    """A query flag as the client sends it (``watch=True``, ``watch=1``)."""
    return (value or "").lower() in ("true", "1")


@dataclass(eq=False)
class Watch:
    kind: str
    namespace: str | None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: bool = False
    raw_lines: list[str] = field(default_factory=list)


class Watches:
    """Every open watch of one store. ``notify`` after each change to the store wakes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.open: set[Watch] = set()
        self._changed = asyncio.Condition()

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def drop(self) -> int:
        """Close every open watch connection abruptly (what a load-balancer reset looks like)."""
        for watch in self.open:
            watch.dropped.set()
        return len(self.open)

    def stall(self) -> int:
        """Open watches stay connected but receive nothing more, ever: a half-open stream."""
        for watch in self.open:
            watch.stalled = True
        return len(self.open)

    async def inject_line(self, kind: str, line: str) -> int:
        """Write ``line`` verbatim into every open watch of ``kind`` (malformed input on the wire)."""
        targets = [w for w in self.open if w.kind == kind]
        for watch in targets:
            watch.raw_lines.append(line)
        await self.notify()
        return len(targets)

    async def serve(self, request: web.Request, resource: Resource, namespace: str | None,
                    bookmark_interval: float) -> web.StreamResponse:
        """Answer a watch request: from its ``resourceVersion`` (none or "0": the current objects as ADDED
        first, as the API does) until ``timeoutSeconds``, a drop, or the client leaves."""
        bookmarks = truthy(request.query.get("allowWatchBookmarks"))
        timeout = float(request.query.get("timeoutSeconds") or 0) or None
        raw_rv = request.query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watch = Watch(resource.kind, namespace)
        self.open.add(watch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            if raw_rv in ("", "0"):
                for obj in self.store.list(resource.kind, namespace)["items"]:
                    await _send(response, "ADDED", obj)
                last = self.store.rv
            else:
                last = int(raw_rv)
            next_bookmark = loop.time() + bookmark_interval
            while True:
                if watch.dropped.is_set():
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if watch.stalled:
                    await watch.dropped.wait()  # half-open: silence until the client gives up
                    continue
                if (last := await self._changes(response, watch, last)) is None:
                    return response
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return response
                # kube-apiserver's cacheWatcher sends no bookmark older than the version the watch started
                # from: a watch from a future version (after a restore) hears nothing at all
                if bookmarks and now >= next_bookmark and self.store.rv >= last:
                    await _send(response, "BOOKMARK", {"kind": resource.kind, "apiVersion": resource.api_version,
                                                       "metadata": {"resourceVersion": str(last)}})
                    next_bookmark = now + bookmark_interval
                wake = min(x for x in (deadline, next_bookmark if bookmarks else None, now + 1.0) if x is not None)
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), max(0.0, wake - loop.time()))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            self.open.discard(watch)

    async def _changes(self, response: web.StreamResponse, watch: Watch, last: int) -> int | None:
        """Write the raw lines injected and every change after ``last``; the version written up to, or None
        when the version is compacted away (the 410 ``ERROR`` event is written: the watch ends)."""
        for line in watch.raw_lines:
            await response.write(line.encode() + b"\n")
        watch.raw_lines.clear()
        flushed_to = self.store.rv  # the window is read synchronously: consistent up to here
        try:
            pending = list(self.store.changes_since(watch.kind, watch.namespace, last))
        except ApiError as exc:
            await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
            return None
        for change in pending:
            await _send(response, change.type, change.object)
        return max(last, flushed_to)


async def _send(response: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
