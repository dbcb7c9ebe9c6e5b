"""Who may publish and subscribe to what on the bus: the permission table per role, enforced by nats-server.

Pure data, no I/O: the server configuration (:mod:`shared.security.nats_credentials`) writes the static
roles' tables into ``accounts { KIPVS { users [...] } }``, and the auth callout (:mod:`services.auth`) puts
one node's applier table into the user JWT it issues. ``docs/architecture.md`` ("Security") shows the same
table for operators.

The JetStream API subjects are the ones nats-py 2.16 sends (``nats/js/manager.py``, ``nats/js/client.py``,
``nats/js/object_store.py``) for what each service calls; nats-server's subject names are in
``server/jetstream_api.go`` (``JSApiStreamInfoT``, ``JSApiConsumerCreateExT``, ``JSApiRequestNextT``,
``JSDirectMsgGetT``...). Every reader reads history with an ephemeral consumer, created as
``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``; a per-node applier uses one fixed reader name
(:func:`applier_reader`), so that its permissions can name every consumer it touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.contract import events, topology

# Messages a responder may send to one reply subject: the kernel view's reply to ``kipvs ipvs`` comes in up to
# this many parts when the table is over the server's max_payload (events.IpvsInspectPart).
RESPONSES_MAX = events.INSPECT_MAX_PARTS

ACCOUNT = "KIPVS"  # the one account every kipvs identity lives in (JetStream enabled)
JS = "$JS.API"

SNAPSHOT_STREAM = f"OBJ_{topology.SNAPSHOT_BUCKET}"

STATIC_ROLES = ("admin", "watcher", "planner", "tools", "auth")


@dataclass(frozen=True)
class Permissions:
    """nats-server's ``permissions`` block: subjects a client may publish and subscribe to, and whether it
    may answer requests (``allow_responses``: publish to a reply subject it received, up to
    :data:`RESPONSES_MAX` messages)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    inbox_prefix: str = field(default="")

    def server_config(self) -> dict[str, object]:
        """The block as nats-server's configuration has it (``publish { allow, deny }`` ...)."""
        publish: dict[str, object] = {"allow": list(self.publish)}
        if self.publish_deny:
            publish["deny"] = list(self.publish_deny)
        block: dict[str, object] = {"publish": publish, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            block["allow_responses"] = {"max": RESPONSES_MAX}
        return block

    def jwt_claims(self) -> dict[str, object]:
        """The same as the ``pub`` / ``sub`` / ``resp`` fields of a NATS user JWT (nats-io/jwt v2 ``Permissions``)."""
        pub: dict[str, object] = {"allow": list(self.publish)}
        if self.publish_deny:
            pub["deny"] = list(self.publish_deny)
        claims: dict[str, object] = {"pub": pub, "sub": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            claims["resp"] = {"max": RESPONSES_MAX, "ttl": 0}
        return claims


def inbox_prefix(identity: str) -> str:
    """The reply-subject prefix of one identity (nats-py ``inbox_prefix=``): replies to one client cannot
    be read by another, since each may subscribe only under its own prefix."""
    return f"_INBOX_{identity}"


def _stream_reader(stream: str, filters: tuple[str, ...] = (">",)) -> list[str]:
    """Read ``stream``: its info, single messages (direct and through the leader), and history through
    ephemeral pull consumers restricted (by the create subject) to ``filters``."""
    subjects = [f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.MSG.GET.{stream}", f"{JS}.DIRECT.GET.{stream}",
                f"{JS}.DIRECT.GET.{stream}.>", f"{JS}.CONSUMER.INFO.{stream}.*",
                f"{JS}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.FC.{stream}.>"]
    for flt in filters:
        subjects.append(f"{JS}.CONSUMER.CREATE.{stream}.*" if flt == ">" else f"{JS}.CONSUMER.CREATE.{stream}.*.{flt}")
    if filters == (">",):
        subjects.append(f"{JS}.CONSUMER.CREATE.{stream}.*.>")
    return subjects


def _durable(stream: str, name: str) -> list[str]:
    """Take from a durable consumer someone else declared: fetch, ack, look at its position."""
    return [f"{JS}.CONSUMER.INFO.{stream}.{name}", f"{JS}.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>"]


def _object_reader(stream: str = SNAPSHOT_STREAM) -> list[str]:
    # nats-py reads an object with an ordered push consumer (flow control replies on $JS.FC.<stream>.>),
    # finding its stream by subject first (STREAM.NAMES: the names only).
    # plan_log reads the snapshot's chunks with a pull consumer instead (bus.read_stream): its info and fetches.
    return [f"{JS}.STREAM.NAMES", f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.MSG.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}", f"{JS}.DIRECT.GET.{stream}.>", f"{JS}.CONSUMER.CREATE.{stream}",
            f"{JS}.CONSUMER.CREATE.{stream}.>", f"$JS.FC.{stream}.>", f"{JS}.CONSUMER.INFO.{stream}.*",
            f"{JS}.CONSUMER.MSG.NEXT.{stream}.*"]


# Pulling from a durable that is not one's own would delay its messages by its ack wait: denied where the
# durable's name is known in advance (the planner's); appliers' durables are protected by the appliers'
# own narrower rules (see applier()).
_OTHERS_DURABLES = (f"{JS}.CONSUMER.MSG.NEXT.{topology.KUBE_STREAM}.{topology.PLANNER_CONSUMER}",
                    f"{JS}.CONSUMER.CREATE.{topology.KUBE_STREAM}.{topology.PLANNER_CONSUMER}",
                    f"{JS}.CONSUMER.CREATE.{topology.KUBE_STREAM}.{topology.PLANNER_CONSUMER}.>",
                    f"{JS}.CONSUMER.DURABLE.CREATE.>")


def admin() -> Permissions:
    """Everything: declares streams and consumers (``kipvs topology apply``), repairs, deletes."""
    return Permissions(publish=(">",), subscribe=(">",), allow_responses=True, inbox_prefix=inbox_prefix("admin"))


def watcher() -> Permissions:
    """Appends Kubernetes changes to KIPVS_KUBE and reads them back (its state at start)."""
    return Permissions(
        publish=("kipvs.kube.>", topology.parked_subject("watcher"), *_stream_reader(topology.KUBE_STREAM)),
        publish_deny=_OTHERS_DURABLES,
        subscribe=(f"{inbox_prefix('watcher')}.>",),
        inbox_prefix=inbox_prefix("watcher"),
    )


def planner() -> Permissions:
    """Reads KIPVS_KUBE through its durable, reads and writes the plan, its snapshots and its lease."""
    lease = f"KV_{topology.PLANNER_LEASE_BUCKET}"
    return Permissions(
        publish=(
            "kipvs.plan.>", topology.parked_subject("planner"),
            *_durable(topology.KUBE_STREAM, topology.PLANNER_CONSUMER),
            *_stream_reader(topology.KUBE_STREAM), *_stream_reader(topology.PLAN_STREAM),
            f"$O.{topology.SNAPSHOT_BUCKET}.>", f"{JS}.STREAM.PURGE.{SNAPSHOT_STREAM}", *_object_reader(),
            # the lease: get/update/delete its key, and watch it (an ordered consumer nats-py looks at and
            # deletes when the watch ends)
            f"$KV.{topology.PLANNER_LEASE_BUCKET}.>", *_object_reader(lease),
            f"{JS}.CONSUMER.INFO.{lease}.*", f"{JS}.CONSUMER.DELETE.{lease}.*",
        ),
        publish_deny=(f"{JS}.CONSUMER.DURABLE.CREATE.>",),
        subscribe=(f"{inbox_prefix('planner')}.>",),
        inbox_prefix=inbox_prefix("planner"),
    )


def tools() -> Permissions:
    """Read-only audit (tap, history, why, replay, plan --at, status) and the kernel view's requests."""
    readable = (topology.KUBE_STREAM, topology.PLAN_AUDIT_STREAM, topology.STATUS_STREAM, topology.PARKED_STREAM)
    # KIPVS_PLAN itself: single messages only; history through its mirror, since any consumer-create right
    # on KIPVS_PLAN would let the holder rewrite a node's durable consumer by name.
    plan = topology.PLAN_STREAM
    claims = f"KV_{topology.APPLIER_CLAIMS_BUCKET}"  # kipvs status: who applies each node
    publish = [f"{JS}.INFO", f"{JS}.STREAM.NAMES", f"{JS}.STREAM.LIST", "kipvs.inspect.*.>", *_object_reader(),
               f"{JS}.STREAM.INFO.{claims}", f"{JS}.STREAM.MSG.GET.{claims}", f"{JS}.DIRECT.GET.{claims}",
               f"{JS}.DIRECT.GET.{claims}.>",
               f"{JS}.STREAM.INFO.{plan}", f"{JS}.STREAM.MSG.GET.{plan}", f"{JS}.DIRECT.GET.{plan}",
               f"{JS}.DIRECT.GET.{plan}.>"]
    for stream in readable:
        publish += _stream_reader(stream)
    return Permissions(publish=tuple(publish), publish_deny=_OTHERS_DURABLES,
                       subscribe=(f"{inbox_prefix('tools')}.>",), inbox_prefix=inbox_prefix("tools"))


def auth() -> Permissions:
    """The auth callout service: answers the server's authorization requests, nothing else (it declares
    nothing: each applier creates its own durable, see applier())."""
    return Permissions(
        publish=(),
        subscribe=("$SYS.REQ.USER.AUTH", f"{inbox_prefix('auth')}.>"),
        allow_responses=True,
        inbox_prefix=inbox_prefix("auth"),
    )


def applier_reader(node: str) -> str:
    """The one ephemeral consumer name a node's applier reads history with (``bus.read_stream``: the plan, and
    the snapshot object's chunks). ``reader-<node_key>``: never a durable's name (those begin ``applier-``),
    where ``applier-a-reader`` was both node ``a``'s reader and node ``a-reader``'s durable."""
    return f"reader-{topology.node_key(node)}"


def applier_durable(node: str) -> str:
    return str(topology.applier_consumer(node).config.durable_name)


def _own_object_reader(reader: str, stream: str = SNAPSHOT_STREAM) -> list[str]:
    """Read objects of the snapshot bucket through one consumer name (plan_log._read_object): the metadata
    by single-message gets, the chunks (``$O.<bucket>.C.<nuid>``) through ``reader`` only, since a right to
    create any consumer there let one node cost the servers 248 MiB with 5,000 durables (issue 21)."""
    chunks = f"$O.{topology.SNAPSHOT_BUCKET}.C.*"
    return [f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.MSG.GET.{stream}", f"{JS}.DIRECT.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}.>", f"{JS}.CONSUMER.CREATE.{stream}.{reader}.{chunks}",
            f"{JS}.CONSUMER.INFO.{stream}.{reader}", f"{JS}.CONSUMER.MSG.NEXT.{stream}.{reader}",
            f"{JS}.CONSUMER.DELETE.{stream}.{reader}"]


def _own_claim(node: str) -> list[str]:
    """Put and read its node's claim and its superseded record (shared/contract/node_claims.py); read any key."""
    bucket = topology.APPLIER_CLAIMS_BUCKET
    stream, key = f"KV_{bucket}", topology.node_key(node)
    return [f"$KV.{bucket}.{key}", f"$KV.{bucket}.{key}.superseded", f"{JS}.STREAM.INFO.{stream}",
            f"{JS}.STREAM.MSG.GET.{stream}", f"{JS}.DIRECT.GET.{stream}", f"{JS}.DIRECT.GET.{stream}.>"]


def applier(node: str) -> Permissions:
    """One node's applier: its own plan feed and consumer of the plan, the plan snapshot through its own
    reader, its claim, its own status subjects (the fixed kinds only) and parked subject, and answering the
    kernel view's requests for its node. Nothing of another node's, and no consumer of any other name."""
    durable, reader, plan = applier_durable(node), applier_reader(node), topology.PLAN_STREAM
    own_plan = (topology.PLAN_ALL_SUBJECT, topology.plan_node_subject(node))
    return Permissions(
        publish=(
            *(topology.status_subject(node, what) for what in topology.STATUS_KINDS),
            topology.parked_subject(durable),
            *_durable(plan, durable),
            # its own durable only, (re)created after its bootstrap from the first sequence it did not read
            # (topology.recreate_applier_consumer): delete, then create by its name through either subject
            f"{JS}.CONSUMER.DELETE.{plan}.{durable}", f"{JS}.CONSUMER.DURABLE.CREATE.{plan}.{durable}",
            f"{JS}.CONSUMER.CREATE.{plan}.{durable}",
            f"{JS}.STREAM.INFO.{plan}", f"{JS}.STREAM.MSG.GET.{plan}",
            *(f"{JS}.CONSUMER.CREATE.{plan}.{reader}.{s}" for s in own_plan),
            f"{JS}.CONSUMER.INFO.{plan}.{reader}", f"{JS}.CONSUMER.MSG.NEXT.{plan}.{reader}",
            f"{JS}.CONSUMER.DELETE.{plan}.{reader}",
            *_own_object_reader(reader), *_own_claim(node),
        ),
        # the plan feed (services/applier/plan_feed.py): its own node's subject and the shared one, nothing else
        subscribe=(f"{inbox_prefix(durable)}.>", f"kipvs.inspect.{topology.token(node)}.>",
                   *(topology.plan_feed_subject(s) for s in own_plan),
                   # its claim's key, to see a takeover without reading the key per batch (node_claim.py)
                   f"$KV.{topology.APPLIER_CLAIMS_BUCKET}.{topology.node_key(node)}"),
        allow_responses=True,
        inbox_prefix=inbox_prefix(durable),
    )


def static_role(role: str) -> Permissions:
    """The permissions of a static role by name; ValueError for an unknown one."""
    table = {"admin": admin, "watcher": watcher, "planner": planner, "tools": tools, "auth": auth}
    if role not in table:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(STATIC_ROLES)}")
    return table[role]()
