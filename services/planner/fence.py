"""The fence that keeps a deposed planner's deltas out of the plan stream.

A planner that takes the lease first publishes a marker on ``kipvs.plan.leader`` (in the plan stream). It
then publishes its deltas as atomic batches (see ``PlanPublisher``) whose first message carries
``Nats-Expected-Last-Subject-Sequence: <its marker's sequence>`` with
``Nats-Expected-Last-Subject-Sequence-Subject: kipvs.plan.leader``: the server stores a batch only while
that marker is still the subject's last message, and a batch is stored whole or not at all. Once a newer
planner's marker is stored, nothing the older one sends lands, however long it was paused and however much
it had prepared.

The marker itself is published expecting the subject's last sequence as read just before, and that read
comes before the lease check: a planner paused between the check and the publish finds the subject moved
on and is refused too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared.contract import topology
from shared.messaging import bus

log = logging.getLogger("kipvs.planner.fence")

EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
PUBLISHER = "Kipvs-Planner"  # header naming the planner that published a message (for operators and audits)


class Deposed(Exception):
    """Another planner's marker is the fence now (or the lease was lost before ours was stored)."""


@dataclass(frozen=True)
class Fence:
    """This planner's marker: its stream sequence guards every delta it publishes."""

    identity: str
    marker_seq: int

    def headers(self) -> dict[str, str]:
        return {EXPECTED_SUBJECT_SEQ: str(self.marker_seq), EXPECTED_SUBJECT: topology.PLAN_LEADER_SUBJECT,
                PUBLISHER: self.identity}


# A clustered stream refuses a message with an expected subject sequence while another one for the same
# subject is being committed (it cannot know the outcome yet): a race to be retried, not a verdict.
IN_FLIGHT = 10164


def is_fenced(exc: BaseException) -> bool:
    """The server refused a publish because its expected last (subject) sequence no longer holds."""
    return isinstance(exc, APIError) and bus.is_wrong_last_sequence(exc)


def is_raced(exc: BaseException) -> bool:
    return isinstance(exc, APIError) and getattr(exc, "err_code", None) == IN_FLIGHT


async def raise_fence(js: JetStreamContext, identity: str, lease_revision: int,
                      still_leader: Callable[[], bool], attempts: int = 5) -> Fence:
    """Publish this planner's marker; returns its fence. Raises :class:`Deposed` when the lease is no
    longer held before the marker is stored (or other markers keep landing first)."""
    for _ in range(attempts):
        try:
            last = (await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_LEADER_SUBJECT)).seq or 0
        except NotFoundError:
            last = 0
        if not still_leader():  # after the read: a pause between here and the publish is caught by `last`
            raise Deposed("the lease was lost before the fence was raised")
        body = json.dumps({"holderIdentity": identity, "leaseRevision": lease_revision,
                           "time": datetime.now(UTC).isoformat()}).encode()
        try:
            ack = await js.publish(topology.PLAN_LEADER_SUBJECT, body,
                                   headers={EXPECTED_SUBJECT_SEQ: str(last), PUBLISHER: identity})
        except APIError as exc:
            if is_fenced(exc) or is_raced(exc):
                log.info("another planner's marker landed first (after sequence %d); reading it again", last)
                continue
            raise
        return Fence(identity, ack.seq)
    raise Deposed(f"other planners' markers kept landing first ({attempts} attempts)")
