"""Shadow mode (``kipvs applier --shadow``): program nothing, compare kube-proxy's kernel with kipvs's plan.

For migrations: on a node where kube-proxy still runs in IPVS mode, the applier reads the kernel every
``--shadow-sync-period`` seconds (kube-proxy's ``--ipvs-sync-period`` default, 30 s) — IPVS, the addresses
on kube-ipvs0 and the KUBE-* ipsets, which kube-proxy and kipvs name alike — and compares it with the
published plan resolved for this node (``plan_log.published_plan`` + ``resolve_node``: what ``kipvs plan
--node`` prints and a kipvs applier would program). Every divergence is one line (``shared/plan/
divergence.py`` says what is not one; nor is anything in the node's ``--ipvs-exclude-cidrs``, which a kipvs
applier would leave to the other program there), and goes to:

- a ``ShadowReport`` on ``kipvs.status.<node>.shadow`` when the list changes, and at least every
  ``HEARTBEAT_S`` so ``kipvs status`` can tell a silent node from a quiet one;
- the gauge ``kipvs_shadow_divergences``;
- the log (each new divergence once, at warning level).

Nothing is written to the kernel: no IPVS, no ipsets, no nftables, no addresses, no sysctls, no
health-check node ports (kube-proxy holds those ports). ``kipvs ipvs --node`` is answered as usual, showing
kube-proxy's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import msgspec
from pyroute2.netlink.exceptions import NetlinkError

from shared.contract import events, topology
from shared.messaging import bus, plan_log
from shared.plan.divergence import RealLines, divergences
from shared.plan.node_state import NodeState
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_service
from shared.security.nats_permissions import applier_reader
from shared.service import runtime

from . import exclude, inspect, nodeport_addresses
from .drift_slices import SERVICES_PER_CHECK, Checked, DriftSlices
from .kernel.backend import Backend
from .ops import DesiredState

log = logging.getLogger("kipvs.applier")

HEARTBEAT_S = 300.0
METRIC = "kipvs_shadow_divergences"


class Shadow:
    def __init__(self, ctx: runtime.ServiceContext, node: str, kernel: Backend, interface_addresses: bool = False,
                 heartbeat: float = HEARTBEAT_S, per_check: int = SERVICES_PER_CHECK) -> None:
        self.ctx = ctx
        self.node = node
        self.kernel = kernel
        self.use_interfaces = interface_addresses
        self.nodeport_cidrs: tuple[str, ...] = ()  # --nodeport-cidrs
        self.exclude_cidrs: tuple[str, ...] = ()  # --ipvs-exclude-cidrs: another program's, not compared
        self.heartbeat = heartbeat
        self.lock = asyncio.Lock()  # one kernel read at a time (the comparison and inspections share sockets)
        self.slices = DriftSlices(per_check)  # whose real servers each comparison reads
        self.compared_services = 0  # virtual services planned at the last comparison (0: read them all)
        self.real_lines: RealLines = {}  # each service's real-server divergences at its last read
        self.plan_seq = 0
        self.reader = bus.LogReader(topology.PLAN_STREAM, applier_reader(node))  # its one reader name
        self.plan: SharedPlan | None = None  # the published plan as last followed (None: read the snapshot)
        self.stream_seq = 0  # the plan-stream sequence it was followed up to
        self.desired: DesiredState | None = None  # this node's state from it, kept per Service
        self.facts: events.NodeFacts | None = None  # the facts it was resolved with
        self.identity: topology.StreamIdentity | None = None  # the plan stream it follows
        self.divergences: tuple[str, ...] | None = None  # None: not compared yet
        self.published: tuple[tuple[str, ...], float] | None = None  # (divergences, monotonic time) last sent
        # NaN before the first comparison: "0" would claim an agreement nobody has checked yet. Declaring it
        # again (a restart after a bus failure builds a new Shadow) rebinds the same gauge to this one.
        ctx.metrics.gauge(
            METRIC, "differences between the kernel (kube-proxy's) and kipvs's plan for this node at the last "
                    "shadow comparison (NaN until the first)",
            read=lambda: math.nan if self.divergences is None else float(len(self.divergences)))

    async def read(self, reals_of: Checked | None = None) -> events.KernelTable:
        async with self.lock:
            return await self.kernel.kernel_table(reals_of)

    async def compare(self) -> tuple[str, ...]:
        """One comparison: the published plan for this node against the kernel; report it. Real servers
        are read and compared for one slice of the services per comparison, as the drift check does
        (drift_slices.py); the others' lines are those of their last read (``divergences``' ``last``)."""
        checked, _ = self.slices.next(self.compared_services)
        table = await self.read(checked)  # first: it finds kube-ipvs0, whose addresses are not the node's own
        wanted = await self._want()
        if wanted is None:  # the plan read short of the stream: no comparison against a partial plan
            return self.divergences or ()
        plan, want = wanted
        self.compared_services = len(want.ipvs)
        found = tuple(divergences(table, want, self.exclude_cidrs, reals_read=checked, last=self.real_lines))
        for line in sorted(set(found) - set(self.divergences or ())):
            log.warning("shadow: %s", line)
        if self.divergences and not found:
            log.info("shadow: the kernel matches kipvs's plan (delta %d)", plan.seq)
        self.plan_seq, self.divergences = plan.seq, found
        now = time.monotonic()
        if self.published is None or self.published[0] != found or now - self.published[1] >= self.heartbeat:
            record = events.ShadowReport(node=self.node, plan_seq=plan.seq, divergences=events.summarised(found),
                                         virtual_servers=len(table.virtual_servers), divergence_count=len(found))
            envelope = events.Envelope(id=f"shadow/{self.node}/{time.time_ns()}", time_ns=time.time_ns(),
                                       producer=f"applier/{self.node}", record=record)
            try:
                await bus.publish(self.ctx.js, topology.status_subject(self.node, "shadow"), envelope)
                self.published = (found, now)
            except bus.INFRASTRUCTURE_ERRORS as exc:
                log.warning("shadow report not published (%s: %s); it goes out with the next comparison",
                            type(exc).__name__, exc or "")
        return found


    async def _want(self) -> tuple[SharedPlan, NodeState] | None:
        """The published plan and this node's state from it, following the deltas: the first comparison
        (or one after a gap, or once the plan stream was replaced: its identity, ``topology.replacement``)
        reads the snapshot and resolves every Service; later ones read only the deltas stored since and
        re-resolve only the Services they touched (every Service when this node's facts changed), as the
        applier's core does. None when a fresh snapshot's deltas stopped at a gap (a chunked delta still
        being published, a lost part): the plan would be partial; the next comparison loads it again."""
        identity = await topology.stream_identity(self.ctx.js, topology.PLAN_STREAM)
        touched: set[str] | None = None
        if self.plan is not None and self.desired is not None and identity is not None and \
                self.identity is not None and not topology.replacement(self.identity, identity):
            followed = await plan_log.follow(self.ctx.js, self.reader, self.plan, self.stream_seq)
            self.stream_seq, touched = followed.last, (None if followed.stopped else followed.touched)
        if touched is None:  # (re)load: the snapshot, then every delta after it
            self.identity = identity
            self.plan, self.stream_seq = await plan_log.load_snapshot(self.ctx.js, self.reader)
            followed = await plan_log.follow(self.ctx.js, self.reader, self.plan, self.stream_seq)
            self.stream_seq, self.desired, self.facts = followed.last, DesiredState(), None
            if followed.stopped:
                log.warning("shadow: the published plan could not be read whole (a gap after its snapshot); "
                            "comparing again at the next period")
                self.plan = None
                return None
        assert self.plan is not None and self.desired is not None
        facts = await self._facts(self.plan)
        if facts != self.facts or touched is None:
            touched = set(self.desired.contributions) | set(self.plan.services)
            self.facts = facts
        for key in sorted(touched):
            service = self.plan.services.get(key)
            self.desired.update(key, resolve_service(service, facts) if service else None)
        return self.plan, self.desired.state()

    async def _facts(self, plan: SharedPlan) -> events.NodeFacts | None:
        """This node's facts as an applier of it would use them (--node-addresses, --nodeport-cidrs)."""
        facts = plan.nodes.get(self.node)
        if self.use_interfaces:
            addresses = await self.kernel.node_addresses()
            facts = msgspec.structs.replace(facts or events.NodeFacts(name=self.node), addresses=addresses)
        return nodeport_addresses.filtered(facts, self.nodeport_cidrs)


async def run_shadow(ctx: runtime.ServiceContext, kernel: Backend, period: float | None = None) -> None:
    """The shadow applier's main: answer inspections, compare every period until told to stop."""
    cfg = ctx.config
    node: str = cfg.node  # type: ignore[attr-defined]
    period = period if period is not None else cfg.shadow_sync_period  # type: ignore[attr-defined]
    log.info("SHADOW MODE on %s: nothing is programmed; comparing the kernel with kipvs's plan every %.0fs "
             "(backend: %s)", node, period, kernel.label)
    shadow = Shadow(ctx, node, kernel, cfg.node_addresses == "interfaces",  # type: ignore[attr-defined]
                    per_check=cfg.drift_check_services)  # type: ignore[attr-defined]
    shadow.nodeport_cidrs = tuple(cfg.nodeport_cidrs)  # type: ignore[attr-defined]
    shadow.exclude_cidrs = tuple(map(str, exclude.parse(cfg.ipvs_exclude_cidrs)))  # type: ignore[attr-defined]
    subscription = await inspect.serve(ctx.nc, node, kernel, lambda: ("shadow", shadow.plan_seq, ()), shadow.read,
                                       shadow.exclude_cidrs)
    try:
        while not ctx.stop.is_set():
            try:
                await shadow.compare()
                ctx.set_ready()  # ready once it has compared (and published) at least once
            except (NetlinkError, OSError) as exc:  # the kernel refused a dump: say so, try again next period
                log.warning("shadow: cannot read the kernel (%s); retrying in %.0fs", exc, period)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop.wait(), period)
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
