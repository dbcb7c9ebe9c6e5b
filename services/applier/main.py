"""``kipvs applier``: one per node. Plan deltas in, kernel writes out, reports back.

    check the kernel (precise error and exit 2 if it cannot do IPVS) -> set up link and sets
    bootstrap: the latest snapshot, resolved for this node; converge the kernel to it (diff after read-back)
    bootstrap Calico's state for this node: the last message on kipvs.plan.node.<node> (it is the whole state)
    consume kipvs.plan.all + kipvs.plan.node.<node> (one durable consumer, two filter subjects):
        apply each delta to the shared plan (skip what the snapshot already had; a gap re-bootstraps)
        re-resolve only the Services the batch touched (all of them if this node's facts changed)
        write the operations, then ack; publish an apply report
        a node delta replaces the node's Calico state; in enforce mode the endpoint-mark rules follow
    every --drift-period (and on SIGUSR1): read the kernel back, repair any difference, report it
    on every link change (netlink) and every --drift-period: publish the node's facts when they change
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from nats.js.errors import NotFoundError
from pyroute2.netlink.exceptions import NetlinkError

from kipvs.shared import bus, config, delta_chunks, events, logs, plan_log, runtime, topology
from kipvs.shared.config import describe
from kipvs.shared.nats_permissions import applier_reader
from kipvs.shared.plan.node_state import RealKey, VSKey
from kipvs.shared.plan.plan_state import SequenceGap, SharedPlan
from kipvs.shared.plan.resolve import resolve_service

from . import exclude, health_check, inspect, node_claim, node_facts, node_settings, plan_cache, plan_consumer
from .backend import Backend, CapabilityError, KernelError, MemoryKernel
from .drain import Drainer
from .endpoint_mark_rules import EndpointMarks, Mode, resolve_mode
from .health_check import HealthServers
from .node_settings import Timeouts
from .ops import AddReal, DelReal, DelService, DesiredState, Op, diff, digest
from .programming_metrics import ProgrammingMetrics
from .rules import NftRules, RulesConfig

log = logging.getLogger("kipvs.applier")


class ApplierConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    node: Annotated[str, describe("this node's name, as in its Node object (in Kubernetes: spec.nodeName)")] = ""
    backend: Annotated[Literal["netlink", "memory"], describe(
        "netlink: this host's kernel; memory: a simulated kernel for dry runs (programs nothing)")] = "netlink"
    drift_period: Annotated[float, describe("seconds between kernel read-backs"), msgspec.Meta(gt=0)] = 60.0
    batch: Annotated[int, describe("plan deltas fetched per batch"), msgspec.Meta(ge=1, le=10_000)] = 500
    drain_timeout: Annotated[float, describe(
        "seconds a removed TCP real server may drain (weight 0) before deletion; 0: at once"),
        msgspec.Meta(ge=0)] = 300.0
    cleanup: Annotated[bool, describe("remove everything kipvs owns on this node, then exit")] = False
    node_addresses: Annotated[Literal["node", "interfaces"], describe(
        "NodePort addresses: node = the InternalIPs of the Node object (as kipvs plan --node), interfaces = "
        "this host's own addresses, as kube-proxy does")] = "node"
    rules: Annotated[Literal["nftables", "none"], describe(
        "nftables: masquerade, VIP port filter and source ranges in table inet kipvs; none: IPVS only")] = "nftables"
    cluster_cidr: Annotated[list[str], describe(
        "pod CIDRs: ClusterIP traffic from outside them is masqueraded (kube-proxy's --cluster-cidr)")] = []
    masquerade_all: Annotated[bool, describe(
        "masquerade all ClusterIP traffic (kube-proxy's --masquerade-all)")] = False
    plan_cache: Annotated[str, describe(
        "file for this node's last plan: at start, the kernel is programmed from it before NATS is reached "
        "(a rebooted node needs its Services to find NATS); empty: no cache")] = ""
    ipvs_tcp_timeout: Annotated[int, describe(
        "IPVS timeout for idle TCP connections, seconds; 0 leaves the kernel's value (kube-proxy's "
        "--ipvs-tcp-timeout, ipvsadm --set)"), msgspec.Meta(ge=0)] = 0
    ipvs_tcpfin_timeout: Annotated[int, describe(
        "IPVS timeout for TCP connections after FIN, seconds; 0 leaves the kernel's value "
        "(kube-proxy's --ipvs-tcpfin-timeout)"), msgspec.Meta(ge=0)] = 0
    ipvs_udp_timeout: Annotated[int, describe(
        "IPVS timeout for UDP flows, seconds; 0 leaves the kernel's value (kube-proxy's --ipvs-udp-timeout)"),
        msgspec.Meta(ge=0)] = 0
    ipvs_strict_arp: Annotated[bool, describe(
        "arp_ignore=1 and arp_announce=2 on all interfaces (kube-proxy's --ipvs-strict-arp; MetalLB and "
        "kube-vip in layer-2 mode need it)")] = False
    conntrack_cleanup: Annotated[bool, describe(
        "delete the conntrack entries of UDP/SCTP flows whose real server left (kube-proxy does; off only "
        "for tests)")] = True
    healthz_bind_address: Annotated[str, describe(
        "host:port of the node health server (kube-proxy's --healthz-bind-address: /healthz, /livez); "
        "empty disables it")] = "0.0.0.0:10256"
    ipvs_exclude_cidrs: Annotated[list[str], describe(
        "CIDRs whose IPVS virtual services belong to another program: kipvs never programs, edits or deletes "
        "a virtual service there, nor binds such an address (kube-proxy's --ipvs-exclude-cidrs; "
        "comma-separated)")] = []
    endpoint_marks: Annotated[Literal["auto", "observe", "enforce"], describe(
        "Calico endpoint marks: enforce = kipvs writes the marking rules (nodes without Felix), observe = "
        "publish and warn only (Felix writes them), auto = observe where a calico-node pod runs on the node, "
        "else enforce")] = "auto"

    shadow: Annotated[bool, describe(
        "shadow mode, for migrations: program nothing and compare the kernel (kube-proxy's IPVS table, "
        "kube-ipvs0 addresses, ipsets) with kipvs's plan every --shadow-sync-period; divergences go to "
        "kipvs.status.<node>.shadow, kipvs_shadow_divergences and kipvs status")] = False
    shadow_sync_period: Annotated[float, describe(
        "seconds between shadow comparisons (as kube-proxy's --ipvs-sync-period)"), msgspec.Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.node:
            raise ValueError("node is required (--node, KIPVS_NODE): the name of this node's Node object")
        topology.token(self.node)
        if self.shadow and self.cleanup:
            raise ValueError("shadow and cleanup exclude each other: shadow mode never changes the kernel")
        config.check_listen("healthz_bind_address", self.healthz_bind_address)
        exclude.parse(self.ipvs_exclude_cidrs)


def describe_op(op: Op) -> str:
    return f"{type(op).__name__} " + " ".join(str(v) for v in vars(op).values())


class Applier:
    """The applier's state and logic, with its kernel and the bus handed in."""

    def __init__(self, ctx: runtime.ServiceContext, node: str, kernel: Backend, rules: NftRules | None = None,
                 drain_timeout: float = 300.0, interface_addresses: bool = False,
                 endpoint_marks: Literal["auto", "observe", "enforce"] = "auto") -> None:
        self.ctx = ctx
        self.endpoint_marks_flag = endpoint_marks
        self.calico: events.SetNodeCalico | None = None  # this node's Calico state, as planned
        self.calico_seq = 0
        self.mode: tuple[Mode, str] = resolve_mode(endpoint_marks, None, rules is not None)
        self.observation: node_facts.Observation | None = None
        self.use_interfaces = interface_addresses
        self.local_addresses: tuple[str, ...] = ()
        self.drainer = Drainer(drain_timeout)
        # One writer at a time: a drift check reads the kernel back and repairs it, which must not interleave
        # with a batch being written (it would "repair" what the batch is adding: EEXIST).
        self.kernel_lock = asyncio.Lock()
        self.node = node
        # history of the plan is read under the node's one reader name: its permissions allow no other
        self.plan_reader = bus.LogReader(topology.PLAN_STREAM, applier_reader(node))
        self.kernel = kernel
        self.rules = rules
        self.plan = SharedPlan()
        self.chunks = delta_chunks.Assembler()  # chunked deltas in progress, kept across re-bootstraps
        self.stream_seq = 0  # the last plan-stream sequence applied (read at bootstrap or delivered)
        self.exclude = exclude.ExcludeCIDRs()  # --ipvs-exclude-cidrs
        self.desired = DesiredState()
        self.health_wanted: dict[str, tuple[int, int]] = {}  # health_check.wanted_ports, kept per change
        self.unsent_reports: dict[str, events.Envelope] = {}  # the newest report of each kind not yet on the bus
        self.reporter: asyncio.Task | None = None  # publishing unsent_reports
        self.conntrack_cleanup = True
        self.timeouts = Timeouts()
        self.strict_arp = False
        m = ctx.metrics
        self.health = HealthServers(lambda: _healthy(ctx),
                                    m.counter("kipvs_applier_health_check_bind_errors_total",
                                              "health-check node ports (and the node health port) not bound"))
        self.conntrack_deleted = m.counter("kipvs_applier_conntrack_entries_deleted_total",
                                           "conntrack entries of UDP/SCTP flows deleted after their real server left")
        self.applied_ops = m.counter("kipvs_applier_operations_total", "kernel operations written")
        self.drift_repairs = m.counter("kipvs_applier_drift_repairs_total", "kernel objects repaired after a read-back")
        m.gauge("kipvs_applier_plan_seq", "last shared delta applied", read=lambda: self.plan.seq)
        m.gauge("kipvs_applier_draining_real_servers", "removed TCP real servers still draining",
                read=lambda: len(self.drainer.deadlines))
        self.consumer: bus.DurableConsumer | None = None
        self.claim: node_claim.NodeClaim | None = None  # one applier per node (node_claim.py)
        self.metrics = ProgrammingMetrics(m, node, self.programmed_counts, lambda: self.calico,
                                          lambda: self.consumer.pending if self.consumer is not None else 0)
        m.counter_reading("kipvs_applier_parked_total", "plan messages this applier parked (undecodable or refused)",
                          lambda: self.consumer.parked if self.consumer is not None else 0)

    def programmed_counts(self) -> tuple[int, int]:
        """(virtual services, real servers) the node's kernel is meant to hold now."""
        services = self.desired.services
        return len(services), sum(len(vs.reals) for vs in services.values())

    async def bootstrap(self) -> None:
        """Load the latest snapshot, bring it up to the newest delta on the stream, resolve it for this node
        and make the kernel match (read-back + diff), then report what was applied.

        The snapshot is usually older than what this node already applied before a restart (snapshots are
        periodic), and the durable consumer resumes after its ack floor, so the deltas in between would
        never be delivered again: they are read from the stream by sequence (the snapshot's
        ``plan_stream_seq`` onwards). A restart therefore never programs a state older than the newest one
        published, which is never older than what this node last applied."""
        self.plan, stream_seq = await plan_log.load_snapshot(self.ctx.js, self.plan_reader)
        caught_up, read_upto = await plan_log.catch_up_to(self.ctx.js, self.plan_reader, self.plan, stream_seq)
        self.stream_seq = max(self.stream_seq, read_upto)
        if self.use_interfaces:
            self.local_addresses = await self.kernel.node_addresses()
        self.desired = DesiredState.of(self.plan.services, self.facts(), self.exclude.contribution)
        found = await self.converge()
        await self.bootstrap_calico()
        if self.rules is not None:
            self.rules.marks = self.endpoint_marks()
            await self.rules.install(self.desired.state().ipsets)
        await self.sync_node_settings()
        await self.sync_health_checks()
        self.metrics.services_changed(self.plan.services, set(self.plan.services) | set(self.metrics.by_service))
        self.metrics.synced()
        log.info("bootstrapped at plan delta %d (%d read from the stream after the snapshot): %d services, "
                 "%d repairs to reach it", self.plan.seq, caught_up, len(self.desired.services), len(found))
        # Say at once what this instance holds: the last report on the status stream may be a previous
        # instance's, newer or older than what the kernel now holds.
        await self.report(events.ApplyReport(node=self.node, plan_seq=self.plan.seq, operations=len(found),
                                             duration_ms=0.0, desired_digest=self.desired.digest()))

    async def bootstrap_calico(self) -> None:
        """The node subject's last message is the node's whole Calico state. If that message is unusable (it
        was parked when consumed), the subject is read back to the last usable one: never a crash loop."""
        subject = topology.plan_node_subject(self.node)
        try:
            msg = await self.ctx.js.get_last_msg(topology.PLAN_STREAM, subject)
            found = _node_state(msg.data or b"")
            if found is None:
                # unusable, or a part of a chunked delta: read back whole deltas, chunked ones put together
                log.warning("the last message on %s is not a whole delta; reading the subject back", subject)
                async for _, delta in plan_log.complete_deltas(
                        bus.read_stream(self.ctx.js, self.plan_reader, subject)):
                    found = _calico_of(delta) or found
        except NotFoundError:
            found = None
        if found is not None:
            self.calico_seq, self.calico = found
        self.mode = resolve_mode(self.endpoint_marks_flag, self.calico, self.rules is not None)

    def endpoint_marks(self) -> EndpointMarks | None:
        """The marks the rules must hold: the node's, in enforce mode; else none."""
        if self.mode[0] != "enforce" or self.calico is None:
            return None
        return EndpointMarks.from_plan(self.calico)

    async def sync_endpoint_marks(self) -> None:
        mode = resolve_mode(self.endpoint_marks_flag, self.calico, self.rules is not None)
        if mode != self.mode:
            log.info("endpoint marks: %s (%s)", *mode)
            self.mode = mode
            await self.publish_facts()
        if self.rules is not None:
            marks = self.endpoint_marks()
            members = None if marks is not None and marks.same_frame(self.rules.marks) else self.desired.state().ipsets
            await self.rules.set_endpoint_marks(marks, members)

    async def on_observation(self, observation: node_facts.Observation) -> None:
        self.observation = observation
        for conflict in node_facts.conflicts(observation):
            log.error("CONFLICT on %s: %s", self.node, conflict)
        await self.publish_facts()

    async def publish_facts(self) -> None:
        if self.observation is None:
            return
        record = node_facts.report(self.node, self.observation, *self.mode)
        envelope = events.Envelope(id=f"facts/{self.node}/{time.time_ns()}", time_ns=time.time_ns(),
                                   producer=f"applier/{self.node}", record=record)
        await bus.publish(self.ctx.js, topology.status_subject(self.node, "facts"), envelope)

    def facts(self) -> events.NodeFacts | None:
        """This node's facts from the plan; with --node-addresses interfaces, its addresses are its own."""
        facts = self.plan.nodes.get(self.node)
        if not self.use_interfaces:
            return facts
        base = facts or events.NodeFacts(name=self.node)
        return msgspec.structs.replace(base, addresses=self.local_addresses)

    async def converge(self) -> list[str]:
        observed = self.exclude.hide(await self.kernel.observe())
        ops = diff(self.desired.state(), observed.state, observed.owned)
        ops = self.drainer.keep_draining(self.drainer.resume(ops, observed.state, time.monotonic()))
        if ops:
            await self.kernel.apply(ops)
            self.applied_ops.inc(len(ops))
        return [describe_op(op) for op in ops]

    async def drain(self) -> None:
        """Delete drained real servers: no connections left, or past the drain timeout."""
        async with self.kernel_lock:
            await self._drain()

    async def _drain(self) -> None:
        if not self.drainer.deadlines:
            return
        connections = await self.kernel.connections(self.drainer.services())
        done = self.drainer.due(connections, time.monotonic())
        if done:
            await self.kernel.apply(done)
            self.applied_ops.inc(len(done))

    async def handle(self, batch: list[bus.Delivery]) -> None:
        if self.claim is not None and not await self.claim.still_held():
            raise bus.Retry(f"node {self.node} is applied by {self.claim.holder} now")
        async with self.kernel_lock:
            await self._handle(batch)

    async def _handle(self, batch: list[bus.Delivery]) -> None:
        started = time.perf_counter()
        touched: set[str] = set()
        facts_before = self.facts()
        calico_before = self.calico
        applied: list[events.Envelope] = []  # the shared deltas this batch programs
        errors: list[str] = []
        for d in batch:
            envelope = await self.whole(d.envelope)
            if envelope is None:
                continue  # a part of a chunked delta not complete yet, or one the plan has already
            record = envelope.record
            if not isinstance(record, events.PlanDelta):
                raise ValueError(f"{type(record).__name__} does not belong on a plan subject")
            if record.scope != "all":
                if record.scope == self.node and record.seq > self.calico_seq:
                    for op in record.ops:  # each node delta holds the node's whole state: the last one wins
                        if isinstance(op, events.SetNodeCalico):
                            self.calico, self.calico_seq = op, record.seq
                continue
            try:
                if not self.plan.apply(record):
                    continue
            except SequenceGap as exc:
                log.warning("%s: re-bootstrapping from the latest snapshot", exc)
                await self.bootstrap()
                if record.seq > self.plan.seq + 1:
                    # Neither the newest snapshot nor the stream explains it: not the planner's sequence (an
                    # admin's delta). Retrying re-bootstrapped three times a second, forever: parked instead.
                    errors.append(await self.park_jump(d, record))
                    continue
                if not self.plan.apply(record):
                    continue
            applied.append(envelope)
            touched |= {op.service.key if isinstance(op, events.SetService) else op.key
                        for op in record.ops if isinstance(op, events.SetService | events.RemoveService)}
        self.stream_seq = max(self.stream_seq, batch[-1].stream_sequence)
        facts = self.facts()
        if facts != facts_before:
            touched = set(self.desired.contributions) | set(self.plan.services)
        ops: list[Op] = []
        for key in sorted(touched):
            plan = self.plan.services.get(key)
            ops += self.desired.update(key, resolve_service(plan, facts) if plan else None)
        ops = self.drainer.rewrite(ops, time.monotonic())
        if ops:
            try:
                await self.kernel.apply(ops)
                if self.rules is not None:
                    await self.rules.apply(ops)
            except KernelError as exc:
                # The kernel is not what we thought (changed behind our back): read back and converge.
                errors.append(str(exc))
                log.warning("kernel write failed (%s); converging from a read-back", exc)
                await self.converge()
                if self.rules is not None:
                    await self.rules.install(self.desired.state().ipsets)
        self.applied_ops.inc(len(ops))
        await self.clear_stale_flows(ops)
        if self.calico != calico_before:
            await self.sync_endpoint_marks()
        await self.sync_health_checks(touched)
        elapsed = time.perf_counter() - started
        self.metrics.programmed(applied)
        self.metrics.services_changed(self.plan.services, touched)
        self.metrics.synced(elapsed)
        await self.report(events.ApplyReport(
            node=self.node, plan_seq=self.plan.seq, operations=len(ops), duration_ms=round(elapsed * 1000, 3),
            errors=events.summarised(errors), desired_digest=self.desired.digest()))

    async def whole(self, envelope: events.Envelope) -> events.Envelope | None:
        """The delta a message completes: itself, or the chunked delta whose last part it is (never half of
        one: ``delta_chunks``). A broken chunked delta re-bootstraps from the snapshot, as a missing delta
        does; None then, and for a part that completes nothing."""
        chunk = envelope.record
        if not isinstance(chunk, events.PlanDeltaChunk):
            if isinstance(chunk, events.PlanDelta):
                self.chunks.settled(chunk.scope, chunk.seq)
            return envelope
        have = self.plan.seq if chunk.scope == "all" else self.calico_seq if chunk.scope == self.node else 0
        try:
            return self.chunks.feed(envelope, have)
        except delta_chunks.ChunkGap as exc:
            log.warning("%s: re-bootstrapping from the latest snapshot", exc)
            await self.bootstrap()
            return None

    async def park_jump(self, d: bus.Delivery, record: events.PlanDelta) -> str:
        """Park a shared delta whose sequence jumps past what a fresh bootstrap reaches; the reason, which
        also goes into the batch's report. The deltas after it go on (a later snapshot covers a real gap)."""
        reason = (f"plan delta {record.seq} jumps past delta {self.plan.seq + 1}: neither the newest snapshot nor "
                  f"the plan stream holds the deltas between (published by someone other than the planner?)")
        service = self.consumer.service if self.consumer is not None else topology.applier_durable(self.node)
        await bus.park(self.ctx.js, service, d.msg, d.msg.data, reason)
        if self.consumer is not None:
            self.consumer.parked += 1
        return reason

    async def read_kernel(self) -> events.KernelTable:
        """The whole kernel table for ``kipvs ipvs`` (never while a batch or a repair is being written)."""
        async with self.kernel_lock:
            return await self.kernel.kernel_table()

    async def drift_check(self) -> None:
        async with self.kernel_lock:
            await self._drift_check()
            await self.sync_node_settings()

    async def sync_node_settings(self) -> None:
        """The IPVS timeouts, strict ARP and conn_reuse_mode (by kernel version), at start and at every
        drift check."""
        current = await self.kernel.ipvs_timeouts()
        if self.timeouts.differs(current):
            log.info("IPVS timeouts %s -> %s", current, self.timeouts)
            await self.kernel.set_ipvs_timeouts(self.timeouts)
        changes = node_settings.sysctls_to_set(self.strict_arp, self.kernel.sysctls(list(node_settings.KEYS)))
        if changes:
            log.info("node sysctls: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.kernel.set_sysctls(changes)

    async def clear_stale_flows(self, ops: list[Op]) -> None:
        """UDP and SCTP have no connection end, so conntrack keeps steering a client's datagrams the way
        its first one went. As kube-proxy does after each sync, drop the entries of flows whose real server
        left, of virtual services that went away, and of virtual services that had no real server until
        now (their datagrams went to the node itself, and would keep doing so: the CoreDNS-not-ready case)."""
        if not self.conntrack_cleanup:
            return
        flows: list[tuple[VSKey, RealKey | None]] = []
        added: dict[VSKey, int] = {}
        for op in ops:
            if isinstance(op, DelReal) and op.service[0] in ("UDP", "SCTP"):
                flows.append((op.service, op.real))
            elif isinstance(op, DelService) and op.key[0] in ("UDP", "SCTP"):
                flows.append((op.key, None))
            elif isinstance(op, AddReal) and op.service[0] in ("UDP", "SCTP"):
                added[op.service] = added.get(op.service, 0) + 1
        desired = self.desired.services  # not state(): that copies the whole node's state for one change
        for key, count in sorted(added.items()):
            if key in desired and len(desired[key].reals) == count:  # every real server is new: 0 -> N
                flows.append((key, None))
        if flows:
            try:
                self.conntrack_deleted.inc(await self.kernel.clear_conntrack(flows))
            except (OSError, NetlinkError) as exc:
                log.warning("conntrack cleanup failed (%s); stale UDP flows expire by themselves", exc)

    async def sync_health_checks(self, touched: set[str] | None = None) -> None:
        """The health-check node ports the plan asks for: every Service's (``touched`` None: at bootstrap) or
        only those a batch touched; the servers are synced only when what they serve changed."""
        facts = self.facts()
        addresses = facts.addresses if facts is not None else ()
        if touched is None:
            self.health_wanted = health_check.wanted_ports(self.plan.services, self.node)
            changed = True
        else:
            changed = health_check.update_wanted(self.health_wanted, self.plan.services, touched, self.node)
        if changed or addresses != self.health.addresses:
            await self.health.sync(self.health_wanted, addresses)
        self.health.touched()

    async def _drift_check(self) -> None:
        if self.use_interfaces:
            addresses = await self.kernel.node_addresses()
            if addresses != self.local_addresses:  # an interface address came or went: NodePorts follow
                self.local_addresses = addresses
                facts = self.facts()
                ops: list[Op] = []
                for key in sorted(self.plan.services):
                    ops += self.desired.update(key, resolve_service(self.plan.services[key], facts))
                ops = self.drainer.rewrite(ops, time.monotonic())
                await self.kernel.apply(ops)
                if self.rules is not None:
                    await self.rules.apply(ops)
        observed = self.exclude.hide(await self.kernel.observe())
        want = self.desired.state()
        ops = self.drainer.keep_draining(diff(want, observed.state, observed.owned))
        found = [describe_op(op) for op in ops]
        if ops:
            await self.kernel.apply(ops)
            self.drift_repairs.inc(len(ops))
            log.warning("drift: repaired %d kernel objects", len(ops))
            observed = self.exclude.hide(await self.kernel.observe())
        if self.rules is not None:
            members = await self.rules.members()
            marks = self.rules.marks
            if any(members.get(name, set()) != entries for name, entries in want.ipsets.items()):
                found.append("nftables table inet kipvs: set members differed; table rewritten")
                await self.rules.install(want.ipsets)
            elif (await self.rules.installed_marks()) != (marks.marks if marks is not None else None):
                found.append("nftables table inet kipvs: endpoint marks differed; table rewritten")
                await self.rules.install(want.ipsets)
        await self.report(events.DriftReport(
            node=self.node, plan_seq=self.plan.seq, found=events.summarised(found), repaired=True,
            desired_digest=digest(want), observed_digest=digest(observed.state)))

    async def report(self, record: events.ApplyReport | events.DriftReport) -> None:
        """Queue a status report; it is published off the consume loop (:meth:`send_reports`), so the next
        delta is not held up by the STATUS stream, which takes one report per node per batch: with a
        thousand nodes that fan-in, not the apply, set the pace (issue 17, docs/architecture.md "Scale").
        Reports queued while one is being published are coalesced: the newest of each kind goes next."""
        what = "applied" if isinstance(record, events.ApplyReport) else "drift"
        envelope = events.Envelope(id=f"{what}/{self.node}/{record.plan_seq}/{time.time_ns()}",
                                   time_ns=time.time_ns(), producer=f"applier/{self.node}", record=record)
        self.unsent_reports[what] = envelope
        if self.reporter is None or self.reporter.done():
            self.reporter = asyncio.create_task(self.send_reports())

    async def send_reports(self) -> None:
        """Publish the newest report of each kind until none is left. The kernel is already written: a report
        the bus refuses (a full store, a timeout) is logged and the newest one of its kind is sent again with
        the next report or drift check, never a reason to redo or park the delta it describes."""
        while self.unsent_reports:
            kind = min(self.unsent_reports)
            pending = self.unsent_reports[kind]
            try:
                await bus.publish(self.ctx.js, topology.status_subject(self.node, kind), pending)
            except bus.INFRASTRUCTURE_ERRORS as exc:
                log.warning("status report %s not published (%s: %s); it goes out with the next one",
                            pending.id, type(exc).__name__, exc or "")
                return
            if self.unsent_reports.get(kind) is pending:  # else a newer one came meanwhile: it goes next
                del self.unsent_reports[kind]

    async def flush_reports(self, within: float = 10.0) -> None:
        """Wait (bounded) for the queued reports to be published: at stop, the last one says what the kernel
        holds."""
        if self.reporter is not None and not self.reporter.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reporter), within)


def _healthy(ctx: runtime.ServiceContext) -> bool:
    """kube-proxy's node health: no input waiting unhandled longer than the bound."""
    since = ctx.queued_since() if ctx.queued_since is not None else None
    return since is None or asyncio.get_running_loop().time() - since <= ctx.config.healthz_stale_after


def _node_state(data: bytes) -> tuple[int, events.SetNodeCalico] | None:
    """(delta seq, Calico state) of a node-subject message; None when it is not a usable one."""
    try:
        record = events.decode(data).record
    except events.ContractError:
        return None
    return _calico_of(record) if isinstance(record, events.PlanDelta) else None


def _calico_of(record: events.PlanDelta) -> tuple[int, events.SetNodeCalico] | None:
    if record.ops and isinstance(record.ops[-1], events.SetNodeCalico):
        return record.seq, record.ops[-1]
    return None


async def apply_plan(ctx: runtime.ServiceContext, kernel: Backend, rules: NftRules | None = None) -> None:
    cfg = ctx.config
    assert isinstance(cfg, ApplierConfig)
    log.info("kernel backend: %s; rules: %s", kernel.label, "nftables table inet kipvs" if rules else "none")
    await kernel.setup()
    applier = Applier(ctx, cfg.node, kernel, rules, cfg.drain_timeout, cfg.node_addresses == "interfaces",
                      cfg.endpoint_marks)
    applier.conntrack_cleanup = cfg.conntrack_cleanup
    applier.timeouts = Timeouts(cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout)
    applier.strict_arp = cfg.ipvs_strict_arp
    applier.exclude = exclude.ExcludeCIDRs(exclude.parse(cfg.ipvs_exclude_cidrs))
    await applier.health.serve_node_health(cfg.healthz_bind_address)
    try:
        ctx.set_not_ready(f"claiming node {cfg.node}")
        claim = applier.claim = node_claim.NodeClaim(ctx.js, cfg.node, ctx.metrics)
        if not await claim.take(ctx.stop):
            await kernel.close()
            return
        if ctx.restarted_because:
            ctx.set_not_ready(f"{ctx.restarted_because}; waiting for the new plan stream's first delta")
            if not await plan_consumer.wait_for_a_plan(ctx.js, ctx.stop):
                return
        ctx.set_not_ready("bootstrapping from the plan snapshot")
        await applier.bootstrap()
        drift_now = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, drift_now.set)

        async def idle() -> None:
            ctx.set_ready()

        inspection = await inspect.serve(
            ctx.nc, cfg.node, kernel,
            lambda: ("apply", applier.plan.seq, applier.local_addresses if applier.use_interfaces else ()),
            applier.read_kernel)
        # Created here, after the bootstrap, from the first plan-stream sequence the bootstrap did not read.
        keeper = plan_consumer.ConsumerKeeper(ctx.js, cfg.node, lambda: applier.stream_seq, guard=ctx.stream_guard)
        # superseded while bootstrapping: the durable is the newer applier's now, not to be recreated
        spec = await keeper.start(ctx.stop, held=claim.still_held)
        if spec is None:  # told to stop before the bus would create it, or superseded
            with contextlib.suppress(Exception):
                await inspection.unsubscribe()
            if claim.lost:
                ctx.set_not_ready(f"superseded: node {cfg.node} is applied by {claim.holder}")
                await claim.idle(ctx.stop)
            await kernel.close()
            return
        # The kernel holds the newest published plan: ready now, not after the first fetch that finds nothing
        # (it waits plan_consumer.FETCH_WAIT, and never ends empty under steady churn).
        ctx.set_ready()
        consumer = bus.DurableConsumer(ctx.js, spec, spec.config.durable_name or "applier", applier.handle,
                                       batch=cfg.batch, idle=idle, on_fetch_error=keeper.on_fetch_error,
                                       fetch_wait=plan_consumer.FETCH_WAIT)
        applier.consumer = consumer
        ctx.queued_since = consumer.queued_since

        runner = asyncio.create_task(consumer.run())
        drifter = asyncio.create_task(_drift_loop(ctx, applier, claim, drift_now, cfg.drift_period))
        drainer = asyncio.create_task(_drain_loop(ctx, applier))
        watcher = asyncio.create_task(_facts_loop(ctx, applier, kernel, cfg.drift_period))
        cacher = asyncio.create_task(_cache_loop(ctx, applier))
        stopping = asyncio.create_task(ctx.stop.wait())
        claimer = asyncio.create_task(claim.watch(ctx.stop))
        done, _ = await asyncio.wait({runner, drifter, drainer, stopping, claimer},
                                     return_when=asyncio.FIRST_COMPLETED)
        claimer.cancel()
        consumer.stop()
        drifter.cancel()
        drainer.cancel()
        watcher.cancel()
        cacher.cancel()
        await asyncio.gather(runner, drifter, drainer, watcher, cacher, return_exceptions=True)
        await applier.flush_reports()
        if claim.lost:  # superseded: idle, not ready, until stopped or the node is released (node_claim.py)
            with contextlib.suppress(Exception):  # `kipvs ipvs --node` must reach the applier of the node
                await inspection.unsubscribe()
            ctx.set_not_ready(f"superseded: node {cfg.node} is applied by {claim.holder}")
            ctx.queued_since = None
            await claim.idle(ctx.stop)
        elif ctx.stop.is_set() and not ctx.replaced:  # this process stops: hand the node over at once
            await claim.release()
        stopping.cancel()
        with contextlib.suppress(Exception):
            await inspection.unsubscribe()
        for task in done - {stopping, claimer}:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if not ctx.replaced:  # else the runtime starts apply_plan again on the same kernel
            await kernel.close()
    finally:
        await applier.health.close()


async def _drift_loop(ctx: runtime.ServiceContext, applier: Applier, claim: node_claim.NodeClaim,
                      drift_now: asyncio.Event, period: float) -> None:
    """A kernel read-back every ``period`` seconds (--drift-period) or at SIGUSR1, while this applier holds
    the node."""
    while not ctx.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drift_now.wait(), period)
        drift_now.clear()
        if not ctx.stop.is_set() and await claim.still_held():
            await applier.drift_check()


async def _drain_loop(ctx: runtime.ServiceContext, applier: Applier) -> None:
    while not ctx.stop.is_set():
        await asyncio.sleep(1.0)
        await applier.drain()


async def _cache_loop(ctx: runtime.ServiceContext, applier: Applier) -> None:
    """The node's plan written to --plan-cache (for a reboot without NATS); never a reason to stop applying."""
    cfg = ctx.config
    assert isinstance(cfg, ApplierConfig)
    if not cfg.plan_cache:
        return
    writer = plan_cache.CacheWriter(Path(cfg.plan_cache), cfg.node)
    while not ctx.stop.is_set():
        try:
            await writer.maybe_write(applier.plan, applier.calico, applier.calico_seq)
        except OSError as exc:
            log.warning("cannot write the plan cache %s: %s", cfg.plan_cache, exc.strerror)
        except Exception:  # the cache is a convenience: never let it stop the applier, but say why
            log.exception("cannot write the plan cache %s", cfg.plan_cache)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), writer.every)


async def _facts_loop(ctx: runtime.ServiceContext, applier: Applier, kernel: Backend, recheck: float) -> None:
    if isinstance(kernel, MemoryKernel):  # a simulated kernel: its facts, not this host's
        await applier.on_observation(node_facts.Observation(ipvs_available=True, kube_ipvs0="kipvs"))
        return
    await node_facts.watch(node_facts.NodeProbe(), applier.on_observation, ctx.stop, recheck=recheck)


def make_backend(cfg: ApplierConfig) -> Backend:
    if cfg.backend == "memory":
        return MemoryKernel()
    from .netlink_writer import NetlinkKernel

    return NetlinkKernel()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, ApplierConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(ApplierConfig, vars(args))
    kernel = make_backend(cfg)

    rules = None
    if cfg.rules == "nftables" and cfg.backend == "netlink" and not cfg.shadow:
        rules = NftRules(RulesConfig(cluster_cidrs=tuple(cfg.cluster_cidr), masquerade_all=cfg.masquerade_all))

    async def main() -> int:
        logs.setup(cfg.log_format, cfg.log_level)  # before NATS: the plan-cache restore logs what it did
        try:
            await kernel.check()
            if rules is not None:
                await rules.check()
        except CapabilityError as exc:
            print(f"kipvs applier: {exc}", file=sys.stderr)
            return 2
        if cfg.shadow:
            from .shadow import run_shadow

            # Read-only: no setup, no rules, no plan cache, no health ports (kube-proxy holds them).
            await runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel))
            await kernel.close()
            return 0
        if cfg.cleanup:
            if rules is not None:
                await rules.remove()
            await kernel.cleanup()
            await kernel.close()
            print(f"kipvs applier: removed everything kipvs owned on this node ({kernel.label})")
            return 0
        if cfg.backend == "memory":
            logging.getLogger("kipvs.applier").warning("--backend memory: a SIMULATED kernel, nothing is programmed")
        if cfg.plan_cache:
            await plan_cache.restore(Path(cfg.plan_cache), cfg.node, kernel)
        # No consumer here: apply_plan creates it after the bootstrap, where the bootstrap stopped reading.
        await runtime.run_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel, rules))
        return 0

    return asyncio.run(main())
