"""One applier per node: the newest applier of a node takes the node's claim, an older one that finds it
taken stops applying and says so (issue 21: two appliers of one node split its durable's deltas and each
one's drift check would revert the other's writes).

The claim is a key of the ``kipvs-appliers`` key-value bucket (shared/contract/node_claims.py). The newest one
wins, so that a DaemonSet rollout (maxSurge, or a pod replaced) hands the node over within one check period
without waiting for the old pod to end; an applier started by mistake for a node also wins, and the log,
``kipvs status``, the readiness of the one it replaced and ``kipvs_applier_node_claim_held`` 0 there say so.
A superseded applier stays up but idle (it never claims again, so two appliers never take turns, also
when its service restarts after a bus failure or a replaced stream: each claim carries its process's start
time, and an older process never takes a newer one's claim; a restart of the process is a new applier and
takes the node back), renewing ``<key>.superseded`` so that
``kipvs status`` names it, and deleting it when it stops.

The claim is read back (a get of one message) when something may have changed it: the applier subscribes
(core NATS) to its own key's subject ``$KV.kipvs-appliers.<key>``, on which every put and delete of the key
is published, and reads the key back when a write that is not its own claim arrives or after a reconnect
(when one may have been missed): before a batch (:meth:`NodeClaim.held_lately`) and in :meth:`NodeClaim.watch`,
which wakes on such a write. A takeover is thus seen as soon as the new applier's put is published (the
superseded applier then applies no further batch and turns not ready). A write missed all the same (one made
while the subscription's interest was still reaching the other servers, at this applier's own start; a
message dropped by a slow subscriber) is found by the periodic read: every :data:`CHECK_S` for the first
:data:`SETTLING_CHECKS` checks, then every :data:`QUIET_CHECK_S`. The claim is also read before each drift
check (:meth:`NodeClaim.still_held`), so a superseded applier never reverts the new one's writes. Issue 27:
a read per node per batch was a request per node and change for the servers, then a read every 5 s per
idle node (1,000 a second at 5,000 nodes); now one a minute while nobody else writes the key. Without a
connection to subscribe on, :meth:`held_lately` reads at most once per :data:`BATCH_CHECK_S` and
:meth:`NodeClaim.watch` every :data:`CHECK_S`, as before.
Upstream: Kubernetes leader election (client-go ``tools/leaderelection``) polls its lease; kipvs's claim
is a key-value entry, so it is watched by its subject instead, the way a NATS KV watcher sees puts, without
a consumer per node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from shared.contract import node_claims
from shared.messaging import bus
from shared.messaging.backoff import Backoff
from shared.service.metrics import Registry

log = logging.getLogger("kipvs.applier")

# How often an applier reads its claim back (one direct get) when no write on the key's subject said it
# changed: every CHECK_S while the subscription's interest may still be settling on the other servers (and
# always without a subscription), then every QUIET_CHECK_S, a safety net for a write the subscription missed.
CHECK_S = 5.0
SETTLING_CHECKS = 3
QUIET_CHECK_S = 60.0
BATCH_CHECK_S = 1.0  # without a subscription to the key: the claim read before a batch at most this often
SUPERSEDED_RENEW_S = 30.0
PROCESS_STARTED_NS = time.time_ns()  # this process's start, as the node's clock has it (Claim.started_ns)


def instance_name() -> str:
    """This applier: the pod's name (``POD_NAME``, set by the manifests: with host networking ``HOSTNAME`` is
    the node's) or the host's, the process id and a random part (a restarted process is a new instance)."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


def _process(instance: str) -> str:
    """The pod (or host) and process of an instance name."""
    return instance.rsplit("/", 1)[0]


class NodeClaim:
    """The node's claim, as one applier holds it. ``held``: the claim is this applier's; ``lost``: another
    applier's claim was seen (``holder`` names it), for good. Neither: the bucket is not declared yet (a
    kipvs upgraded without 'kipvs topology apply'): the node is applied all the same, with a warning, and
    the claim is taken as soon as the bucket exists. ``nc``: the connection to watch the key's subject on
    (see the module; None: :meth:`held_lately` polls)."""

    def __init__(self, js: JetStreamContext, node: str, metrics: Registry, instance: str = "",
                 check_every: float = CHECK_S, started_ns: int = 0, nc: NATS | None = None) -> None:
        self.js, self.node, self.instance, self.nc = js, node, instance or instance_name(), nc
        self.started_ns = started_ns or PROCESS_STARTED_NS
        self.check_every = check_every
        self.held = False
        self.lost = False
        self.holder = ""
        self.revision = 0
        self._kv: KeyValue | None = None
        self._read_at: float | None = None  # event-loop time of the last read in held_lately
        self._sub: Subscription | None = None  # the key's subject (every put and delete of it)
        self._written = True  # a write to the key that is not this applier's claim arrived: read it back
        self._reconnects = 0  # the connection's reconnects when the key was last read (one may hide a write)
        self._write_seen = asyncio.Event()  # wakes watch() when _written is set by the subscription
        self.reads = 0  # reads of the key (a request to the servers each)
        metrics.gauge("kipvs_applier_node_claim_held",
                      "1 while this applier holds its node's claim and applies; 0 once a newer applier of the "
                      "same node took it over (this one then applies nothing)", read=lambda: float(self.held))

    async def take(self, stop: asyncio.Event) -> bool:
        """Put this applier's claim on the node's key (the newest wins), retrying while the bus fails; without
        the bucket, go on unclaimed (see the class). False when told to stop first."""
        backoff = Backoff(initial=0.5, maximum=10.0)
        while not stop.is_set():
            try:
                await self._take()
                return True
            except BucketNotFoundError:
                log.warning("the claims bucket %s does not exist (run 'kipvs topology apply' after an upgrade): "
                            "node %s is applied without its claim, and a second applier of it goes undetected",
                            node_claims.BUCKET, self.node)
                return True
            except bus.INFRASTRUCTURE_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc or ''}"
            delay = backoff.next()
            log.warning("cannot claim node %s yet (%s); retrying in %.1fs", self.node, why, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _take(self) -> None:
        kv = self._kv = self._kv or await self.js.key_value(node_claims.BUCKET)
        await self._listen()  # before the key is read: no write after the read goes unseen
        key = node_claims.claim_key(self.node)
        previous = None
        with contextlib.suppress(KeyNotFoundError):
            previous = node_claims.decode_claim((await kv.get(key)).value)
        if previous is not None and previous.node != self.node:
            previous = None  # not a claim of this node (a forged value): nobody holds it
        # the service started again in this process (the bus failed, a stream was replaced): not a takeover
        restarted = previous is not None and _process(previous.instance) == _process(self.instance)
        if previous is not None and not restarted and previous.started_ns > self.started_ns:
            self._lose(previous.instance)  # superseded before this service restarted: never take the node back
            return
        taken = previous is not None and not restarted
        claim = node_claims.Claim(node=self.node, instance=self.instance, since_ns=time.time_ns(),
                                  previous=previous.instance if taken and previous else "",
                                  takeovers=(previous.takeovers + int(taken)) if previous else 0,
                                  started_ns=self.started_ns)
        self.revision = await kv.put(key, node_claims.encode(claim))
        self.held, self.holder = True, self.instance
        if taken and previous is not None:
            log.warning("node %s: this applier (%s) takes over from %s; that one sees it on the claim's subject "
                        "and stops applying at once (within %.0fs if it is still starting)", self.node,
                        self.instance, previous.instance, self.check_every)

    async def _listen(self) -> None:
        """Subscribe to the key's subject (once; the interest on the server before returning)."""
        if self.nc is None or self._sub is not None:
            return
        subject = f"$KV.{node_claims.BUCKET}.{node_claims.claim_key(self.node)}"
        self._sub = await self.nc.subscribe(subject, cb=self._on_write, pending_msgs_limit=64)
        await self.nc.flush()

    async def _on_write(self, msg: Msg) -> None:
        claim = node_claims.decode_claim(msg.data) if msg.data else None
        if claim is None or claim.instance != self.instance:  # a delete, a purge, another applier's claim
            self._written = True
            self._write_seen.set()

    def _may_have_changed(self) -> bool:
        """Whether the key may hold something this applier has not read: a write seen, or a reconnect."""
        return self._written or self.nc is None or self.nc.stats.get("reconnects", 0) != self._reconnects

    async def held_lately(self, within: float = BATCH_CHECK_S) -> bool:
        """Whether this applier still holds the node, before a batch: read from the bus only when the key's
        subject carried a write that is not this applier's, after a reconnect (see the module), or, without
        a subscription, at most once per ``within`` seconds. In between: held, unless already lost."""
        if self.lost:
            return False
        if self._sub is not None:
            return await self.still_held() if self._may_have_changed() else True
        now = asyncio.get_running_loop().time()
        if self._read_at is None or now - self._read_at >= within:
            self._read_at = now
            return await self.still_held()
        return True

    async def still_held(self) -> bool:
        """Read the key back: False (and say so, once) when another applier's claim is on it. The bus failing
        keeps the last answer (the check is repeated); a deleted key (an admin's) is claimed again."""
        if self.lost or not self.held or self._kv is None:
            return not self.lost
        # cleared before the read: a write arriving during it is read at the next check
        self._written, self._reconnects = False, self.nc.stats.get("reconnects", 0) if self.nc else 0
        self._write_seen.clear()
        self.reads += 1
        try:
            entry = await self._kv.get(node_claims.claim_key(self.node))
        except KeyNotFoundError:
            with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):  # tried again at the next check
                await self._take()
            return True
        except bus.INFRASTRUCTURE_ERRORS:
            self._written = True  # read again at the next batch
            return True
        claim = node_claims.decode_claim(entry.value)
        if entry.revision == self.revision or (claim is not None and claim.instance == self.instance):
            return True
        if claim is None or claim.node != self.node or self._older(claim):
            # unreadable, of another node, or of an applier started before this one (which never claims over
            # a newer one: _take): not a takeover (a node's own junk, a forged value), so claim again
            log.warning("node %s: the claim key holds no claim of a newer applier of this node; claiming it "
                        "again", self.node)
            with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                await self._take()
            return True
        self._lose(claim.instance)
        return False

    def _older(self, claim: node_claims.Claim) -> bool:
        """``claim`` is another process's, started before this one (0: a kipvs before started_ns: unknown)."""
        return (0 < claim.started_ns < self.started_ns
                and _process(claim.instance) != _process(self.instance))

    def _lose(self, holder: str) -> None:
        self.held, self.lost, self.holder = False, True, holder
        log.error("node %s: %s took over this node's claim; this applier (%s) stops applying and stays idle "
                  "(stop it: two appliers of one node would undo each other's writes)", self.node, self.holder,
                  self.instance)

    async def watch(self, stop: asyncio.Event) -> None:
        """Return when the claim is lost (or ``stop`` is set): the key read back as soon as a write on its
        subject is not this applier's, else every ``check_every`` seconds for the first
        :data:`SETTLING_CHECKS` checks (always, without a subscription), then every :data:`QUIET_CHECK_S`."""
        checks = 0
        while not stop.is_set():
            quiet = self._sub is not None and checks >= SETTLING_CHECKS
            await self._wait_for_check(stop, QUIET_CHECK_S if quiet else self.check_every)
            checks += 1
            if stop.is_set():
                return
            if not self.held and not self.lost:  # unclaimed: the bucket may exist by now
                with contextlib.suppress(BucketNotFoundError, *bus.INFRASTRUCTURE_ERRORS):
                    await self._take()
            elif not await self.still_held():
                return

    async def _wait_for_check(self, stop: asyncio.Event, period: float) -> None:
        """Until ``period`` seconds passed, ``stop`` is set or the key's subject carried another's write."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._write_seen.wait())]
        try:
            await asyncio.wait(waits, timeout=period, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def idle(self, stop: asyncio.Event) -> None:
        """Superseded: renew ``<key>.superseded`` every SUPERSEDED_RENEW_S and read the node's claim every
        ``check_every`` seconds until ``stop``, then delete the record. When the holder has released the node
        (it stopped: :meth:`release`), raise :class:`ClaimReleased`: the runtime starts the service again,
        and it takes the node (else the node would stay unapplied behind an idle applier)."""
        assert self._kv is not None
        key = node_claims.superseded_key(self.node)
        renewed = -SUPERSEDED_RENEW_S
        try:
            while not stop.is_set():
                if time.monotonic() - renewed >= SUPERSEDED_RENEW_S:
                    record = node_claims.Superseded(node=self.node, instance=self.instance, by=self.holder,
                                                    at_ns=time.time_ns())
                    with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS):
                        await self._kv.put(key, node_claims.encode(record))
                    renewed = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.check_every)
                if not stop.is_set() and await self._released():
                    raise ClaimReleased(f"node {self.node}: {self.holder} released the node's claim; this "
                                        "applier takes the node")
        finally:
            with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS, KeyNotFoundError):
                await self._kv.delete(key)

    async def _released(self) -> bool:
        assert self._kv is not None
        try:
            await self._kv.get(node_claims.claim_key(self.node))
        except KeyNotFoundError:  # deleted (KeyDeletedError is one) or never written: nobody holds the node
            return True
        except bus.INFRASTRUCTURE_ERRORS:
            return False
        return False

    async def close(self) -> None:
        """Unsubscribe from the key's subject (the service ends; a restart makes a new NodeClaim)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):  # a closed connection has no subscriptions left
                await self._sub.unsubscribe()
            self._sub = None

    async def release(self) -> None:
        """At this applier's stop, while it holds the node: delete the node's claim (only at this applier's
        own revision), so that a superseded applier of the node, if one runs, takes the node at once."""
        if not self.held or self._kv is None:
            return
        with contextlib.suppress(*bus.INFRASTRUCTURE_ERRORS, KeyNotFoundError):
            await self._kv.delete(node_claims.claim_key(self.node), last=self.revision)
        self.held = False


class ClaimReleased(bus.RestartService):
    """The applier that held the node released it: a bus event the runtime answers by starting the service
    again (``runtime._restarting`` restarts on nats-py's errors), which then takes the node."""
