"""The service runtime the three services share.

It owns the process lifecycle, so each service's own code is only its job:

1. logging as configured;
2. NATS: the given URL, or the embedded server in the state directory (started if none runs there);
   connect with backoff, check the server version, create/update the topology and check it;
3. an HTTP server with ``/healthz`` (the process and its NATS connection are alive), ``/readyz`` (the
   service says it is ready, e.g. caught up) and ``/metrics`` (the service instance's own
   prometheus_client registry, in the text exposition format; see shared/metrics.py);
4. SIGTERM/SIGINT set ``ctx.stop``; the service's main coroutine is expected to finish its batch in
   hand, ack it and return; then the runtime drains the NATS connection (flushing acks and publishes),
   stops the HTTP server and, if it started one, the embedded NATS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import bus, logs, nats_credentials, topology
from .backoff import Backoff
from .config import CommonConfig, StartupError
from .embedded_nats import EmbeddedNats, EmbeddedNatsError, default_state_dir
from .metrics import Registry
from .nats_permissions import applier_durable, applier_reader
from .stream_guard import StreamGuard

log = logging.getLogger("kipvs.runtime")

GRACE_SECONDS = 25.0  # below Kubernetes' default terminationGracePeriodSeconds (30)


@dataclass
class ServiceContext:
    name: str
    config: CommonConfig
    nc: NATS
    js: JetStreamContext
    stop: asyncio.Event
    metrics: Registry = field(default_factory=Registry)
    ready_reason: str = "starting"
    http_port: int = 0
    # When the oldest input not yet handled arrived (event-loop time), None when nothing waits: the
    # service's consumer sets it (see bus.DurableConsumer.queued_since); /healthz fails past the bound.
    queued_since: Callable[[], float | None] | None = None
    # A stream this run of the service holds positions in was replaced (shared/stream_guard.py): why, once
    # the runtime has told it to stop (``stop`` is then set, not the process's stop); "" otherwise.
    replaced: str = ""
    # Why this run started again ("" at the first start): the stream it was holding positions in was replaced.
    restarted_because: str = ""
    stream_guard: StreamGuard | None = None
    # Declares (or waits for) the topology again, as at the start; None when stopped first. Set by the runtime.
    redeclare: Callable[[], Awaitable[JetStreamContext | None]] | None = None

    @property
    def ready(self) -> bool:
        return self.ready_reason == ""

    def set_ready(self) -> None:
        if not self.ready:
            log.info("%s is ready", self.name)
        self.ready_reason = ""

    def set_not_ready(self, reason: str) -> None:
        self.ready_reason = reason


def state_dir(config: CommonConfig) -> Path:
    return Path(config.state_dir) if config.state_dir else default_state_dir()


@contextlib.asynccontextmanager
async def nats_server_for(config: CommonConfig):
    """Yield the NATS URL to use: the configured one, or an embedded server's."""
    if config.nats_url:
        yield config.nats_url
        return
    where = state_dir(config)
    running = EmbeddedNats.running_in(where)
    if running is not None:
        log.info("using the embedded NATS server already running at %s (state in %s)", running.client_url, where)
        yield running.client_url
        return
    server = EmbeddedNats(where)
    try:
        await server.start(stable=True)
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {where} for the embedded NATS server: "
                           f"{exc.strerror or exc} (set --state-dir / KIPVS_STATE_DIR, or --nats-url)") from None
    except EmbeddedNatsError as exc:
        raise StartupError(f"cannot start the embedded NATS server in {where}: {exc}") from None
    # It stays up when this service stops: the other services of the state directory use it too.
    log.info("no --nats-url / NATS_URL: started an embedded NATS server at %s (state in %s; it keeps running "
             "for every kipvs service there: 'kipvs nats --stop' stops it)", server.client_url, where)
    yield server.client_url


@dataclass
class Health:
    """What the HTTP endpoints report, from before NATS is reached until the service stops.

    - ``/livez``: the process's event loop answers and the service's main task has not ended;
    - ``/healthz`` (kube-proxy's meaning): no input has been waiting longer than ``stale_after`` seconds
      without being handled; a NATS outage alone does not make it fail (restarting cannot fix it);
    - ``/readyz``: connected and caught up, as the service says (``set_ready``).
    """

    stale_after: float
    phase: str = "starting"
    ctx: ServiceContext | None = None
    main_task: asyncio.Task | None = None
    metrics: Registry = field(default_factory=Registry)

    def live(self) -> tuple[bool, str]:
        if self.main_task is not None and self.main_task.done():
            return False, "the service's main loop has ended"
        return True, "alive"

    def healthy(self) -> tuple[bool, str]:
        live, reason = self.live()
        if not live:
            return False, reason
        ctx = self.ctx
        since = ctx.queued_since() if ctx is not None and ctx.queued_since is not None else None
        if since is not None:
            waited = asyncio.get_running_loop().time() - since
            if waited > self.stale_after:
                return False, f"input queued {waited:.0f}s ago is not handled yet (bound {self.stale_after:.0f}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        ctx = self.ctx
        if ctx is None:
            return False, self.phase
        if not ctx.nc.is_connected:
            return False, "NATS connection down"
        return (True, "ready") if ctx.ready else (False, ctx.ready_reason)


async def _start_http(health: Health, listen: str) -> tuple[web.AppRunner | None, int]:
    if not listen:
        return None, 0

    def endpoint(check: Callable[[], tuple[bool, str]]):
        async def handler(_: web.Request) -> web.Response:
            ok, reason = check()
            return web.Response(status=200 if ok else 503, text=reason + "\n")
        return handler

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = health.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/livez", endpoint(health.live))
    app.router.add_get("/healthz", endpoint(health.healthy))
    app.router.add_get("/readyz", endpoint(health.ready))
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {listen} for health and metrics: {exc.strerror or exc}") from None
    server = site._server
    sockets: list[socket.socket] = list(getattr(server, "sockets", []) or [])
    bound = sockets[0].getsockname()[1] if sockets else int(port)
    log.info("health and metrics on http://%s:%d/ (livez, healthz, readyz, metrics)", host or "127.0.0.1", bound)
    return runner, bound


Main = Callable[[ServiceContext], Awaitable[None]]


# The streams each service's guard pins: checked every few seconds for the _POLLED services, by an applier
# only when its consumer fails (services/applier/plan_consumer.py; a fleet polling would load the servers).
_GUARDED_STREAMS = {"watcher": (topology.KUBE_STREAM,), "planner": (topology.KUBE_STREAM, topology.PLAN_STREAM),
                    "applier": (topology.PLAN_STREAM,)}
_POLLED = ("watcher", "planner")


async def _restarting(name: str, main: Main, ctx: ServiceContext) -> None:
    """Run the service's main coroutine; when the bus fails under it (a server gone, a leader election,
    a full store), start it again after a back-off instead of exiting: every service's start is a
    recovery (the planner rebuilds from the log, the applier bootstraps, the watcher relists). When a stream
    it reads is replaced (a wiped store: :mod:`~kipvs.shared.stream_guard`), it is told to stop, the topology
    is declared again (or waited for) and it starts again from the new stream."""
    backoff = Backoff(initial=1.0, maximum=30.0)
    stop = ctx.stop
    while True:
        try:
            replaced = await _run_guarded(name, main, ctx, stop)
            if not replaced:
                return
            ctx.restarted_because = replaced
            ctx.set_not_ready(f"restarting: {replaced}")
            if not await _redeclare(name, ctx):
                return  # told to stop while waiting for the topology
            continue
        except bus.INFRASTRUCTURE_ERRORS as exc:
            ctx.stop = stop
            if stop.is_set():
                return
            delay = backoff.next()
            ctx.set_not_ready(f"restarting after a bus failure: {type(exc).__name__}")
            log.warning("%s: the bus failed under the service (%s: %s); starting it again in %.1fs", name,
                        type(exc).__name__, exc or "", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            # The failure may be a stream gone (a wiped store: NotFoundError is one of nats-py's errors):
            # declared again here (or waited for), else the next run fails the same way, forever.
            if not await _redeclare(name, ctx):
                return


async def _redeclare(name: str, ctx: ServiceContext) -> bool:
    """Declare (or wait for) the topology again before a restart; False when told to stop first. A server
    that refuses kipvs's config now is logged: the service's own start then says what it lacks."""
    if ctx.redeclare is None:
        return True
    try:
        return await ctx.redeclare() is not None
    except (_ConnectionClosed, topology.TopologyError) as exc:
        log.warning("%s: cannot declare the topology again (%s)", name, exc)
        return True


async def _run_guarded(name: str, main: Main, ctx: ServiceContext, stop: asyncio.Event) -> str:
    """One run of ``main`` with its streams guarded: ``ctx.stop`` is this run's own event, set by ``stop``
    or by the guard. Returns why the guard tripped ("" when it did not)."""
    run_stop = asyncio.Event()
    ctx.stop, ctx.replaced = run_stop, ""

    def trip(reason: str) -> None:
        ctx.replaced = reason
        run_stop.set()

    guard = StreamGuard(ctx.js, _GUARDED_STREAMS.get(name, ()), trip)
    ctx.stream_guard = guard
    await guard.pin()
    helpers = [asyncio.create_task(_forward(stop, run_stop))]
    if name in _POLLED:
        helpers.append(asyncio.create_task(guard.watch()))
    try:
        await main(ctx)
    finally:
        for task in helpers:
            task.cancel()
        ctx.stop = stop
    return "" if stop.is_set() else ctx.replaced


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class _ConnectionClosed(Exception):
    """The first connection was closed for good (nats-py gives up on an authorization error)."""


# The streams a service that may not declare them checks for (beside its consumers' own).
_NEEDED_STREAMS = {"watcher": (topology.KUBE_STREAM,), "planner": (topology.KUBE_STREAM, topology.PLAN_STREAM),
                   "applier": (topology.PLAN_STREAM,), "auth": ()}


async def client_auth(name: str, config: CommonConfig) -> nats_credentials.ClientAuth | None:
    """The service's identity on the bus (see :func:`kipvs.shared.nats_credentials.for_service`); on the
    embedded server, an applier's static per-node identity (made on first use). StartupError, one
    sentence, when a file given is missing or wrong."""
    node = getattr(config, "node", "")
    identity = applier_durable(node) if name == "applier" and node else name
    embedded = None if config.nats_url else state_dir(config) / nats_credentials.AUTH_DIR
    given = config.nats_nkey_file or config.nats_token_file or config.nats_ca_file
    try:
        if embedded is not None and name == "applier" and node and not given:
            running = EmbeddedNats.running_in(state_dir(config))
            if running is not None and running.secure and not running.callout:
                auth = await running.add_local_applier(node)
                auth.check()
                return auth
        auth = nats_credentials.for_service(identity, name, config.nats_nkey_file, config.nats_token_file,
                                            config.nats_ca_file, embedded, config.nats_tls_server_name)
        if auth is not None:
            auth.check()
    except nats_credentials.CredentialsError as exc:
        raise StartupError(str(exc)) from None
    return auth


async def _setup_streams(nc: NATS, replicas: int, consumers: Sequence[topology.ConsumerSpec], stop: asyncio.Event,
                         health: Health, declare: bool = True, streams: Sequence[str] = (),
                         role: str = "") -> JetStreamContext | None:
    """Create or check the streams and consumers, retrying while JetStream cannot answer yet (a cluster
    still electing its leaders, a server restarting) or, for a service that may not declare them, while
    they do not exist yet; None when told to stop first. StartupError, one sentence, when the server
    refused what the setup asked (another role's identity: retrying cannot help)."""
    backoff = Backoff(initial=0.5, maximum=10.0)
    while not stop.is_set():
        try:
            return await bus.setup(nc, replicas, consumers, declare=declare, streams=streams)
        except topology.NotDeclared as exc:
            delay = backoff.next()
            health.phase = f"waiting for the topology: {exc}"
            log.warning("%s; retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        except bus.INFRASTRUCTURE_ERRORS as exc:
            if nc.is_closed:
                raise _ConnectionClosed(bus.describe_refusal(nc.last_error or exc, None)) from None
            if "permissions violation" in str(nc.last_error or "").lower():
                raise StartupError(f"NATS refused this identity what the {role or 'service'} needs to start "
                                   f"({nc.last_error}): is it another role's? Each service needs its own "
                                   "(--nats-nkey-file <role>.nk; an applier its token)") from None
            delay = backoff.next()
            health.phase = f"waiting for JetStream: {type(exc).__name__}: {exc or ''}"
            log.warning("JetStream cannot set up the streams yet (%s: %s); retrying in %.1fs", type(exc).__name__,
                        exc or "", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


async def run_service(name: str, config: CommonConfig, main: Main,
                      consumers: Sequence[topology.ConsumerSpec] = (),
                      stop: asyncio.Event | None = None) -> None:
    """Run one service until it returns or is told to stop (SIGTERM/SIGINT or ``stop``).

    The health endpoints come up first, so an unreachable NATS is visible (``/readyz`` says so, the log
    says why every retry) and SIGTERM ends the wait at once. Raises StartupError for a user's mistake."""
    logs.setup(config.log_format, config.log_level)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    health = Health(stale_after=config.healthz_stale_after, metrics=Registry(name))
    runner, port = await _start_http(health, config.http_listen)
    try:
        async with nats_server_for(config) as url:
            auth = await client_auth(name, config)
            if name == "applier" and auth is not None and getattr(config, "node", ""):
                bus.READER_NAME.set(applier_reader(config.node))  # type: ignore[attr-defined]
            while True:
                health.phase = f"connecting to NATS at {url}"
                try:
                    nc = await bus.connect(url, f"kipvs-{name}", stop, auth=auth)
                except bus.Stopped as exc:
                    log.info("%s: %s", name, exc)
                    return
                health.phase = "setting up the streams"
                try:
                    # With an identity of its own, a service checks the topology; only the admin declares it.
                    js = await _setup_streams(nc, config.nats_replicas, consumers, stop, health,
                                              declare=auth is None or not (auth.nkey_file or auth.token_file),
                                              streams=_NEEDED_STREAMS.get(name, ()), role=name)
                    break
                except _ConnectionClosed as exc:
                    # nats-py does not reconnect after the server refused the identity (an auth callout
                    # not listening yet, a token rejected): start over with a new connection.
                    log.warning("%s: NATS closed the connection (%s); connecting again", name, exc)
            try:
                if js is None:
                    log.info("%s: stopped before the streams could be set up", name)
                    return
                ctx = ServiceContext(name=name, config=config, nc=nc, js=js, stop=stop, metrics=health.metrics,
                                     http_port=port)
                health.ctx = ctx

                async def redeclare(nc: NATS = nc) -> JetStreamContext | None:
                    return await _setup_streams(nc, config.nats_replicas, consumers, stop, health,
                                                declare=auth is None or not (auth.nkey_file or auth.token_file),
                                                streams=_NEEDED_STREAMS.get(name, ()))

                ctx.redeclare = redeclare
                task = asyncio.create_task(_restarting(name, main, ctx), name=f"{name}-main")
                health.main_task = task
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    log.info("stopping %s: finishing the batch in hand", name)
                    try:
                        await asyncio.wait_for(task, GRACE_SECONDS)
                    except TimeoutError:
                        log.error("%s did not stop within %.0fs; cancelling", name, GRACE_SECONDS)
                stopper.cancel()
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.drain(), 10)
    finally:
        if runner is not None:
            await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("%s stopped", name)
