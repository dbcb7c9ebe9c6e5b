"""``kipvs applier``: one per node. Plan deltas in, kernel writes out, reports back. This module wires and runs
(flags, the loops, start and stop); what happens to a batch is in shell.py, the decisions in core.py.

    check the kernel (precise error and exit 2 if it cannot do IPVS) -> set up link and sets
    bootstrap: the latest snapshot, resolved for this node; converge the kernel to it (diff after read-back)
    bootstrap Calico's state for this node: the last message on kipvs.plan.node.<node> (it is the whole state)
    take kipvs.plan.all + kipvs.plan.node.<node> from the plan feed (plan_feed.py: KIPVS_PLAN's republish by
    core-NATS subscription, a gap read from the stream; --plan-feed consumer: one durable consumer):
        apply each delta to the shared plan (skip what the snapshot already had; a gap re-bootstraps)
        re-resolve only the Services the batch touched (all of them if this node's facts changed)
        write the operations, then move the position on (ack); an apply report, paced (reports.py)
        a node delta replaces the node's Calico state; in enforce mode the endpoint-mark rules follow
    every --drift-period (and on SIGUSR1): read the kernel back, repair any difference, report it
    on every link change (netlink) and every --drift-period: publish the node's facts when they change
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import msgspec
from nats.aio.subscription import Subscription

from shared.contract import topology
from shared.service import config, kube_proxy_config, logs, runtime
from shared.service.config import describe

from . import exclude, inspect, node_claim, node_facts, plan_cache, plan_consumer, plan_feed, report_pacer, takeover
from .conntrack_settings import Conntrack
from .drift_slices import SERVICES_PER_CHECK
from .kernel.backend import Backend, CapabilityError, MemoryKernel
from .kernel.netlink_writer import NetlinkKernel
from .kernel.rules import NftRules, RulesConfig
from .node_settings import Timeouts
from .shadow import run_shadow
from .shell import Applier, ApplierSettings

log = logging.getLogger("kipvs.applier")
KUBE_PROXY_METRICS = "127.0.0.1:10249"  # kube-proxy's --metrics-bind-address default
KUBE_PROXY_METRICS_PORT = 10249
SHADOW_METRICS = "127.0.0.1:0"  # where a shadow's metrics go instead: a free loopback port, logged


class ApplierConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    KUBE_PROXY: ClassVar[bool] = True  # takes a kube-proxy file's own addresses (kube_proxy_config.Setting)
    node: Annotated[str, describe(
        "this node's name, as in its Node object (in Kubernetes: spec.nodeName; kube-proxy's "
        "--hostname-override)")] = ""
    http_listen: Annotated[str, describe(
        "host:port for /metrics, /proxyMode, /healthz, /livez and /readyz: kube-proxy's "
        "--metrics-bind-address, with its default (with --shadow, where kube-proxy holds that port, any "
        "address on port 10249 becomes a free loopback port); port 0: any free port, logged; empty disables "
        "it")] = KUBE_PROXY_METRICS
    backend: Annotated[Literal["netlink", "memory"], describe(
        "netlink: this host's kernel; memory: a simulated kernel for dry runs (programs nothing)")] = "netlink"
    drift_period: Annotated[float, describe(
        "seconds between kernel read-backs (kube-proxy's --ipvs-sync-period, ipvs.syncPeriod, sets it)"),
        msgspec.Meta(gt=0), config.SECONDS] = 60.0
    drift_check_services: Annotated[int, describe(
        "IPVS services whose real servers one drift check (or shadow comparison) reads; the others' in the next "
        "ones, so a drifted real server is found within ceil(services / this) periods"),
        msgspec.Meta(ge=1)] = SERVICES_PER_CHECK
    batch: Annotated[int, describe("plan deltas fetched per batch"), msgspec.Meta(ge=1, le=10_000)] = 500
    drain_timeout: Annotated[float, describe(
        "seconds a removed TCP real server may drain (weight 0) before deletion; 0: at once"),
        msgspec.Meta(ge=0), config.SECONDS] = 300.0
    cleanup: Annotated[bool, describe("remove everything kipvs owns on this node, then exit")] = False
    node_addresses: Annotated[Literal["node", "interfaces"], describe(
        "NodePort addresses: node = the InternalIPs of the Node object (as kipvs plan --node), interfaces = "
        "this host's own addresses, as kube-proxy does")] = "node"
    nodeport_cidrs: Annotated[list[str], describe(
        "only the node's addresses (as --node-addresses finds them) inside these CIDRs serve NodePorts and "
        "health-check node ports (kube-proxy's --nodeport-addresses sets it); empty: all of them")] = []
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
        "--ipvs-tcp-timeout, ipvsadm --set)"), msgspec.Meta(ge=0), config.SECONDS] = 0
    ipvs_tcpfin_timeout: Annotated[int, describe(
        "IPVS timeout for TCP connections after FIN, seconds; 0 leaves the kernel's value "
        "(kube-proxy's --ipvs-tcpfin-timeout)"), msgspec.Meta(ge=0), config.SECONDS] = 0
    ipvs_udp_timeout: Annotated[int, describe(
        "IPVS timeout for UDP flows, seconds; 0 leaves the kernel's value (kube-proxy's --ipvs-udp-timeout)"),
        msgspec.Meta(ge=0), config.SECONDS] = 0
    conntrack_max_per_core: Annotated[int, describe(
        "nf_conntrack_max = this x CPUs (at least --conntrack-min); 0 leaves the node's (kube-proxy's "
        "--conntrack-max-per-core, whose default is 32768)"), msgspec.Meta(ge=0)] = 0
    conntrack_min: Annotated[int, describe(
        "the least nf_conntrack_max that --conntrack-max-per-core sets (kube-proxy's --conntrack-min)"),
        msgspec.Meta(ge=0)] = 0
    conntrack_tcp_timeout_established: Annotated[int, describe(
        "nf_conntrack_tcp_timeout_established, seconds; 0 leaves the node's (kube-proxy's "
        "--conntrack-tcp-timeout-established, default there 24h)"), msgspec.Meta(ge=0), config.SECONDS] = 0
    conntrack_tcp_timeout_close_wait: Annotated[int, describe(
        "nf_conntrack_tcp_timeout_close_wait, seconds; 0 leaves the node's (kube-proxy's "
        "--conntrack-tcp-timeout-close-wait, default there 1h)"), msgspec.Meta(ge=0), config.SECONDS] = 0
    conntrack_tcp_be_liberal: Annotated[bool, describe(
        "nf_conntrack_tcp_be_liberal=1: out-of-window TCP packets are not INVALID (kube-proxy's "
        "--conntrack-tcp-be-liberal)")] = False
    conntrack_udp_timeout: Annotated[int, describe(
        "nf_conntrack_udp_timeout, seconds; 0 leaves the node's (kube-proxy's --conntrack-udp-timeout)"),
        msgspec.Meta(ge=0), config.SECONDS] = 0
    conntrack_udp_timeout_stream: Annotated[int, describe(
        "nf_conntrack_udp_timeout_stream, seconds; 0 leaves the node's (kube-proxy's "
        "--conntrack-udp-timeout-stream)"), msgspec.Meta(ge=0), config.SECONDS] = 0
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

    plan_feed: Annotated[Literal["feed", "consumer"], describe(
        "feed: the plan by core-NATS subscription to what KIPVS_PLAN republishes, read from the stream only to "
        "repair a gap; consumer: a durable consumer per node (before issue 27; also taken when the stream does "
        "not republish)")] = "feed"
    report_interval: Annotated[float, describe(
        "seconds between two apply reports of this node on kipvs.status.<node>.applied: a burst of changes is "
        "one report, the newest (0: one per batch)"), msgspec.Meta(ge=0, le=60),
        config.SECONDS] = report_pacer.REPORT_INTERVAL
    busy_report_interval: Annotated[float, describe(
        "seconds between two reports of one kind once a node is busy (3 reports in a row held back for "
        "--report-interval), until one goes out at once again; the last one when the churn ends goes out a quiet "
        "--report-interval after it; kipvs status sees a busy node's position up to this late (0, or a value "
        "below --report-interval: --report-interval, no wider pace)"), msgspec.Meta(ge=0, le=60),
        config.SECONDS] = report_pacer.BUSY_REPORT_INTERVAL

    shadow: Annotated[bool, describe(
        "shadow mode, for migrations: program nothing and compare the kernel (kube-proxy's IPVS table, "
        "kube-ipvs0 addresses, ipsets) with kipvs's plan every --shadow-sync-period; divergences go to "
        "kipvs.status.<node>.shadow, kipvs_shadow_divergences and kipvs status")] = False
    shadow_sync_period: Annotated[float, describe(
        "seconds between shadow comparisons (as kube-proxy's --ipvs-sync-period)"), msgspec.Meta(gt=0),
        config.SECONDS] = 30.0
    adopt: Annotated[bool, describe(
        "take the node over from kube-proxy's IPVS mode in place: its virtual services in kipvs's plan become "
        "kipvs's own as they are, only differences are written, and kube-proxy's iptables chains are removed "
        "once kipvs's nftables table is in place (docs/architecture.md, 'Takeover')")] = False
    hand_back: Annotated[bool, describe(
        "leave this node to kube-proxy in place, then exit: remove kipvs's nftables table and ownership "
        "records, keep IPVS, kube-ipvs0 and the ipsets for kube-proxy to adopt (run it once kube-proxy runs)")] \
        = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.node:
            raise ValueError("node is required (--node, KIPVS_NODE, kube-proxy's --hostname-override or "
                             "hostnameOverride): the name of this node's Node object")
        topology.token(self.node)
        if self.shadow and self.cleanup:
            raise ValueError("shadow and cleanup exclude each other: shadow mode never changes the kernel")
        if sum((self.shadow, self.cleanup, self.hand_back, self.adopt)) > 1:
            raise ValueError("shadow, cleanup, hand-back and adopt exclude each other")
        config.check_listen("healthz_bind_address", self.healthz_bind_address)
        exclude.parse(self.ipvs_exclude_cidrs)
        # canonical forms, read as kube-proxy reads its CIDR flags (ParseCIDRSloppy)
        self.nodeport_cidrs = kube_proxy_config.cidrs(self.nodeport_cidrs, "nodeport_cidrs")
        self.cluster_cidr = kube_proxy_config.cidrs(self.cluster_cidr, "cluster_cidr")
        if self.shadow and self.http_listen and config.listen_on(self.http_listen)[1] == KUBE_PROXY_METRICS_PORT:
            # kube-proxy, which the shadow runs beside, holds that port on some address (`:10249` and
            # `0.0.0.0:10249` from its own ConfigMap collide with it as much as its default does)
            self.http_listen = SHADOW_METRICS


def settings_of(cfg: ApplierConfig) -> ApplierSettings:
    return ApplierSettings(drain_timeout=cfg.drain_timeout, interface_addresses=cfg.node_addresses == "interfaces",
                           endpoint_marks=cfg.endpoint_marks, conntrack_cleanup=cfg.conntrack_cleanup,
                           timeouts=Timeouts(cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout),
                           strict_arp=cfg.ipvs_strict_arp, report_interval=cfg.report_interval,
                           busy_report_interval=cfg.busy_report_interval,
                           drift_check_services=cfg.drift_check_services,
                           nodeport_cidrs=tuple(cfg.nodeport_cidrs), adopt=cfg.adopt,
                           exclude=exclude.ExcludeCIDRs(exclude.parse(cfg.ipvs_exclude_cidrs)),
                           conntrack=Conntrack(cfg.conntrack_max_per_core, cfg.conntrack_min,
                                               cfg.conntrack_tcp_timeout_established,
                                               cfg.conntrack_tcp_timeout_close_wait, cfg.conntrack_tcp_be_liberal,
                                               cfg.conntrack_udp_timeout, cfg.conntrack_udp_timeout_stream))


async def apply_plan(ctx: runtime.ServiceContext, kernel: Backend, rules: NftRules | None = None) -> None:
    """The applier service: claim the node, bootstrap, consume the plan with the loops beside it, stop."""
    cfg = ctx.config
    assert isinstance(cfg, ApplierConfig)
    log.info("kernel backend: %s; rules: %s", kernel.label, "nftables table inet kipvs" if rules else "none")
    await kernel.setup()
    applier = Applier(ctx, cfg.node, kernel, rules, settings_of(cfg))
    await applier.health.serve_node_health(cfg.healthz_bind_address)
    try:
        claim = await _claim_and_bootstrap(ctx, applier)
        if claim is None:
            return
        drift_now = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, drift_now.set)
        core = applier.core
        inspection = await inspect.serve(
            ctx.nc, cfg.node, kernel,
            lambda: ("apply", core.plan.seq, core.local_addresses if core.use_interfaces else ()),
            applier.read_kernel, tuple(map(str, applier.exclude.networks)))
        consumer = await _start_consumer(ctx, applier, claim, inspection)
        if consumer is None:
            return
        done = await _run(ctx, applier, claim, consumer, drift_now)
        await _stop(ctx, applier, claim, inspection)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if not ctx.replaced:  # else the runtime starts apply_plan again on the same kernel
            await kernel.close()
    finally:
        if applier.claim is not None:
            await applier.claim.close()
        await applier.health.close()


async def _claim_and_bootstrap(ctx: runtime.ServiceContext, applier: Applier) -> node_claim.NodeClaim | None:
    """Claim the node (one applier per node), wait for a new plan stream if restarted for one, bootstrap.
    None: stop here (told to stop, or no plan came)."""
    node = applier.node
    ctx.set_not_ready(f"claiming node {node}")
    claim = applier.claim = node_claim.NodeClaim(ctx.js, node, ctx.metrics, nc=ctx.nc)
    if not await claim.take(ctx.stop):
        await applier.kernel.close()
        return None
    if ctx.restarted_because:
        ctx.set_not_ready(f"{ctx.restarted_because}; waiting for the new plan stream's first delta")
        if not await plan_consumer.wait_for_a_plan(ctx.js, ctx.stop):
            return None
    ctx.set_not_ready("bootstrapping from the plan snapshot")
    await applier.bootstrap()
    return claim


async def _start_consumer(ctx: runtime.ServiceContext, applier: Applier, claim: node_claim.NodeClaim,
                          inspection: Subscription) -> plan_feed.PlanInput | None:
    """The node's plan input (plan_feed.py; the durable consumer on a plan stream that does not republish),
    opened after the bootstrap, from the first plan-stream sequence the bootstrap did not read. None: told to
    stop first, or superseded while bootstrapping (a durable is the newer applier's then, not to be
    recreated)."""
    cfg = ctx.config
    assert isinstance(cfg, ApplierConfig)
    consumer = await plan_feed.open_input(ctx, cfg.node, applier.handle, lambda: applier.stream_seq, cfg.batch,
                                          functools.partial(_ready, ctx), claim.still_held, cfg.plan_feed,
                                          applier.plan_reader)
    if consumer is None:
        with contextlib.suppress(Exception):
            await inspection.unsubscribe()
        if claim.lost:
            ctx.set_not_ready(f"superseded: node {cfg.node} is applied by {claim.holder}")
            await claim.idle(ctx.stop)
        await applier.kernel.close()
        return None
    # The kernel holds the newest published plan: ready now, not after the first fetch that finds nothing
    # (it waits plan_consumer.FETCH_WAIT, and never ends empty under steady churn).
    ctx.set_ready()
    applier.consumer = consumer
    ctx.queued_since = consumer.queued_since
    return consumer


async def _ready(ctx: runtime.ServiceContext) -> None:
    ctx.set_ready()


async def _run(ctx: runtime.ServiceContext, applier: Applier, claim: node_claim.NodeClaim,
               consumer: plan_feed.PlanInput, drift_now: asyncio.Event) -> set[asyncio.Task]:
    """Consume with the loops beside it until one ends, the service stops or the claim is lost; the tasks
    that ended (their exceptions are the caller's to raise)."""
    cfg = ctx.config
    assert isinstance(cfg, ApplierConfig)
    runner = asyncio.create_task(consumer.run())
    drifter = asyncio.create_task(_drift_loop(ctx, applier, claim, drift_now, cfg.drift_period))
    drainer = asyncio.create_task(_drain_loop(ctx, applier))
    watcher = asyncio.create_task(_facts_loop(ctx, applier, cfg.drift_period))
    cacher = asyncio.create_task(_cache_loop(ctx, applier))
    stopping = asyncio.create_task(ctx.stop.wait())
    claimer = asyncio.create_task(claim.watch(ctx.stop))
    done, _ = await asyncio.wait({runner, drifter, drainer, stopping, claimer}, return_when=asyncio.FIRST_COMPLETED)
    claimer.cancel()
    consumer.stop()
    for task in (drifter, drainer, watcher, cacher):
        task.cancel()
    await asyncio.gather(runner, drifter, drainer, watcher, cacher, return_exceptions=True)
    stopping.cancel()
    return done - {stopping, claimer}


async def _stop(ctx: runtime.ServiceContext, applier: Applier, claim: node_claim.NodeClaim,
                inspection: Subscription) -> None:
    """The last report out; superseded: idle, not ready, until stopped or the node is released
    (node_claim.py); stopping: hand the node over at once."""
    await applier.reports.flush()
    if claim.lost:
        with contextlib.suppress(Exception):  # `kipvs ipvs --node` must reach the applier of the node
            await inspection.unsubscribe()
        ctx.set_not_ready(f"superseded: node {applier.node} is applied by {claim.holder}")
        ctx.queued_since = None
        await claim.idle(ctx.stop)
    elif ctx.stop.is_set() and not ctx.replaced:
        await claim.release()
    with contextlib.suppress(Exception):
        await inspection.unsubscribe()


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
    core = applier.core
    while not ctx.stop.is_set():
        try:
            await writer.maybe_write(core.plan, core.calico, core.calico_seq)
        except OSError as exc:
            log.warning("cannot write the plan cache %s: %s", cfg.plan_cache, exc.strerror)
        except Exception:  # the cache is a convenience: never let it stop the applier, but say why
            log.exception("cannot write the plan cache %s", cfg.plan_cache)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), writer.every)


async def _facts_loop(ctx: runtime.ServiceContext, applier: Applier, recheck: float) -> None:
    publisher = applier.facts_publisher
    if isinstance(applier.kernel, MemoryKernel):  # a simulated kernel: its facts, not this host's
        await publisher.on_observation(node_facts.Observation(ipvs_available=True, kube_ipvs0="kipvs"))
        return
    await node_facts.watch(node_facts.NodeProbe(), publisher.on_observation, ctx.stop, recheck=recheck)


def make_backend(cfg: ApplierConfig) -> Backend:
    if cfg.backend == "memory":
        return MemoryKernel()
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
            # Read-only: no setup, no rules, no plan cache, no health ports (kube-proxy holds them).
            if cfg.http_listen == SHADOW_METRICS:
                log.info("shadow mode: kube-proxy holds port %d, so metrics are on a free loopback port "
                         "(logged below); --http-listen (kube-proxy's --metrics-bind-address) with another "
                         "port chooses it", KUBE_PROXY_METRICS_PORT)
            await runtime.run_service("applier", cfg, lambda ctx: run_shadow(ctx, kernel))
            await kernel.close()
            return 0
        if cfg.hand_back:
            if cfg.backend != "netlink":
                print("kipvs applier: --hand-back needs --backend netlink", file=sys.stderr)
                return 2
            await takeover.hand_back(kernel, rules)  # type: ignore[arg-type]
            await kernel.close()
            print("kipvs applier: handed this node back: kipvs's nftables table and ownership records removed; "
                  "IPVS, kube-ipvs0 and the ipsets left for kube-proxy")
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
            await plan_cache.restore(Path(cfg.plan_cache), cfg.node, kernel,
                                     exclude.ExcludeCIDRs(exclude.parse(cfg.ipvs_exclude_cidrs)), rules,
                                     cfg.endpoint_marks)
        # No consumer here: apply_plan creates it after the bootstrap, where the bootstrap stopped reading.
        await runtime.run_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel, rules))
        return 0

    return asyncio.run(main())
