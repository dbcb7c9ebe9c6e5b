"""Noticing that a stream a service reads was replaced under it (issue 21, High 6).

A NATS server restarted with a wiped (or restored) store comes back with no streams, or with streams of the
same names declared again: every position a running service holds (the planner's log sequence, an
applier's plan-stream sequence, the consumers it created) belongs to the old stream, and a service that
keeps them skips everything the new stream holds. The guard pins each stream's identity
(:class:`~shared.contract.topology.StreamIdentity`: its creation time and sequences) when the service starts,
checks it (on a period for the watcher and the planner, one or two requests per check; an applier checks
only when its consumer fails, since a wiped store always takes its consumer with it), and trips: the
runtime tells the service to stop and starts it again from the new stream (``shared/service/runtime.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from nats.js import JetStreamContext

from shared.contract import topology
from shared.messaging import bus

log = logging.getLogger("kipvs.runtime")

CHECK_PERIOD_S = 5.0  # seconds between checks of the guarded streams (watcher, planner)


class StreamGuard:
    """The identities of ``names`` as pinned at the service's start; ``trip`` tells the service to stop."""

    def __init__(self, js: JetStreamContext, names: Sequence[str], trip: Callable[[str], None]) -> None:
        self.js = js
        self.names = tuple(names)
        self._trip = trip
        self.pinned: dict[str, topology.StreamIdentity] = {}
        self.missing: set[str] = set()  # found missing at the last check
        self.reason = ""

    async def pin(self) -> None:
        """Record what each stream is now (a stream missing now is not guarded: the service waits for it)."""
        for name in self.names:
            found = await topology.stream_identity(self.js, name)
            if found is not None:
                self.pinned[name] = found

    async def check(self) -> str:
        """Why a pinned stream is not the one pinned ("" when every one is); trips the guard when one is not.
        A stream found missing trips it only when it is still missing at the next check (a cluster electing
        its leaders must not restart every service). nats-py's errors when the bus cannot answer (an outage
        is not a replacement)."""
        for name, before in self.pinned.items():
            now = await topology.stream_identity(self.js, name)
            if now is None and name not in self.missing:
                self.missing.add(name)
                continue
            self.missing.discard(name)
            reason = topology.replacement(before, now)
            if reason:
                self.trip(reason)
                return reason
        return ""

    def trip(self, reason: str) -> None:
        if not self.reason:
            log.error("%s: starting the service again from the new stream", reason)
            self.reason = reason
            self._trip(reason)

    async def watch(self, period: float = CHECK_PERIOD_S) -> None:
        """Check every ``period`` seconds until tripped (returns then); failures of the bus are retried."""
        while not self.reason:
            await asyncio.sleep(period)
            with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                await self.check()
