"""The applier's shell: the pure core (``core.py``) between the bus and the kernel, and the managers after it.

One batch of plan deltas (:meth:`Applier.handle`), in order:

    take:   each whole delta into the core (a gap re-bootstraps; a jump nothing explains is parked)
    write:  the core's operations into the kernel (IPVS, kube-ipvs0, ipsets) and the nftables rules; a
            failed write converges from a read-back
    after:  each manager's hook: conntrack.py (stale UDP/SCTP flows), marks.py (Calico endpoint marks, when
            the node's state changed), health_check.py (health-check node ports), then the metrics and
            reports.py (the apply report)

The managers follow Felix's dataplane managers (felix/dataplane/linux/int_dataplane.go, the ``Manager``
interface: ``OnUpdate`` then ``CompleteDeferredWork``): each owns one concern and is called at one point.
drift.py (read back and repair) and node_settings.py run at bootstrap and every drift check, under the
same lock as a batch: a repair never interleaves with a batch being written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from shared.contract import delta_chunks, events, topology
from shared.messaging import bus, plan_log
from shared.plan.plan_state import SequenceGap
from shared.security.nats_permissions import applier_reader
from shared.service import runtime

from . import heap, marks, node_claim, node_facts, plan_feed, takeover
from .conntrack import ConntrackCleanup
from .conntrack_settings import Conntrack
from .core import ApplierCore
from .drift import DriftCheck, describe_op
from .drift_slices import SERVICES_PER_CHECK
from .exclude import ExcludeCIDRs
from .health_check import HealthChecks, HealthServers
from .kernel.backend import Backend, KernelError
from .kernel.rules import NftRules
from .node_settings import NodeSettings, Timeouts
from .ops import Op, describe_changes
from .programming_metrics import ProgrammingMetrics, health_counters, service_keys
from .report_pacer import BUSY_REPORT_INTERVAL, REPORT_INTERVAL
from .reports import Reports

log = logging.getLogger("kipvs.applier")


@dataclass(frozen=True)
class ApplierSettings:
    """The applier's flags the shell and its managers use (``main.settings_of`` builds them from the config)."""

    drain_timeout: float = 300.0  # --drain-timeout, seconds
    interface_addresses: bool = False  # --node-addresses interfaces
    endpoint_marks: marks.Flag = "auto"  # --endpoint-marks
    conntrack_cleanup: bool = True  # --conntrack-cleanup
    timeouts: Timeouts = field(default_factory=Timeouts)  # --ipvs-tcp-timeout ...
    strict_arp: bool = False  # --ipvs-strict-arp
    report_interval: float = REPORT_INTERVAL  # --report-interval, seconds
    busy_report_interval: float = BUSY_REPORT_INTERVAL  # --busy-report-interval, seconds
    drift_check_services: int = SERVICES_PER_CHECK  # --drift-check-services
    nodeport_cidrs: tuple[str, ...] = ()  # --nodeport-cidrs (kube-proxy's --nodeport-addresses)
    conntrack: Conntrack = field(default_factory=Conntrack)  # --conntrack-max-per-core ...
    adopt: bool = False  # --adopt: take kube-proxy's state over at the bootstrap (takeover.py)
    exclude: ExcludeCIDRs = field(default_factory=ExcludeCIDRs)  # --ipvs-exclude-cidrs (also never adopted)


@dataclass
class _Batch:
    """What a batch's deltas did to the core: the Services touched, the shared deltas taken, the errors."""

    touched: set[str] = field(default_factory=set)
    applied: list[events.Envelope] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Applier:
    """The applier's core, its kernel, the bus and the managers, wired once."""

    def __init__(self, ctx: runtime.ServiceContext, node: str, kernel: Backend, rules: NftRules | None = None,
                 settings: ApplierSettings | None = None) -> None:
        s = settings or ApplierSettings()
        m = ctx.metrics
        self.ctx, self.node, self.kernel, self.rules = ctx, node, kernel, rules
        self.core = ApplierCore(node, s.drain_timeout, s.interface_addresses, s.nodeport_cidrs, s.exclude)
        # One writer at a time: a drift check reads the kernel back and repairs it, which must not interleave
        # with a batch being written (it would "repair" what the batch is adding: EEXIST).
        self.kernel_lock = asyncio.Lock()
        self.stream_seq = 0  # the last plan-stream sequence applied (read at bootstrap or delivered)
        self.adopt, self.exclude = s.adopt, s.exclude
        # history of the plan is read under the node's one reader name: its permissions allow no other
        self.plan_reader = bus.LogReader(topology.PLAN_STREAM, applier_reader(node))
        self.consumer: plan_feed.PlanInput | None = None
        self.claim: node_claim.NodeClaim | None = None  # one applier per node (node_claim.py)
        self.reports = Reports(ctx.js, node, s.report_interval, s.busy_report_interval)
        self.facts_publisher = node_facts.FactsPublisher(ctx.js, node, lambda: self.marks.mode)
        self.marks = marks.EndpointMarkRules(s.endpoint_marks, rules, self.facts_publisher.publish)
        self.health = HealthServers(lambda: _healthy(ctx),
                                    m.counter("kipvs_applier_health_check_bind_errors_total",
                                              "health-check node ports (and the node health port) not bound"),
                                    *health_counters(m))
        self.health_checks = HealthChecks(node, self.health)
        self.conntrack = ConntrackCleanup(kernel, s.conntrack_cleanup, m.counter(
            "kipvs_applier_conntrack_entries_deleted_total",
            "conntrack entries of UDP/SCTP flows deleted after their real server left"))
        self.node_settings = NodeSettings(kernel, s.timeouts, s.strict_arp, s.conntrack)
        self.drift = DriftCheck(self.core, kernel, rules, self.reports, m.counter(
            "kipvs_applier_drift_repairs_total", "kernel objects repaired after a read-back"), s.drift_check_services)
        self.applied_ops = m.counter("kipvs_applier_operations_total", "kernel operations written")
        m.gauge("kipvs_applier_plan_seq", "last shared delta applied", read=lambda: self.core.plan.seq)
        m.gauge("kipvs_applier_draining_real_servers", "removed TCP real servers still draining",
                read=lambda: len(self.core.drainer.deadlines))
        self.metrics = ProgrammingMetrics(m, node, self.core.programmed_counts, lambda: self.core.calico,
                                          lambda: self.consumer.pending if self.consumer is not None else 0)
        m.counter_reading("kipvs_applier_parked_total", "plan messages this applier parked (undecodable or refused)",
                          lambda: self.consumer.parked if self.consumer is not None else 0)

    async def bootstrap(self) -> None:
        """Load the latest snapshot, bring it up to the newest delta on the stream, resolve it for this node
        and make the kernel match (read-back + diff), then report what was applied.

        The snapshot is usually older than what this node already applied before a restart (snapshots are
        periodic), and the durable consumer resumes after its ack floor, so the deltas in between would
        never be delivered again: they are read from the stream by sequence (the snapshot's
        ``plan_stream_seq`` onwards). A restart therefore never programs a state older than the newest one
        published, which is never older than what this node last applied."""
        core = self.core
        plan, stream_seq = await plan_log.load_snapshot(self.ctx.js, self.plan_reader)
        caught_up, read_upto = await plan_log.catch_up_to(self.ctx.js, self.plan_reader, plan, stream_seq)
        self.stream_seq = max(self.stream_seq, read_upto)
        if core.use_interfaces:
            core.local_addresses = await self.kernel.node_addresses()
        heap.hold()  # the plan read: out of the full collections the resolve and diff below set off
        core.reset(plan)
        if self.adopt:  # before the first write: kube-proxy's services are only edited, never re-created
            await takeover.adopt(self.kernel, core.desired.state(), self.exclude)
        found = await self.converge()
        calico = await marks.last_node_state(self.ctx.js, self.plan_reader, self.node)
        if calico is not None:
            core.calico_seq, core.calico = calico
        self.marks.bootstrap(core.calico)
        if self.rules is not None:
            self.rules.marks = self.marks.marks(core.calico)
            await self.rules.install(core.desired.state().ipsets)
        if self.adopt and self.rules is not None:  # kipvs's table carries the traffic now
            await takeover.remove_kube_proxy_chains()
            self.adopt = False
        await self.node_settings.sync()
        await self._sync_health_checks(None)
        self.metrics.services_changed(core.plan.services, set(core.plan.services) | set(self.metrics.by_service))
        self.metrics.synced()
        heap.settle()  # the plan and desired state, out of every later full collection (heap.py)
        log.info("bootstrapped at plan delta %d (%d read from the stream after the snapshot): %d services, %s",
                 core.plan.seq, caught_up, len(core.desired.services), describe_changes(found))
        # Say at once what this instance holds: the last report on the status stream may be a previous
        # instance's, newer or older than what the kernel now holds.
        self.reports.report(events.ApplyReport(node=self.node, plan_seq=core.plan.seq, operations=len(found),
                                               duration_ms=0.0, desired_digest=core.desired.digest(),
                                               bootstrap=True))

    async def converge(self) -> list[str]:
        """Read the kernel back and write what makes it the desired state; the operations, described."""
        ops = self.core.converge(await self.kernel.observe(), time.monotonic())
        if ops:
            await self.kernel.apply(ops)
            self.applied_ops.inc(len(ops))
        return [describe_op(op) for op in ops]

    async def handle(self, batch: list[bus.Delivery]) -> None:
        """One batch of plan deltas (bus.DurableConsumer's handler); raises bus.Retry when superseded."""
        if self.claim is not None and not await self.claim.held_lately():
            raise bus.Retry(f"node {self.node} is applied by {self.claim.holder} now")
        async with self.kernel_lock:
            started = time.perf_counter()
            self.metrics.queued()
            facts_before, calico_before = self.core.facts(), self.core.calico
            taken = await self._take(batch)
            self.stream_seq = max(self.stream_seq, batch[-1].stream_sequence)
            ops, taken.touched = self.core.resolve(taken.touched, facts_before, time.monotonic())
            await self._write(ops, taken.errors)
            await self._after_write(ops, taken, calico_before != self.core.calico, time.perf_counter() - started)

    async def _take(self, batch: list[bus.Delivery]) -> _Batch:
        taken = _Batch()
        for d in batch:
            envelope = await self._whole(d.envelope)
            if envelope is None:
                continue  # a part of a chunked delta not complete yet, or one the plan has already
            record = envelope.record
            if not isinstance(record, events.PlanDelta):
                raise ValueError(f"{type(record).__name__} does not belong on a plan subject")
            before = {key: self.core.plan.services.get(key) for key in service_keys(record)}
            try:
                touched = self.core.take(record)
            except SequenceGap as exc:
                log.warning("%s: re-bootstrapping from the latest snapshot", exc)
                await self.bootstrap()
                if self.core.jumps(record):
                    # Neither the newest snapshot nor the stream explains it: not the planner's sequence (an
                    # admin's delta). Retrying re-bootstrapped three times a second, forever: parked instead.
                    taken.errors.append(await self._park_jump(d, record))
                    continue
                touched = self.core.take(record)
            if touched is not None:
                taken.applied.append(envelope)
                taken.touched |= touched
                self.metrics.count_changes(before, self.core.plan.services)
        return taken

    async def _whole(self, envelope: events.Envelope) -> events.Envelope | None:
        """The delta a message completes (core.whole); a broken chunked delta re-bootstraps from the snapshot,
        as a missing delta does, and gives None."""
        try:
            return self.core.whole(envelope)
        except delta_chunks.ChunkGap as exc:
            log.warning("%s: re-bootstrapping from the latest snapshot", exc)
            await self.bootstrap()
            return None

    async def _park_jump(self, d: bus.Delivery, record: events.PlanDelta) -> str:
        """Park a shared delta whose sequence jumps past what a fresh bootstrap reaches; the reason, which
        also goes into the batch's report. The deltas after it go on (a later snapshot covers a real gap)."""
        reason = (f"plan delta {record.seq} jumps past delta {self.core.plan.seq + 1}: neither the newest snapshot "
                  f"nor the plan stream holds the deltas between (published by someone other than the planner?)")
        service = self.consumer.service if self.consumer is not None else topology.applier_durable(self.node)
        await bus.park(self.ctx.js, service, d.msg, d.msg.data, reason)
        if self.consumer is not None:
            self.consumer.parked += 1
        return reason

    async def _write(self, ops: list[Op], errors: list[str]) -> None:
        if not ops:
            return
        try:
            await self.kernel.apply(ops)
            if self.rules is not None:
                await self.rules.apply(ops)
        except KernelError as exc:
            # The kernel is not what we thought (changed behind our back), or refuses an operation for
            # good (a scheduler module it lacks): read back and converge, which applies all it accepts.
            errors.append(str(exc))
            log.warning("kernel write failed (%s); converging from a read-back", exc)
            try:
                await self.converge()
            except KernelError as again:  # reported, and tried again at every drift check
                log.warning("the kernel still refuses (%s); the drift check tries again every period", again)
            if self.rules is not None:
                await self.rules.install(self.core.desired.state().ipsets)

    async def _after_write(self, ops: list[Op], taken: _Batch, calico_changed: bool, elapsed: float) -> None:
        core = self.core
        self.applied_ops.inc(len(ops))
        await self.conntrack.on_applied(ops, core.desired.services)
        if calico_changed:
            await self.marks.on_calico_changed(core.calico, core.desired)
        await self._sync_health_checks(taken.touched)
        self.metrics.programmed(taken.applied)
        self.metrics.services_changed(core.plan.services, taken.touched)
        self.metrics.synced(elapsed)
        self.reports.report(events.ApplyReport(
            node=self.node, plan_seq=core.plan.seq, operations=len(ops), duration_ms=round(elapsed * 1000, 3),
            errors=events.summarised(taken.errors), desired_digest=core.desired.digest()))

    async def _sync_health_checks(self, touched: set[str] | None) -> None:
        facts = self.core.facts()
        await self.health_checks.on_applied(self.core.plan.services, touched,
                                            facts.addresses if facts is not None else ())

    async def drain(self) -> None:
        """Delete drained real servers: no connections left, or past the drain timeout."""
        async with self.kernel_lock:
            drainer = self.core.drainer
            if not drainer.deadlines:
                return
            done = drainer.due(await self.kernel.connections(drainer.services()), time.monotonic())
            if done:
                await self.kernel.apply(done)
                self.applied_ops.inc(len(done))

    async def read_kernel(self) -> events.KernelTable:
        """The whole kernel table for ``kipvs ipvs`` (never while a batch or a repair is being written)."""
        async with self.kernel_lock:
            return await self.kernel.kernel_table()

    async def drift_check(self) -> None:
        """drift.py's read-back and repair, then the node settings, between batches."""
        async with self.kernel_lock:
            await self.drift.check()
            await self.node_settings.sync()


def _healthy(ctx: runtime.ServiceContext) -> bool:
    """kube-proxy's node health (pkg/proxy/healthcheck/proxier_health.go): no input waiting unhandled longer
    than the bound."""
    since = ctx.queued_since() if ctx.queued_since is not None else None
    return since is None or asyncio.get_running_loop().time() - since <= ctx.config.healthz_stale_after
