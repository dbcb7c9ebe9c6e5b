"""The node's durable consumer on the plan stream: created after the bootstrap, from the first stream
sequence the bootstrap did not read, and created again when the bus loses it.

An applier's consumer has one replica held in memory (shared/contract/topology.py, ``applier_consumer``): a server
restart, the consumer's server dying, or an operator deleting it loses it. Its position is not needed to
recover: the applier knows the last plan-stream sequence it applied, and the deltas after it are still in
the stream (kept forever), so a new consumer from there delivers exactly what the node has not seen. A lost
consumer shows as fetches that fail ("no responders": nothing serves the consumer's subject any more).

The position may fall between the parts of a chunked delta (``shared/contract/delta_chunks.py``): the parts before it
are held by the applier's assembler, which outlives the consumer, so the new consumer's first message is the
next part. A new process starts from its bootstrap instead, which never stops inside a chunked delta."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contract import topology
from shared.messaging import bus
from shared.messaging.backoff import Backoff
from shared.messaging.stream_guard import StreamGuard

log = logging.getLogger("kipvs.applier")

# Seconds each fetch waits at the server (bus.DurableConsumer.fetch_wait): no latency cost (a waiting fetch
# gets a message at once), and an idle node costs the servers two requests per wait.
FETCH_WAIT = 5.0


class ConsumerKeeper:
    """Recreates the node's consumer after ``position()`` (the last plan-stream sequence the node applied)
    when it is gone, or when fetching from it has failed for ``lost_after`` seconds (its server is down: a
    consumer with one replica does not move to another server by itself)."""

    def __init__(self, js: JetStreamContext, node: str, position: Callable[[], int], lost_after: float = 15.0,
                 guard: StreamGuard | None = None):
        self.js = js
        self.guard = guard  # the plan stream as bootstrapped from: a replaced one makes the service start again
        self.node = node
        self.position = position
        self.lost_after = lost_after
        self.recreated = 0

    async def start(self, stop: asyncio.Event,
                    held: Callable[[], Awaitable[bool]] | None = None) -> topology.ConsumerSpec | None:
        """The consumer, from the first sequence after ``position()`` (any previous one is replaced); the bus
        failing (a cluster electing leaders) is retried with backoff until it answers or ``stop`` is set
        (then None): the kernel already holds the bootstrap, which a restart of the service would redo.
        ``held`` is asked before each attempt: False (another applier holds the node now, and the durable is
        its) returns None. A refusal because another applier of the node created the durable between this
        one's delete and create (``start sequence can not be updated``) is retried too, never a crash."""
        backoff = Backoff(initial=0.5, maximum=10.0)
        while not stop.is_set():
            if held is not None and not await held():
                return None
            try:
                return await topology.recreate_applier_consumer(self.js, self.node, self.position())
            except (*bus.INFRASTRUCTURE_ERRORS, topology.TopologyError) as exc:
                delay = backoff.next()
                log.warning("cannot create the plan consumer of %s yet (%s: %s); retrying in %.1fs", self.node,
                            type(exc).__name__, exc or "", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return None

    async def on_fetch_error(self, exc: BaseException, failing_for: float) -> bool:
        """Called by the consumer loop after a failed fetch; ``failing_for`` seconds since fetches began
        to fail; True when the consumer was recreated. Errors of the bus while checking or recreating are left
        to the next failed fetch."""
        try:
            # A wiped store takes the consumer with it: recreated after our position, it would start past the
            # new stream's end. Checked here, where the consumer failed, not on a timer (a fleet would poll).
            if self.guard is not None and await self.guard.check():
                return False
            await self.js.consumer_info(topology.PLAN_STREAM, topology.applier_durable(self.node))
            if failing_for < self.lost_after:
                return False
            why = f"fetching has failed for {failing_for:.0f}s ({type(exc).__name__})"
        except NotFoundError:
            why = "it is gone"
        except bus.INFRASTRUCTURE_ERRORS:
            if failing_for < self.lost_after:
                return False
            why = f"neither fetching nor its info has answered for {failing_for:.0f}s"
        after = self.position()
        log.warning("the plan consumer of %s is lost: %s; creating it again after plan-stream sequence %d",
                    self.node, why, after)
        try:
            await topology.recreate_applier_consumer(self.js, self.node, after)
        except (*bus.INFRASTRUCTURE_ERRORS, topology.TopologyError) as err:  # a cluster mid-election refuses too
            log.warning("cannot create the plan consumer of %s yet (%s: %s)", self.node, type(err).__name__, err)
            return False
        self.recreated += 1
        return True


async def wait_for_a_plan(js: JetStreamContext, stop: asyncio.Event, period: float = 1.0) -> bool:
    """After the plan stream was replaced (a wiped store): wait until the new stream holds a shared delta.
    Bootstrapping from an empty new stream would clear the node's kernel of every Service only to program
    them again once the planner has rebuilt; meanwhile the kernel keeps what the old plan gave it. False
    when told to stop first."""
    told = False
    while not stop.is_set():
        try:
            await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_ALL_SUBJECT)
            return True
        except NotFoundError:
            if not told:
                log.info("the new plan stream holds no delta yet; the kernel keeps the last plan meanwhile")
                told = True
        except bus.INFRASTRUCTURE_ERRORS as exc:
            log.warning("cannot read the new plan stream yet (%s: %s)", type(exc).__name__, exc or "")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)
    return False
