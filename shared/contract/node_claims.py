"""One applier per node: the claims bucket (JetStream key-value ``kipvs-appliers``), its records and keys.

Each applier puts its claim on its node's key when it starts (the newest one wins: a DaemonSet's new pod
takes over from the old one during a rollout), and reads the key back every few seconds; one that finds
another's claim stops applying (services/applier/node_claim.py). A superseded applier that keeps running
says so under ``<key>.superseded``, renewed, so that ``kipvs status`` can name it. Pure data and the
bucket's keys; docs/architecture.md ("One applier per node") describes it for operators.
"""

from __future__ import annotations

import msgspec

from . import topology

BUCKET = topology.APPLIER_CLAIMS_BUCKET  # declared by topology.ensure_claims_bucket
SUPERSEDED_FRESH_S = 90.0  # a superseded applier renews its record every 30 s; older: it is gone


class Claim(msgspec.Struct, frozen=True):
    """The value of a node's key: who applies the node (``instance``: pod name or host, pid and a random
    suffix), since when (ns, the claimant's clock), whom it took over from, how many takeovers the node has
    seen, and when the claimant's process started (``started_ns``, ns; 0 from a kipvs before it): of two
    appliers of one node the one started last is the newest, also when the older one's service restarts
    after a bus failure (both run on the node, so one clock orders them)."""

    node: str
    instance: str
    since_ns: int
    previous: str = ""
    takeovers: int = 0
    started_ns: int = 0


class Superseded(msgspec.Struct, frozen=True):
    """The value of ``<key>.superseded``: an applier that lost the node's claim and still runs, idle."""

    node: str
    instance: str
    by: str
    at_ns: int


_claim = msgspec.json.Decoder(Claim)
_superseded = msgspec.json.Decoder(Superseded)


def claim_key(node: str) -> str:
    """The node's key (:func:`topology.node_key`: one-to-one, valid KV key characters)."""
    return topology.node_key(node)


def superseded_key(node: str) -> str:
    return f"{claim_key(node)}.superseded"


def encode(record: Claim | Superseded) -> bytes:
    return msgspec.json.encode(record)


def decode_claim(data: bytes | None) -> Claim | None:
    """The claim, None for an empty or unreadable value (a deleted key, another version's record)."""
    try:
        return _claim.decode(data or b"")
    except msgspec.DecodeError:
        return None


def decode_superseded(data: bytes | None) -> Superseded | None:
    try:
        return _superseded.decode(data or b"")
    except msgspec.DecodeError:
        return None
