"""The service runtime the three services share.

It owns the process lifecycle, so each service's own code is only its job:

1. logging as configured;
2. NATS: the given URL, or the embedded server in the state directory (started if none runs there);
   connect with backoff, check the server version, create/update the topology and check it;
3. an HTTP server with ``/healthz`` (the process and its NATS connection are alive), ``/readyz`` (the
   service says it is ready, e.g. caught up) and ``/metrics`` (the service instance's own
   prometheus_client registry, in the text exposition format; see shared/service/metrics.py);
4. SIGTERM/SIGINT set ``ctx.stop``; the service's main coroutine is expected to finish its batch in
   hand, ack it and return; then the runtime drains the NATS connection (flushing acks and publishes),
   stops the HTTP server and, if it started one, the embedded NATS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shared.contract import topology
from shared.messaging import bus
from shared.messaging.backoff import Backoff
from shared.messaging.embedded_nats import EmbeddedNats, EmbeddedNatsError, default_state_dir
from shared.messaging.stream_guard import StreamGuard
from shared.security import nats_credentials
from shared.security.nats_permissions import applier_durable
from shared.service import logs

from . import config
from .config import CommonConfig, StartupError
from .metrics import Registry

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
    # A stream this run of the service holds positions in was replaced (shared/messaging/stream_guard.py): why, once
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
      without being handled, and the service has not been without a NATS connection that the server
      closed for longer than that. A NATS outage alone does not make it fail (every node would restart
      and none would be better for it): while the server cannot be reached nats-py reconnects and no
      input arrives. A connection the server closed (an identity that expired, a callout refusing at
      reconnect, a certificate no longer trusted) is reopened by the runtime; if that has not worked
      within the bound the service cannot do its job while the server is there, which is what a restart
      by the liveness probe is for (and what makes it visible);
    - ``/readyz``: connected and caught up, as the service says (``set_ready``).
    """

    stale_after: float
    phase: str = "starting"
    ctx: ServiceContext | None = None
    main_task: asyncio.Task | None = None
    metrics: Registry = field(default_factory=Registry)
    # Event-loop time the server closed the connection for good, until a new one is set up; and why.
    closed_since: float | None = None
    closed_reason: str = ""

    def live(self) -> tuple[bool, str]:
        if self.main_task is not None and self.main_task.done():
            return False, "the service's main loop has ended"
        return True, "alive"

    def healthy(self) -> tuple[bool, str]:
        live, reason = self.live()
        if not live:
            return False, reason
        now = asyncio.get_running_loop().time()
        if self.closed_since is not None and now - self.closed_since > self.stale_after:
            return False, (f"the NATS connection was closed by the server {now - self.closed_since:.0f}s ago and "
                           f"is not reopened yet ({self.closed_reason}; bound {self.stale_after:.0f}s)")
        ctx = self.ctx
        since = ctx.queued_since() if ctx is not None and ctx.queued_since is not None else None
        if since is not None:
            waited = now - since
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


# /proxyMode on the metrics address, as kube-proxy's metrics server answers it (cmd/kube-proxy/app/server.go,
# serveMetrics: the mode as text/plain), for the service that is the node's proxy.
PROXY_MODES = {"applier": "ipvs"}


async def _start_http(health: Health, listen: str, proxy_mode: str = "") -> tuple[web.AppRunner | None, int]:
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
    async def mode(_: web.Request) -> web.Response:
        return web.Response(text=proxy_mode, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    if proxy_mode:
        app.router.add_get("/proxyMode", mode)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = config.listen_on(listen)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {listen} for health and metrics: {exc.strerror or exc}") from None
    server = site._server
    sockets: list[socket.socket] = list(getattr(server, "sockets", []) or [])
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("health and metrics on http://%s:%d/ (livez, healthz, readyz, metrics%s)", config.url_host(host), bound,
             ", proxyMode" if proxy_mode else "")
    return runner, bound


Main = Callable[[ServiceContext], Awaitable[None]]


# The streams each service's guard pins: checked every few seconds for the _POLLED services, by an applier
# only when its consumer fails (plan_consumer.py) or its plan feed reconnects or sees a sequence go back
# (plan_feed.py): a fleet polling would load the servers.
_GUARDED_STREAMS = {"watcher": (topology.KUBE_STREAM,), "planner": (topology.KUBE_STREAM, topology.PLAN_STREAM),
                    "applier": (topology.PLAN_STREAM,)}
_POLLED = ("watcher", "planner")


async def _restarting(name: str, main: Main, ctx: ServiceContext) -> None:
    """Run the service's main coroutine; when the bus fails under it (a server gone, a leader election,
    a full store), start it again after a back-off instead of exiting: every service's start is a
    recovery (the planner rebuilds from the log, the applier bootstraps, the watcher relists). When a stream
    it reads is replaced (a wiped store: :mod:`~shared.messaging.stream_guard`), it is told to stop, the topology
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
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                # Cancelled because the server closed the connection; the service's cleanup then failed on
                # the dead client, and that error must not swallow the cancellation.
                raise asyncio.CancelledError from exc
            delay = 0.0 if isinstance(exc, bus.RestartService) else backoff.next()
            if delay:
                ctx.set_not_ready(f"restarting after a bus failure: {type(exc).__name__}")
                log.warning("%s: the bus failed under the service (%s: %s); starting it again in %.1fs", name,
                            type(exc).__name__, exc or "", delay)
            else:
                ctx.set_not_ready(f"restarting: {exc}")
                log.info("%s: %s; starting it again", name, exc)
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
    """The connection was closed for good before the streams were set up (nats-py gives up on an
    authorization error)."""


# Seconds between looks at whether nats-py closed the client: it does not always call closed_cb (not
# for a refusal while reconnecting), and a look costs nothing.
CLOSED_POLL = 0.25

# The streams a service that may not declare them checks for (beside its consumers' own).
_NEEDED_STREAMS = {"watcher": (topology.KUBE_STREAM,), "planner": (topology.KUBE_STREAM, topology.PLAN_STREAM),
                   "applier": (topology.PLAN_STREAM,), "auth": ()}


async def client_auth(name: str, config: CommonConfig) -> nats_credentials.ClientAuth | None:
    """The service's identity on the bus (see :func:`shared.security.nats_credentials.for_service`); on the
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


@dataclass
class _Session:
    """One connection of a service and what it was made with; a new one after the server closed the last."""

    name: str
    auth: nats_credentials.ClientAuth | None
    refusals: list[str] = field(default_factory=list)  # the server's permission refusals, newest last
    nc: NATS | None = None

    def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            del self.refusals[:-9]
            self.refusals.append(str(exc))

    def wrong_role(self) -> StartupError:
        who = self.auth.describe() if self.auth is not None else "no identity"
        return StartupError(f"NATS refused this identity ({who}) what the {self.name} needs to start "
                            f"({self.refusals[-1]}): is it another role's? Each service needs its own "
                            "(--nats-nkey-file <role>.nk; an applier its token)")


async def _setup_streams(session: _Session, replicas: int, consumers: Sequence[topology.ConsumerSpec],
                         stop: asyncio.Event, health: Health, declare: bool = True,
                         streams: Sequence[str] = ()) -> JetStreamContext | None:
    """Create or check the streams and consumers, retrying while JetStream cannot answer yet (a cluster
    still electing its leaders, a server restarting) or, for a service that may not declare them, while
    they do not exist yet; None when told to stop first. StartupError when the server refused the
    identity a request (its role is not this service's: retrying cannot change that)."""
    nc = session.nc
    assert nc is not None
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
                raise _ConnectionClosed(bus.describe_refusal(nc.last_error or exc, session.auth)) from None
            if session.refusals:
                raise session.wrong_role() from None
            delay = backoff.next()
            health.phase = f"waiting for JetStream: {type(exc).__name__}: {exc or ''}"
            log.warning("JetStream cannot set up the streams yet (%s: %s); retrying in %.1fs", type(exc).__name__,
                        exc or "", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


async def _open(name: str, config: CommonConfig, url: str, consumers: Sequence[topology.ConsumerSpec],
                stop: asyncio.Event, health: Health, first: bool) -> tuple[_Session, JetStreamContext] | None:
    """A new connection, with the identity and CA files read now, and the streams set up or checked on it;
    None when told to stop first. After the first one, a file that cannot be read (mid-rotation) is retried."""
    backoff = Backoff(initial=1.0, maximum=30.0)
    while not stop.is_set():
        try:
            auth = await client_auth(name, config)
        except StartupError as exc:
            if first:
                raise
            delay = backoff.next()
            health.phase = f"cannot read the identity: {exc}"
            log.warning("%s: %s; retrying in %.1fs", name, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        session = _Session(name, auth)
        health.phase = f"connecting to NATS at {url}"
        try:
            session.nc = await bus.connect(url, f"kipvs-{name}", stop, auth=auth, on_error=session.on_error)
        except bus.Stopped as exc:
            log.info("%s: %s", name, exc)
            return None
        health.phase = "setting up the streams"
        try:
            # With an identity of its own, a service checks the topology; only the admin declares it.
            js = await _setup_streams(session, config.nats_replicas, consumers, stop, health,
                                      declare=_declares(auth),
                                      streams=_NEEDED_STREAMS.get(name, ()))
        except _ConnectionClosed as exc:
            # nats-py does not reconnect after the server refused the identity (an auth callout not
            # listening yet, a token rejected): start over with a new connection.
            log.warning("%s: NATS closed the connection (%s); connecting again", name, exc)
            continue
        except BaseException:
            await _close(session.nc)
            raise
        if js is None:
            await _close(session.nc)
            log.info("%s: stopped before the streams could be set up", name)
            return None
        return session, js
    return None


def _declares(auth: nats_credentials.ClientAuth | None) -> bool:
    """With an identity of its own, a service checks the topology; only the admin declares it."""
    return auth is None or not (auth.nkey_file or auth.token_file)


async def _close(nc: NATS | None) -> None:
    if nc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 10)
        with contextlib.suppress(Exception):
            await nc.close()


async def _until_closed(nc: NATS) -> None:
    while not nc.is_closed:  # noqa: ASYNC110 (see CLOSED_POLL)
        await asyncio.sleep(CLOSED_POLL)


# The tasks started (directly or not) by the service's main on one connection: see _track_tasks.
_SESSION_TASKS: contextvars.ContextVar[set[asyncio.Task] | None] = contextvars.ContextVar("kipvs_session_tasks",
                                                                                        default=None)


def _track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make every task created inside a session (a task inherits its creator's context) known to it, so that
    when the server closes the connection, the consumer loops, KV watchers, lease holders and report
    publishers the service's main started are ended with it: none goes on retrying on the dead client.
    Installed once per event loop, over any task factory already there."""
    previous = loop.get_task_factory()
    if getattr(previous, "kipvs_sessions", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future:
        task = previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
        context = kwargs.get("context")
        owned = context.get(_SESSION_TASKS) if context is not None else _SESSION_TASKS.get()
        if owned is not None and isinstance(task, asyncio.Task):
            owned.add(task)
            task.add_done_callback(owned.discard)
        return task

    factory.kipvs_sessions = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)  # type: ignore[arg-type]


async def _end_tasks(tasks: set[asyncio.Task]) -> None:
    """Cancel what a closed session left running and wait (bounded) for it to finish."""
    left = [t for t in tasks if not t.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=GRACE_SECONDS)


async def _run_session(name: str, main: Main, ctx: ServiceContext, health: Health, stop: asyncio.Event) -> bool:
    """Run the service's main on one connection until it returns, ``stop`` is set, or the server
    closes the connection for good; True in the last case (the main task and every task it started are
    then cancelled: nothing it made, consumer, watcher, subscription or lease, outlives its connection)."""
    _track_tasks(asyncio.get_running_loop())
    owned: set[asyncio.Task] = set()
    token = _SESSION_TASKS.set(owned)
    try:
        task = asyncio.create_task(_restarting(name, main, ctx), name=f"{name}-main")
    finally:
        _SESSION_TASKS.reset(token)
    health.main_task = task
    stopper = asyncio.create_task(stop.wait())
    closed = asyncio.create_task(_until_closed(ctx.nc))
    try:
        try:
            await asyncio.wait({task, stopper, closed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the runtime itself is cancelled: its service with it
            await _end_tasks({task, *owned})
            raise
        if closed.done() and not task.done() and not stop.is_set():
            health.main_task = None
            await _end_tasks({task, *owned})
            return True
        if not task.done():
            log.info("stopping %s: finishing the batch in hand", name)
            try:
                await asyncio.wait_for(task, GRACE_SECONDS)
            except TimeoutError:
                log.error("%s did not stop within %.0fs; cancelling", name, GRACE_SECONDS)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return False
    finally:
        stopper.cancel()
        closed.cancel()


async def run_service(name: str, config: CommonConfig, main: Main,
                      consumers: Sequence[topology.ConsumerSpec] = (),
                      stop: asyncio.Event | None = None) -> None:
    """Run one service until it returns or is told to stop (SIGTERM/SIGINT or ``stop``).

    The health endpoints come up first, so an unreachable NATS is visible (``/readyz`` says so, the log
    says why every retry) and SIGTERM ends the wait at once. The runtime owns the connection: when the
    server closes it for good (an identity that expired, a refusal at reconnect, a CA rotated), it
    connects again with the identity and CA files read again, sets up or checks the streams again and
    starts the service's main again on a new :class:`ServiceContext` (every start is a recovery).
    Raises StartupError for a user's mistake."""
    logs.setup(config.log_format, config.log_level)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _on_signals(loop, stop.set)
    health = Health(stale_after=config.healthz_stale_after, metrics=Registry(name))
    runner, port = await _start_http(health, config.http_listen, PROXY_MODES.get(name, ""))
    reopened = health.metrics.counter(
        "kipvs_nats_connections_reopened_total",
        "NATS connections the server closed for good (an identity expired, refused at reconnect) and the "
        "service opened again, with its identity and CA files read again")
    try:
        async with nats_server_for(config) as url:
            first = True
            while not stop.is_set():
                opened = await _open(name, config, url, consumers, stop, health, first)
                if opened is None:
                    return
                session, js = opened
                if not first:
                    reopened.inc()
                    log.info("%s: NATS connection reopened after %.1fs; starting the service again", name,
                             loop.time() - (health.closed_since or loop.time()))
                first = False
                assert session.nc is not None
                ctx = ServiceContext(name=name, config=config, nc=session.nc, js=js, stop=stop,
                                     metrics=health.metrics, http_port=port)
                health.ctx, health.closed_since = ctx, None

                async def redeclare(session: _Session = session) -> JetStreamContext | None:
                    return await _setup_streams(session, config.nats_replicas, consumers, stop, health,
                                                declare=_declares(session.auth), streams=_NEEDED_STREAMS.get(name, ()))

                ctx.redeclare = redeclare
                try:
                    closed = await _run_session(name, main, ctx, health, stop)
                finally:
                    await _close(session.nc)
                if not closed:
                    return
                _closed_for_good(name, session, ctx, health)
    finally:
        if runner is not None:
            await runner.cleanup()
        _on_signals(loop, None)
    log.info("%s stopped", name)


def _on_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None] | None) -> None:
    """SIGTERM and SIGINT call ``handler`` (None: their handlers are removed); where the loop cannot take
    signals (not the main thread, Windows), nothing."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            if handler is None:
                loop.remove_signal_handler(sig)
            else:
                loop.add_signal_handler(sig, handler)


def _closed_for_good(name: str, session: _Session, ctx: ServiceContext, health: Health) -> None:
    """The server closed the session's connection for good: not ready, with the reason, until the runtime's
    next connection (made with the identity and CA files read again) is up."""
    assert session.nc is not None
    health.ctx = None
    health.closed_since = asyncio.get_running_loop().time()
    health.closed_reason = bus.describe_refusal(session.nc.last_error, session.auth)
    health.phase = f"reconnecting: the server closed the connection ({health.closed_reason})"
    ctx.set_not_ready(health.phase)
    log.warning("%s: the server closed the NATS connection for good (%s); connecting again with the "
                "identity and CA files read again", name, health.closed_reason)
