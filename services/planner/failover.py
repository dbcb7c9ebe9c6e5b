"""Planner failover: several planners run, the holder of the lease plans, the others stand by warm.

One planner's life, in roles (each change logged and shown by ``kipvs_planner_leader_election_master_status``):

- **standby**: watch the lease (``lease.py``) and, meanwhile, replay the Kubernetes event log into a core
  of its own up to the planner consumer's ack floor (every record up to there has had its deltas published by
  the active planner, so nothing the standby computes is needed: it is discarded). A takeover then replays only
  what the dead planner had not acknowledged, not the whole log. Ready (``/readyz``) once caught up with that
  floor: a standby that can take over is what a rollout or a disruption budget should count.
- **active**: raise the fence (``fence.py``) first, then run the planner as a single one would
  (``active.plan``): read what is published, plan what the previous holder took but did not acknowledge,
  consume. It stays active until told to stop (it then releases the lease, so a standby takes over at once),
  or until it is deposed: the lease was taken, not renewed in time, or the plan stream refused a delta behind
  its fence. A deposed planner drops its core (it may hold deltas it never published) and stands by again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time

from shared.contract import topology
from shared.messaging import bus
from shared.service import runtime
from shared.service.config import StartupError

from .active import plan
from .core import Planner, tune_gc
from .fence import Deposed, raise_fence
from .lease import Lease
from .log_replay import replay_log
from .service_config import PlannerServiceConfig

log = logging.getLogger("kipvs.planner")


def default_identity() -> str:
    """``<hostname>_<pid>_<random>``: the pod's name in Kubernetes, unique among processes of one host (as
    client-go's ``<hostname>_<uuid>``)."""
    return f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}"


async def check_server(ctx: runtime.ServiceContext) -> None:
    """StartupError unless the server can fence: atomic batches on the plan stream (nats-server >= 2.12)."""
    v = ctx.nc.connected_server_version
    have = (v.major, v.minor, v.patch)
    info = await ctx.js.stream_info(topology.PLAN_STREAM)
    if have < topology.LEADER_ELECTION_SERVER_VERSION or not info.config.allow_atomic:
        need = ".".join(map(str, topology.LEADER_ELECTION_SERVER_VERSION))
        raise StartupError(f"--leader-elect needs nats-server >= {need} with atomic batch publish on the plan stream "
                           f"(the server is {'.'.join(map(str, have))}, allow_atomic "
                           f"{'on' if info.config.allow_atomic else 'off'}); run one planner without it, or upgrade")


async def _warm(ctx: runtime.ServiceContext, planner: Planner, period: float) -> None:
    """While standing by: follow the active planner's ack floor with our own core."""
    started, first = time.perf_counter(), True
    while True:
        try:
            info = await ctx.js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
            floor = info.ack_floor.stream_seq
            if floor > planner.source_seq:
                if first:  # later, a lag of one poll period is the normal state of a warm standby
                    ctx.set_not_ready(f"standby: replaying the Kubernetes event log up to seq {floor}")
                await replay_log(ctx.js, planner, floor)
            if first:
                tune_gc()
                log.info("standby: warm, %d logged records replayed in %.2fs (up to log seq %d)", planner.source_seq,
                         time.perf_counter() - started, planner.source_seq)
                first = False
            ctx.set_ready()
        except bus.INFRASTRUCTURE_ERRORS as exc:
            ctx.set_not_ready(f"standby: cannot read the event log ({type(exc).__name__})")
            log.warning("standby: cannot follow the event log (%s: %s)", type(exc).__name__, exc or "")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), period)
        if ctx.stop.is_set():
            return


async def _bus_failed(ctx: runtime.ServiceContext, lease: Lease, identity: str, exc: BaseException) -> None:
    """The bus failed under the active planner: let a standby (whose connection may be fine) take over at once
    rather than after the lease duration, and stand by again after a pause."""
    log.warning("planner %s: STANDBY, the bus failed under the active planner (%s: %s); lease released", identity,
                type(exc).__name__, exc or "")
    await lease.release()
    cfg = ctx.config
    assert isinstance(cfg, PlannerServiceConfig)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.stop.wait(), cfg.leader_elect_lease_duration)


async def _stand_by(ctx: runtime.ServiceContext, lease: Lease, planner: Planner, period: float) -> bool:
    """Keep ``planner`` warm until the lease is ours (True) or the service is told to stop (False)."""
    ctx.set_not_ready("standby: starting")
    warm = asyncio.create_task(_warm(ctx, planner, period), name="planner-warm")
    try:
        return await lease.acquire(ctx.stop)
    finally:
        warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm


async def run(ctx: runtime.ServiceContext, identity: str | None = None) -> None:
    """The planner service with leader election: alternate standby and active until told to stop."""
    cfg = ctx.config
    assert isinstance(cfg, PlannerServiceConfig)
    identity = identity or default_identity()
    m = ctx.metrics
    master = m.gauge("kipvs_planner_leader_election_master_status",
                     "1 while this planner is the active one, 0 while it stands by (client-go's "
                     "leader_election_master_status)")
    master.set(0)
    await check_server(ctx)
    lease = Lease(ctx.js, identity, cfg.lease_timing())
    planner: Planner | None = None
    log.info("planner %s: standby (leader election on; lease %s/%s)", identity, topology.PLANNER_LEASE_BUCKET,
             topology.PLANNER_LEASE_KEY)
    while not ctx.stop.is_set():
        planner = planner or cfg.new_planner()
        if not await _stand_by(ctx, lease, planner, cfg.leader_elect_retry_period):
            return
        took = time.monotonic()
        deposed = asyncio.Event()
        holder = asyncio.create_task(lease.hold(deposed), name="planner-lease")
        try:
            try:
                fence = await raise_fence(ctx.js, identity, lease.revision, lease.held)
            except Deposed as exc:
                log.warning("planner %s: took the lease but %s; standing by", identity, exc)
                planner = None
                continue
            master.set(1)
            log.info("planner %s: ACTIVE (lease revision %d, fence at plan stream seq %d%s; warm up to log seq %d)",
                     identity, lease.revision, fence.marker_seq,
                     f", took over from {lease.previous}" if lease.previous else "", planner.source_seq)
            await plan(ctx, planner, fence, deposed)
        except (bus.Retry, *bus.INFRASTRUCTURE_ERRORS) as exc:
            if deposed.is_set():  # refused behind another planner's fence while starting: deposed, below
                log.info("planner %s: %s", identity, exc)
            else:
                holder.cancel()  # no renewal racing the release
                await _bus_failed(ctx, lease, identity, exc)
                planner = None
                continue
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
            master.set(0)
        if ctx.stop.is_set() and not deposed.is_set():
            await lease.release()
            log.info("planner %s: stopped after %.1fs active; lease released", identity, time.monotonic() - took)
            return
        log.warning("planner %s: STANDBY, deposed after %.1fs active (another planner holds the lease); "
                    "rebuilding a warm state", identity, time.monotonic() - took)
        lease.revision = 0
        planner = None  # it may hold deltas it never published: replay from scratch while standing by
