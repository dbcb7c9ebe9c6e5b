"""The event contract: the single source of truth for every record on the bus.

Every message kipvs publishes is an :class:`Envelope` holding exactly one record. Records are msgspec
Structs in one tagged union (the ``type`` field names the record); the envelope carries the schema
version, a stable event id, the time, the producer and the causation ids that tie a record to the
records that caused it (a plan delta points at the Kubernetes events it was computed from).

Compatibility rules (enforced by review, relied on by :func:`decode`):

* A new record type gets a new tag. Older consumers meet it as :class:`UnknownRecord` and park it.
* A new field gets a default. A field's type never changes. Removing or retyping a field, or changing
  the meaning of one, bumps :data:`SCHEMA_VERSION`; a consumer meeting a newer version parks the
  message rather than guess.

On the bus records are msgpack; :func:`to_json` / :func:`from_json` give the same envelope as JSON for
humans and files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1

KubeKind = Literal["Service", "EndpointSlice", "Node", "Pod", "FelixConfiguration"]
KUBE_KINDS: tuple[str, ...] = ("Service", "EndpointSlice", "Node", "Pod", "FelixConfiguration")

WatchAction = Literal["ADDED", "MODIFIED", "DELETED"]


class Record(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    """Base of every record. Subclasses set ``tag=``; the tag is the wire name of the record."""


# --- Kubernetes event log (stream KUBE), produced by the watcher ---------------------------------


class KubeEvent(Record, tag="kube.event"):
    """One change of one Kubernetes object, as the API server reported it.

    ``object`` is the object as served by the API, minus fields no consumer needs (managedFields and
    the last-applied annotation); everything an auditor needs (metadata, spec, status) is kept.

    ``origin`` says how the watcher learnt of the change: ``list`` (initial list or relist), ``watch``
    (a watch event), or ``resync`` (the object vanished while no watch was open; the watcher saw it
    missing from a relist and publishes its deletion with the last state it had logged).
    """

    kind: KubeKind
    action: WatchAction
    namespace: str  # "" for cluster-scoped kinds (Node, FelixConfiguration)
    name: str
    resource_version: str
    object: dict[str, Any]
    origin: Literal["list", "watch", "resync"] = "watch"


class KubeResync(Record, tag="kube.resync"):
    """The complete live set of one kind after a (re)list.

    A consumer deletes every object of ``kind`` it holds whose key is not in ``live`` and whose held
    version is not newer than ``resource_version`` (newer: logged by a watch after the list); it may also
    use the resourceVersions to detect that it holds stale state. ``restored`` changes that rule (below).
    Keys are ``namespace/name`` (``name`` alone for cluster-scoped kinds).
    """

    kind: KubeKind
    resource_version: str  # the list's collection resourceVersion
    live: dict[str, str]  # key -> object resourceVersion
    # Added in schema 1 with defaults (older records: a resync in a history that only grows).
    # restored: the watcher found the API server's resourceVersions gone back (etcd restored from a snapshot
    # without a revision bump), so versions no longer order old and new: a consumer deletes every object of
    # ``kind`` it holds that ``live`` lacks and whose record it took from the KUBE stream at or below
    # ``listed_after_seq`` (the stream's last sequence when the list was requested), whatever the versions.
    restored: bool = False
    listed_after_seq: int = 0


class KubeResyncRange(Record, tag="kube.resync-range"):
    """What a :class:`KubeResync` says, for the keys from ``key_from`` (inclusive) to ``key_to``
    (exclusive; "" = no upper bound) only: the watcher publishes a list's live set in such parts when the
    whole set would not fit in one message. Each part stands alone: a consumer deletes what it holds of
    ``kind`` with a key in the range that ``live`` lacks, under the same version and ``restored`` rules as
    KubeResync. The parts of one list cover every key. A new tag, so that a consumer that does not know it
    parks it rather than take a part of the live set for all of it."""

    kind: KubeKind
    resource_version: str
    live: dict[str, str]
    key_from: str
    key_to: str
    restored: bool = False
    listed_after_seq: int = 0


# --- The plan (stream PLAN), produced by the planner ------------------------------------------------
#
# The planner publishes *shared* state once, on kipvs.plan.all: Services (with every endpoint's node and
# zone) and node facts. Each node's kernel state is a pure function of that shared state and the node's
# own name (shared.plan.resolve), computed by the applier on the node and by `kipvs plan --node`.

Protocol = Literal["TCP", "UDP", "SCTP"]

# The plan structs below are gc=False: they hold only strings, numbers and tuples of other such structs,
# so they cannot form reference cycles, and a planner holding 100k endpoints must not make the cyclic
# garbage collector scan them all again and again.


class Endpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One backend of one Service port, with the facts per-node resolution needs."""

    ip: str
    port: int
    node: str = ""
    zone: str = ""
    hints: tuple[str, ...] = ()  # zones this endpoint is hinted for (topology-aware routing)
    # nodes this endpoint is hinted for (hints.forNodes: trafficDistribution PreferSameNode); added in
    # schema 1 with a default, so older records read as "no node hints"
    node_hints: tuple[str, ...] = ()
    ready: bool = True
    serving: bool = True
    terminating: bool = False


class PortPlan(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One Service port and its endpoints (matched by port name and protocol, merged over slices)."""

    name: str = ""
    protocol: Protocol = "TCP"
    port: int
    node_port: int = 0
    endpoints: tuple[Endpoint, ...] = ()


class ServicePlan(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Everything about one Service that any node needs to program it."""

    key: str  # namespace/name
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status ingress IPs, minus ipMode Proxy
    load_balancer_source_ranges: tuple[str, ...] = ()
    scheduler: str = "rr"
    persistence_timeout: int = 0  # seconds of ClientIP affinity; 0: none
    external_policy_local: bool = False
    internal_policy_local: bool = False
    ports: tuple[PortPlan, ...] = ()
    # spec.healthCheckNodePort (a LoadBalancer with externalTrafficPolicy Local): every node keeps it in
    # KUBE-HEALTH-CHECK-NODE-PORT and lets it through the VIP port filter, as kube-proxy does. 0: none.
    health_check_node_port: int = 0


class NodeFacts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """What per-node resolution needs to know about a node, from its Node object."""

    name: str
    zone: str = ""
    addresses: tuple[str, ...] = ()  # InternalIP addresses, every family
    # kube-proxy's node IPs (pkg/util/node GetNodeHostIPs): at most one per family, the primary first; per
    # family the first InternalIP, else the first ExternalIP. Empty from a planner before it: take the
    # first address of the family instead.
    host_ips: tuple[str, ...] = ()


class PlanWarning(msgspec.Struct, frozen=True, kw_only=True):
    """Something in the cluster kipvs could not honour; it names the object. Cleared when fixed."""

    id: str  # stable: kind/namespace/name[/code]
    code: str  # e.g. invalid-service, invalid-endpointslice, invalid-scheduler
    kind: str
    object: str  # namespace/name (name for cluster-scoped)
    message: str


class SetService(msgspec.Struct, tag="set-service", tag_field="op", frozen=True):
    service: ServicePlan


class RemoveService(msgspec.Struct, tag="remove-service", tag_field="op", frozen=True):
    key: str


class SetNode(msgspec.Struct, tag="set-node", tag_field="op", frozen=True):
    node: NodeFacts


class RemoveNode(msgspec.Struct, tag="remove-node", tag_field="op", frozen=True):
    name: str


class SetWarning(msgspec.Struct, tag="set-warning", tag_field="op", frozen=True):
    warning: PlanWarning


class ClearWarning(msgspec.Struct, tag="clear-warning", tag_field="op", frozen=True):
    id: str


class MarkLayoutRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Felix's split of the node's iptablesMarkMask (wireguard is 0 when WireGuard is off)."""

    accept: int
    pass_: int = msgspec.field(name="pass")
    drop: int
    scratch0: int
    scratch1: int
    wireguard: int
    endpoint_mask: int
    non_calico: int


class SetNodeCalico(msgspec.Struct, tag="set-node-calico", tag_field="op", frozen=True):
    """The whole Calico IPVS-mode state of one node (its subject only): a pod change on a node is one
    message to that node, and the node's state is replaced, never merged."""

    node: str
    layout: MarkLayoutRecord
    nodeport_ranges: tuple[tuple[int, int], ...]
    endpoint_marks: dict[str, int]  # interface name -> mark
    unmarked: tuple[str, ...] = ()  # endpoints left without a mark: the positions ran out
    warnings: tuple[PlanWarning, ...] = ()  # node-specific: exhaustion, nodeport-outside-ranges, bad config
    # A calico-node pod (label k8s-app=calico-node) runs on the node according to the log: Felix writes
    # its own marking rules there, so ``--endpoint-marks auto`` only observes.
    calico_node: bool = False
    # The node's effective FelixConfiguration has bpfEnabled: Calico's eBPF dataplane replaces kube-proxy
    # and has no IPVS support; kipvs writes no marking rules there.
    bpf_enabled: bool = False


PlanOp = SetService | RemoveService | SetNode | RemoveNode | SetWarning | ClearWarning | SetNodeCalico


class PlanDelta(Record, tag="plan.delta", omit_defaults=True):
    """The operations one input event caused on one plan subject.

    ``seq`` counts deltas on the subject (1, 2, 3, ...): a consumer that sees a jump has missed one and
    must re-bootstrap from a snapshot. ``source_seq`` is the KIPVS_KUBE stream sequence of the input event;
    the envelope's causation holds its id.

    ``trigger_time_ns``: the earliest ``endpoints.kubernetes.io/last-change-trigger-time`` of the
    EndpointSlice changes folded into the delta (Unix nanoseconds), as kube-proxy takes it for
    ``network_programming_duration_seconds``; 0 when none carried the annotation (then the envelope's
    time, the Kubernetes change's record time, is the start). Added in schema 1 with a default (omitted
    when 0): older records read as "no trigger time".
    """

    scope: str  # "all", or a node name for node-specific state
    seq: int
    source_seq: int
    ops: tuple[PlanOp, ...]
    trigger_time_ns: int = 0


class PlanDeltaChunk(Record, tag="plan.delta-chunk"):
    """One part of a :class:`PlanDelta` too large for one NATS message (added in schema 1: an older consumer
    meets it as an unknown record and parks it, then sees a sequence gap and re-bootstraps from a snapshot).

    The delta's whole envelope is encoded (msgpack, exactly the bytes it would have on the bus) and cut into
    ``parts`` consecutive slices (``part`` 1..``parts``) published in order on the delta's own subject, each
    in an envelope of its own (id ``<delta id>/part/<part>-of-<parts>``, so every part is de-duplicated by
    the server on its own). ``digest`` is the SHA-256 (hex) of the whole envelope's bytes. A consumer
    concatenates the parts of one ``(scope, seq, digest)`` and applies the delta only when the last part has
    arrived and the digest matches: never half of it. A part missing or out of order, or a digest that does
    not match, is a gap: re-bootstrap from a snapshot (``shared/contract/delta_chunks.py``)."""

    scope: str
    seq: int  # the delta's seq: every part of one delta carries it
    part: int  # 1..parts
    parts: int
    digest: str
    data: bytes


class PlanSnapshot(Record, tag="plan.snapshot"):
    """The whole shared plan after delta ``seq`` (published to the snapshot store, not the stream):
    a new or lagging applier loads it, then applies deltas from ``seq + 1``."""

    scope: str
    seq: int
    source_seq: int
    plan_stream_seq: int  # KIPVS_PLAN stream sequence of delta ``seq``: consume from the next one
    services: tuple[ServicePlan, ...]
    nodes: tuple[NodeFacts, ...]
    warnings: tuple[PlanWarning, ...]


# --- Applier status (stream STATUS), produced by each node's applier ---------------------------------


# Lines a status report lists at most (errors, drift findings): KIPVS_STATUS refuses a message over
# topology.STATUS_MAX_MSG (256 KiB), and a drift check after a flushed table at 10,000 Services finds
# 100,000 objects. 500 lines of about 60 bytes stay far below the bound; the count of the rest is kept.
REPORT_MAX_LINES = 500


def summarised(lines: Sequence[str], limit: int = REPORT_MAX_LINES) -> tuple[str, ...]:
    """``lines`` as a report holds them: the first ``limit - 1`` and ``"... and N more"`` when there are
    more than ``limit``, each line cut to 512 characters."""
    shown = [line[:512] for line in (lines if len(lines) <= limit else lines[:limit - 1])]
    if len(lines) > limit:
        shown.append(f"... and {len(lines) - (limit - 1)} more")
    return tuple(shown)


class ApplyReport(Record, tag="apply.report"):
    """What one node applied for one batch of plan deltas.

    ``desired_digest`` is a hash of the node's whole desired state after the batch; a drift check
    publishes the digest of what it read back, so an auditor can tell a node is exactly in sync.
    ``bootstrap``: the report a starting applier publishes once it has programmed the whole plan (its
    time after a change is the node's start-up wait, not programming latency: ``kipvs why`` says so).
    """

    node: str
    plan_seq: int  # the last shared delta applied
    operations: int
    duration_ms: float
    errors: tuple[str, ...] = ()
    desired_digest: str = ""
    bootstrap: bool = False


class DriftReport(Record, tag="apply.drift"):
    """A read-back of the kernel: what differed from the plan and what was done about it."""

    node: str
    plan_seq: int
    found: tuple[str, ...]  # the repairs, one per kernel object ("add service TCP 10.96.0.10:80", ...)
    repaired: bool
    desired_digest: str
    observed_digest: str  # after the repair


class NodeFactsReport(Record, tag="apply.node-facts"):
    """What a node's kernel and neighbours look like to its applier, published at start and whenever it
    changes (link changes are watched live over netlink; no restart needed, unlike Felix).

    ``kube_ipvs0`` is ``absent``, ``kipvs`` (created by kipvs: its alias says so) or ``other`` (created
    by someone else, normally kube-proxy). ``conflicts`` name every sign of another IPVS-mode proxy on the
    node, each a sentence an operator can act on; empty when kipvs is alone. ``taken_over`` is when kipvs
    took the node over from kube-proxy in place (``kipvs applier --adopt``; UTC, ISO 8601, read from
    kube-ipvs0's alias, so it outlives applier restarts), empty if it never did or handed it back.
    """

    node: str
    ipvs_available: bool
    kube_ipvs0: Literal["absent", "kipvs", "other"]
    endpoint_marks: Literal["enforce", "observe", "off"]  # the mode in effect (``--endpoint-marks`` resolved)
    endpoint_marks_reason: str  # why that mode
    conflicts: tuple[str, ...] = ()
    taken_over: str = ""


class ShadowReport(Record, tag="apply.shadow"):
    """A shadow-mode applier's comparison of the node's kernel (written by kube-proxy) with kipvs's plan
    for the node, published on ``kipvs.status.<node>.shadow`` when the divergences change and at least
    every few minutes. ``divergences`` is one precise line per difference (empty: the kernel is what kipvs
    would program), at most :data:`REPORT_MAX_LINES` of them (:func:`summarised`), and
    ``divergence_count`` how many there are in all (0 from an applier before it: count the lines);
    ``plan_seq`` is the shared delta compared against."""

    node: str
    plan_seq: int
    divergences: tuple[str, ...] = ()
    virtual_servers: int = 0  # IPVS virtual servers read from the kernel
    divergence_count: int = 0

    @property
    def divergences_total(self) -> int:
        return self.divergence_count or len(self.divergences)


AnyRecord = (KubeEvent | KubeResync | KubeResyncRange | PlanDelta | PlanDeltaChunk | PlanSnapshot | ApplyReport
             | DriftReport | NodeFactsReport | ShadowReport)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What travels on the bus: one record plus its provenance."""

    v: int = SCHEMA_VERSION
    id: str  # stable, deterministic per logical event: doubles as the Nats-Msg-Id
    time_ns: int  # when the producer observed or computed it (Unix epoch, nanoseconds)
    producer: str  # "watcher/<host>", "planner", "applier/<node>", ...
    causation: tuple[str, ...] = ()  # ids of the envelopes this one was computed from
    record: AnyRecord


class _EnvelopeHead(msgspec.Struct, kw_only=True):
    """The envelope with the record left undecoded: readable whatever the record is."""

    v: int
    id: str = ""
    record: msgspec.Raw


class _RecordTag(msgspec.Struct):
    type: str = ""


class ContractError(Exception):
    """A message that cannot be taken as a record of this contract. ``reason`` goes to the parking lot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownRecord(ContractError):
    """A record type this build does not know (a newer producer): park, do not guess."""


class NewerSchema(ContractError):
    """A schema version newer than this build understands."""


class MalformedMessage(ContractError):
    """Not an envelope at all, or a known record that fails validation."""


_KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in AnyRecord.__args__)
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_head_decoder = msgspec.msgpack.Decoder(_EnvelopeHead)
_head_json_decoder = msgspec.json.Decoder(_EnvelopeHead)
_tag_decoder = msgspec.msgpack.Decoder(_RecordTag)
_tag_json_decoder = msgspec.json.Decoder(_RecordTag)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_envelope_json_decoder = msgspec.json.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    """The bus form (msgpack)."""
    return _msgpack_encoder.encode(envelope)


def to_json(envelope: Envelope) -> bytes:
    """The human and file form (JSON, one object)."""
    return _json_encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    """Decode a bus message, raising a :class:`ContractError` subclass that says why it is unusable."""
    return _decode_bounded(data, _head_decoder, _tag_decoder, _envelope_decoder)


def from_json(data: bytes | str) -> Envelope:
    """Decode the JSON form, with the same checks as :func:`decode`."""
    return _decode_bounded(data, _head_json_decoder, _tag_json_decoder, _envelope_json_decoder)


def _decode_bounded(data: bytes | str, head_decoder: Any, tag_decoder: Any, full_decoder: Any) -> Envelope:
    try:
        return _decode(data, head_decoder, tag_decoder, full_decoder)
    except RecursionError:  # msgspec decodes (and skips) nested values recursively: a message nested past
        # the recursion limit (an object logged by a watcher without a depth bound) is unusable, not a crash
        raise MalformedMessage("message nests too deep to decode") from None


def _decode(data: bytes | str, head_decoder: Any, tag_decoder: Any, full_decoder: Any) -> Envelope:
    if not data:
        raise MalformedMessage("empty message: not a kipvs envelope")
    try:
        head = head_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a kipvs envelope: {exc}") from None
    if head.v > SCHEMA_VERSION:
        raise NewerSchema(
            f"envelope {head.id or '?'} has schema version {head.v}; this build understands up to "
            f"{SCHEMA_VERSION}: upgrade this consumer"
        )
    try:
        tag = tag_decoder.decode(head.record).type
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"envelope {head.id or '?'}: record is not an object: {exc}") from None
    if tag not in _KNOWN_TAGS:
        raise UnknownRecord(
            f"envelope {head.id or '?'}: unknown record type {tag!r} (known: {', '.join(sorted(_KNOWN_TAGS))})"
        )
    try:
        return full_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"envelope {head.id or '?'}: invalid {tag} record: {exc}") from None


# --- Kernel inspection (core NATS request/reply on kipvs.inspect.<node>.ipvs) ---------------------------
# Not records of the log: a request and its reply, never stored. Each carries its own version ``v``; a
# side that meets a newer version than it knows answers or reports so instead of guessing.

INSPECT_VERSION = 1


class IpvsStats(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """IPVS counters of a virtual or real server, as the kernel keeps them (IPVS_STATS_ATTR_*, 64-bit):
    totals since creation (connections, packets, bytes) and the kernel's estimated rates per second."""

    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0
    cps: int = 0
    inpps: int = 0
    outpps: int = 0
    inbps: int = 0
    outbps: int = 0


class KernelRealServer(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    address: str
    port: int
    forward: Literal["Masq", "Local", "Tunnel", "Route"] = "Masq"  # ipvsadm's names of the forwarding method
    weight: int = 1
    active_conns: int = 0
    inactive_conns: int = 0
    stats: IpvsStats = IpvsStats()


class KernelVirtualServer(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One IPVS virtual server as read from the kernel: by address (``protocol`` TCP/UDP/SCTP, ``address``,
    ``port``) or by firewall mark (``fwmark`` non-zero, ``protocol`` and ``address`` empty)."""

    family: Literal[4, 6] = 4
    protocol: str = ""
    address: str = ""
    port: int = 0
    fwmark: int = 0
    scheduler: str = ""
    persistence_timeout: int = 0  # seconds; 0: not persistent
    netmask: str = ""  # persistence granularity as ipvsadm prints it ("255.255.255.255", or "128" for IPv6)
    one_packet: bool = False  # IP_VS_SVC_F_ONEPACKET
    stats: IpvsStats = IpvsStats()
    real_servers: tuple[KernelRealServer, ...] = ()
    # IP_VS_SVC_F_SCHED1-3 as ipvsadm names them ("mh-port", "sh-fallback", "flag-1"); added with a default
    sched_flags: tuple[str, ...] = ()


class KernelTable(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What a node's kernel holds of what kipvs and kube-proxy program: IPVS (with counters), the addresses
    on kube-ipvs0 (``link`` False: there is no such link) and the KUBE-* ipsets that exist (name -> sorted
    entries in kube-proxy's syntax; an absent set is not a key)."""

    ipvs_version: str = ""  # the kernel's IPVS version, as ipvsadm's header prints it ("1.2.1")
    conn_table_size: int = 0
    virtual_servers: tuple[KernelVirtualServer, ...] = ()
    link: bool = False
    addresses: tuple[str, ...] = ()
    ipsets: dict[str, tuple[str, ...]] = {}


class IpvsInspectRequest(msgspec.Struct, frozen=True, kw_only=True):
    v: int = INSPECT_VERSION
    # The asker takes a reply in parts (:class:`IpvsInspectPart`): an applier whose reply is over the server's
    # max_payload sends it so. Added with a default: an older applier ignores it and answers in one message
    # (or says the table does not fit), and an older tool is answered in one message as before.
    parts: bool = False


# The header that marks a message of a reply in parts: "<part>/<parts>" (a whole reply has none).
INSPECT_PART_HEADER = "Kipvs-Inspect-Part"
INSPECT_MAX_PARTS = 1024  # a reply of more parts is refused by the asker: every read has a bound


class IpvsInspectPart(msgspec.Struct, frozen=True, kw_only=True):
    """One slice of an :class:`IpvsInspectReply` too large for one NATS message (a 10,000-Service table is
    several MB): the whole reply's msgpack bytes cut into ``parts`` consecutive slices, sent in order to the
    asker's inbox; ``digest`` is the SHA-256 (hex) of the whole. The asker decodes the reply only when every
    part has come and the digest matches."""

    v: int = INSPECT_VERSION
    part: int  # 1..parts
    parts: int
    digest: str
    data: bytes


class IpvsInspectReply(msgspec.Struct, frozen=True, kw_only=True):
    """An applier's answer: its kernel's table, or ``error`` saying why it could not read it.
    ``plan_seq`` is the shared delta the applier holds (0 in shadow mode before its first comparison),
    ``node_addresses`` the NodePort addresses it uses when they are its interfaces' (empty: the Node's)."""

    v: int = INSPECT_VERSION
    node: str
    backend: str  # the kernel backend's label ("netlink (this host's kernel)", "memory (simulated ...)")
    mode: Literal["apply", "shadow"] = "apply"
    time_ns: int = 0
    plan_seq: int = 0
    node_addresses: tuple[str, ...] = ()
    table: KernelTable | None = None
    error: str = ""
    # The applier's --ipvs-exclude-cidrs (CIDR strings): another program's ranges, which it never programs;
    # ``kipvs ipvs --diff`` leaves them out. Added with a default: an older applier sends none.
    exclude_cidrs: tuple[str, ...] = ()


def object_key(namespace: str, name: str) -> str:
    """The key of a Kubernetes object in records: ``namespace/name``, or ``name`` when cluster-scoped."""
    return f"{namespace}/{name}" if namespace else name
