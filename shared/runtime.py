"""The service runtime the three services share.

It owns the process lifecycle, so each service's own code is only its job:

1. logging as configured;
2. NATS: the given URL, or the embedded server in the state directory (started if none runs there);
   connect with backoff, check the server version, create/update the topology and check it;
3. an HTTP server with ``/healthz`` (the process and its NATS connection are alive), ``/readyz`` (the
   service says it is ready, e.g. caught up) and ``/metrics`` (Prometheus text);
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

from . import bus, logs, topology
from .config import CommonConfig
from .embedded_nats import EmbeddedNats, default_state_dir
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
        log.info("using the embedded NATS server already running at %s (state in %s)", running.url, where)
        yield running.url
        return
    server = EmbeddedNats(where)
    await server.start()
    log.info("no --nats-url / NATS_URL: started an embedded NATS server at %s (state in %s)", server.url, where)
    try:
        yield server.url
    finally:
        await server.stop()


async def _start_http(ctx: ServiceContext, listen: str) -> web.AppRunner | None:
    if not listen:
        return None

    async def healthz(_: web.Request) -> web.Response:
        if ctx.nc.is_connected:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="NATS connection down\n")

    async def readyz(_: web.Request) -> web.Response:
        if ctx.ready and ctx.nc.is_connected:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=(ctx.ready_reason or "NATS connection down") + "\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=ctx.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    server = site._server
    sockets: list[socket.socket] = list(getattr(server, "sockets", []) or [])
    ctx.http_port = sockets[0].getsockname()[1] if sockets else int(port)
    log.info("health and metrics on http://%s:%d/ (healthz, readyz, metrics)", host, ctx.http_port)
    return runner


Main = Callable[[ServiceContext], Awaitable[None]]


async def run_service(name: str, config: CommonConfig, main: Main,
                      consumers: Sequence[topology.ConsumerSpec] = (),
                      stop: asyncio.Event | None = None) -> None:
    """Run one service until it returns or is told to stop (SIGTERM/SIGINT or ``stop``)."""
    logs.setup(config.log_format, config.log_level)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with nats_server_for(config) as url:
        nc = await bus.connect(url, f"kipvs-{name}", stop)
        try:
            js = await bus.setup(nc, config.nats_replicas, consumers)
            ctx = ServiceContext(name=name, config=config, nc=nc, js=js, stop=stop)
            runner = await _start_http(ctx, config.http_listen)
            try:
                task = asyncio.create_task(main(ctx), name=f"{name}-main")
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
                if runner is not None:
                    await runner.cleanup()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    log.info("%s stopped", name)
