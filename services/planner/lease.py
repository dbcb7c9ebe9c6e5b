"""The planners' leader lease: one key in a JetStream key-value bucket, taken and renewed by
compare-and-set on the key's revision. The semantics are client-go's ``leaderelection`` (what
kube-controller-manager's ``--leader-elect-*`` flags set), on NATS instead of a coordination.k8s.io Lease:

- the holder renews every ``retry_period`` seconds (``kv.update(key, value, last=revision)``); it stops
  acting as the leader when it has not renewed for ``renew_deadline`` seconds, or at once when a renewal
  finds another revision (someone took the lease);
- a candidate watches the key; when the revision it saw has not changed for ``lease_duration`` seconds
  (measured on its own monotonic clock: no clock is compared between machines), or the key is deleted (a
  holder that stopped cleanly releases it), it writes its own value with ``last=`` that revision. Only one
  candidate's write can succeed for one revision: the bucket's stream is the arbiter (Raft-replicated when
  it has three replicas, so a lease survives the loss of one server).

The lease decides who should be active; it does not stop a paused holder from writing afterwards. That is
the fence's job (see ``failover.py``): the plan stream refuses a deposed planner's deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.contract import topology
from shared.messaging import bus
from shared.messaging.backoff import Backoff

log = logging.getLogger("kipvs.planner.lease")


@dataclass(frozen=True)
class LeaseTiming:
    """Seconds, as kube-controller-manager's ``--leader-elect-lease-duration``, ``--leader-elect-renew-deadline``
    and ``--leader-elect-retry-period`` (shorter defaults here: the target is a takeover within 5 s)."""

    lease_duration: float = 3.0
    renew_deadline: float = 2.0
    retry_period: float = 0.5

    def check(self) -> None:
        """ValueError (one sentence) unless retry_period < renew_deadline < lease_duration, client-go's rule:
        a holder must give up before any candidate may take over."""
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"leader election needs retry period < renew deadline < lease duration, got {self.retry_period:g}s"
                f" < {self.renew_deadline:g}s < {self.lease_duration:g}s")


@dataclass
class Observation:
    """What a candidate knows of the lease: the last revision it saw and when it first saw it (its own
    monotonic clock). Pure: the candidate's decision is :meth:`expired`."""

    revision: int = 0  # 0: no key was ever written
    holder: str = ""  # "" when free (never taken, or released)
    since: float = 0.0

    def saw(self, revision: int, holder: str, now: float) -> bool:
        """Record an entry; True when it is a change (a renewal or a new holder)."""
        if revision == self.revision and holder == self.holder:
            return False
        self.revision, self.holder, self.since = revision, holder, now
        return True

    def expired(self, now: float, lease_duration: float) -> bool:
        """May a candidate take the lease now: it is free, or unchanged for ``lease_duration`` seconds."""
        return not self.holder or now - self.since >= lease_duration


def lease_value(identity: str, timing: LeaseTiming, acquired: str, transitions: int) -> bytes:
    """The key's value, with coordination.k8s.io/v1 Lease's field names (for operators reading the bucket)."""
    return json.dumps({"holderIdentity": identity, "leaseDurationSeconds": timing.lease_duration,
                       "acquireTime": acquired, "renewTime": datetime.now(UTC).isoformat(),
                       "leaseTransitions": transitions}).encode()


def parse_value(data: bytes | None) -> tuple[str, int]:
    """(holderIdentity, leaseTransitions) of a stored value; ("", 0) for a deleted or unreadable one (a
    value that is not ours is treated as a holder named by its bytes, so it expires rather than is stolen)."""
    if not data:
        return "", 0
    try:
        doc = json.loads(data)
        return str(doc["holderIdentity"]), int(doc.get("leaseTransitions", 0))
    except (ValueError, KeyError, TypeError):
        return data[:64].decode(errors="replace"), 0


class Lease:
    """One planner's side of the election. ``acquire`` blocks until this planner holds the lease (or
    ``stop`` is set); ``hold`` renews it until it is lost; ``release`` gives it up."""

    def __init__(self, js: JetStreamContext, identity: str, timing: LeaseTiming,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.js = js
        self.identity = identity
        self.timing = timing
        self.clock = clock
        self.revision = 0  # of our own value while we hold it
        self.renewed_at = 0.0  # when the last successful write was sent (our clock)
        self.previous = ""  # the holder we took over from
        self.acquired = ""  # when we took it (wall clock, ISO 8601), as the value says
        self.transitions = 0  # leaseTransitions of our value
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(topology.PLANNER_LEASE_BUCKET)
        return self._kv

    def held(self) -> bool:
        """Do we still count as the holder: renewed (by our clock) within the renew deadline."""
        return self.revision != 0 and self.clock() - self.renewed_at < self.timing.renew_deadline

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Watch the key and take the lease when it is free or expired; True once held, False when stopped."""
        seen = Observation()
        backoff = Backoff(initial=0.5, maximum=5.0)
        while not stop.is_set():
            try:
                kv = await self._bucket()
                watcher = await kv.watch(topology.PLANNER_LEASE_KEY)
                try:
                    if await self._watch(kv, watcher, seen, stop):
                        return True
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except bus.INFRASTRUCTURE_ERRORS as exc:
                delay = backoff.next()
                log.warning("cannot watch the planner lease (%s: %s); retrying in %.1fs", type(exc).__name__,
                            exc or "", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _watch(self, kv: KeyValue, watcher: KeyValue.KeyWatcher, seen: Observation,
                     stop: asyncio.Event) -> bool:
        transitions = 0
        while not stop.is_set():
            try:
                entry = await watcher.updates(timeout=self.timing.retry_period)
            except (NatsTimeoutError, TimeoutError):
                entry = None
            if entry is not None:
                deleted = entry.operation in ("DEL", "PURGE")
                holder, transitions = ("", transitions) if deleted else parse_value(entry.value)
                if seen.saw(entry.revision or 0, holder, self.clock()) and holder:
                    log.debug("the planner lease is held by %s (revision %d)", holder, seen.revision)
            if not seen.expired(self.clock(), self.timing.lease_duration):
                continue
            sent = self.clock()
            now = datetime.now(UTC).isoformat()
            try:
                revision = await kv.update(topology.PLANNER_LEASE_KEY,
                                           lease_value(self.identity, self.timing, now, transitions + 1),
                                           last=seen.revision)
            except KeyWrongLastSequenceError:
                continue  # another candidate was quicker, or the holder renewed: the watch shows which
            self.revision, self.renewed_at, self.previous = revision, sent, seen.holder
            self.acquired, self.transitions = now, transitions + 1
            return True
        return False

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew every retry period until the lease is lost, then set ``lost`` and return: another revision
        is found (taken over), or no renewal succeeded within the renew deadline (NATS unreachable)."""
        kv = await self._bucket()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.timing.retry_period)
            if lost.is_set():
                return
            sent = self.clock()
            try:
                value = lease_value(self.identity, self.timing, self.acquired, self.transitions)
                revision = await asyncio.wait_for(kv.update(topology.PLANNER_LEASE_KEY, value, last=self.revision),
                                                  self.timing.renew_deadline)
            except KeyWrongLastSequenceError:
                if await self._ours(kv):  # our previous renewal timed out here but was stored
                    continue
                log.warning("the planner lease was taken by another planner")
                self.revision = 0
                lost.set()
                return
            except bus.INFRASTRUCTURE_ERRORS as exc:
                if not self.held():
                    log.warning("could not renew the planner lease for %.1fs (%s: %s)", self.timing.renew_deadline,
                                type(exc).__name__, exc or "")
                    self.revision = 0
                    lost.set()
                    return
                continue
            self.revision, self.renewed_at = revision, sent

    async def _ours(self, kv: KeyValue) -> bool:
        """Is the stored value still ours (a renewal whose answer was lost)? Then continue from its revision."""
        try:
            entry = await kv.get(topology.PLANNER_LEASE_KEY)
        except Exception:
            return False
        if parse_value(entry.value)[0] != self.identity or not entry.revision:
            return False
        self.revision = entry.revision
        return True

    async def release(self) -> None:
        """Delete the key if we still hold it, so a standby takes over at once instead of after the lease
        duration. Best effort: if it fails, the lease simply expires."""
        if self.revision == 0:
            return
        with contextlib.suppress(Exception):
            kv = await self._bucket()
            await asyncio.wait_for(kv.delete(topology.PLANNER_LEASE_KEY, last=self.revision), 2.0)
            log.info("released the planner lease")
        self.revision = 0
