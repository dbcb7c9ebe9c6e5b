"""The node's last plan on local disk, so a rebooted node programs its Services before it can reach NATS.

Without kube-proxy, kipvs itself programs the ClusterIPs through which the node finds DNS and, usually,
NATS. A node that reboots starts with an empty IPVS table and could wait forever for a NATS it reaches
only through that table. With ``--plan-cache FILE`` the applier writes the shared plan it holds and its
node's Calico state (msgpack, atomically, at most once a second while they change). At start, before
connecting to NATS, it programs the kernel from that file; the bootstrap from NATS then corrects whatever
changed meanwhile. The cache is a convenience, never the truth: the log is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec

from shared.contract import events
from shared.plan.plan_state import SharedPlan

from .exclude import ExcludeCIDRs
from .kernel.backend import Backend
from .kernel.rules import NftRules
from .marks import EndpointMarkRules, Flag
from .ops import DesiredState, diff

log = logging.getLogger("kipvs.applier")


class PlanCache(msgspec.Struct, frozen=True, kw_only=True):
    """What the file holds. Versioned with the event contract (its records are the bus's)."""

    v: int = events.SCHEMA_VERSION
    node: str
    written_ns: int
    snapshot: events.PlanSnapshot
    calico: events.SetNodeCalico | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PlanCache)


def encode(node: str, plan: SharedPlan, calico: events.SetNodeCalico | None,
           memo: dict[str, tuple[events.ServicePlan, msgspec.Raw]] | None = None) -> bytes:
    """The cache file's bytes (msgpack ``PlanCache``). With ``memo`` (Service key -> (plan, its encoding)),
    a Service whose plan is the same object as at the last call is not encoded again (plans are frozen:
    a changed Service is a new object): under churn at 10,000 Services the write costs 3 ms instead of 10
    on the host. ``memo`` is updated in place, and loses the Services the plan no longer holds."""
    keys = sorted(plan.services)
    services: tuple[events.ServicePlan, ...] | tuple[msgspec.Raw, ...]
    if memo is None:
        services = tuple(plan.services[k] for k in keys)
    else:
        services = tuple(_encoded(memo, plan.services[k]) for k in keys)
        if len(memo) > len(keys):
            for gone in memo.keys() - plan.services.keys():
                del memo[gone]
    snapshot = events.PlanSnapshot(scope="all", seq=plan.seq, source_seq=0, plan_stream_seq=0,
                                   services=services,  # type: ignore[arg-type]  # Raw: encoded already
                                   nodes=tuple(plan.nodes[k] for k in sorted(plan.nodes)),
                                   warnings=tuple(plan.warnings[k] for k in sorted(plan.warnings)))
    return _encoder.encode(PlanCache(node=node, written_ns=time.time_ns(), snapshot=snapshot, calico=calico))


def _encoded(memo: dict[str, tuple[events.ServicePlan, msgspec.Raw]], service: events.ServicePlan) -> msgspec.Raw:
    held = memo.get(service.key)
    if held is None or held[0] is not service:
        held = memo[service.key] = (service, msgspec.Raw(_encoder.encode(service)))
    return held[1]


def write(path: Path, data: bytes) -> None:
    """Atomically: a crash mid-write leaves the previous cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path, node: str) -> PlanCache | None:
    """The cache, or None (absent; unreadable, for another node or a newer schema: said in the log)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("plan cache %s unreadable (%s): starting without it", path, exc.strerror)
        return None
    try:
        cache = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("plan cache %s is not a kipvs plan cache (%s): starting without it", path, exc)
        return None
    if cache.v > events.SCHEMA_VERSION or cache.node != node:
        log.warning("plan cache %s is for node %r, schema %d: starting without it", path, cache.node, cache.v)
        return None
    return cache


async def restore(path: Path, node: str, kernel: Backend, exclude: ExcludeCIDRs | None = None,
                  rules: NftRules | None = None, endpoint_marks: Flag = "auto") -> int:
    """Program the kernel from the cache (read back, diff, write), never in ``exclude``'s ranges
    (--ipvs-exclude-cidrs), and install kipvs's nftables table from it (``rules``; with the cached Calico
    state's endpoint marks as ``endpoint_marks`` decides), as the bootstrap does: after a reboot the table
    is gone with the rest, and without it nothing is masqueraded nor filtered by loadBalancerSourceRanges
    until NATS is back. The table is replaced in one transaction (``nft -f``), so an applier restart's
    established connections keep their NAT. Returns the Services restored. KernelError from a write."""
    cache = await asyncio.to_thread(read, path, node)
    if cache is None:
        return 0
    plan = SharedPlan.from_snapshot(cache.snapshot)
    exclude = exclude or ExcludeCIDRs()
    desired = DesiredState.of(plan.services, plan.nodes.get(node), exclude.contribution)
    await kernel.setup()
    observed = exclude.hide(await kernel.observe())
    ops = diff(desired.state(), observed.state, observed.owned)
    if ops:
        await kernel.apply(ops)
    if rules is not None:
        marks = EndpointMarkRules(endpoint_marks, rules, _nothing_to_publish)
        marks.bootstrap(cache.calico)
        rules.marks = marks.marks(cache.calico)
        await rules.install(desired.state().ipsets)
    age = (time.time_ns() - cache.written_ns) / 1e9
    log.info("restored %d Services from the plan cache (plan delta %d, %.0f s old; %d kernel writes) before "
             "reaching NATS", len(plan.services), plan.seq, age, len(ops))
    return len(plan.services)


async def _nothing_to_publish() -> None:
    """Before NATS there is nobody to tell of the endpoint-mark mode; the bootstrap publishes it."""


class CacheWriter:
    """Writes the cache when the plan changed, at most once per ``every`` seconds."""

    def __init__(self, path: Path, node: str, every: float = 1.0) -> None:
        self.path, self.node, self.every = path, node, every
        self.written: tuple[int, int] = (-1, -1)
        self.encoded: dict[str, tuple[events.ServicePlan, msgspec.Raw]] = {}  # encode()'s memo

    async def maybe_write(self, plan: SharedPlan, calico: events.SetNodeCalico | None, calico_seq: int) -> None:
        version = (plan.seq, calico_seq)  # taken with the data: the plan moves on while the file is written
        if version == self.written:
            return
        data = encode(self.node, plan, calico, self.encoded)
        await asyncio.to_thread(write, self.path, data)
        self.written = version
