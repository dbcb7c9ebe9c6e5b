"""The HTTP health answers kube-proxy serves on every node, served by the applier from its own plan.

- **Health-check node ports** (kube-proxy's pkg/proxy/healthcheck, service_health.go): for each Service
  with ``healthCheckNodePort`` (a LoadBalancer with externalTrafficPolicy Local), an HTTP server on that
  port of the node's addresses answers every request with 200 when the node has ready local endpoints for
  it and 503 when it has none, so a cloud load balancer sends traffic only to nodes with a pod. Body (as
  kube-proxy's): ``{"service": {"namespace": ..., "name": ...}, "localEndpoints": N,
  "serviceProxyHealthy": bool}``. Opened when the Service appears, updated with every delta, closed when
  it goes or its policy becomes Cluster.
- **Node health** (proxier_health.go), on ``--healthz-bind-address`` (kube-proxy's name, default
  ``0.0.0.0:10256``): ``/healthz`` is 200 while the applier handles its input within the bound, else 503,
  with ``{"lastUpdated", "currentTime", "nodeEligible"}``; ``/livez`` is 200 while the process runs.

:class:`HealthChecks` is the manager: after each batch (``on_applied``) the ports the plan asks for follow
the Services the batch touched; at bootstrap, every Service.

A port that cannot be bound (in use, an address the node does not have) is logged, counted in
``kipvs_applier_health_check_bind_errors_total`` and reported in ``problems``; never fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from shared.contract.events import ServicePlan
from shared.service import config

log = logging.getLogger("kipvs.applier")


def local_endpoints(plan: ServicePlan, node: str) -> int:
    """Ready endpoints of the Service on ``node``, each address once (kube-proxy's local endpoint count)."""
    return len({ep.ip for port in plan.ports for ep in port.endpoints if ep.node == node and ep.ready})


def wanted_ports(services: dict[str, ServicePlan], node: str) -> dict[str, tuple[int, int]]:
    """Service key -> (healthCheckNodePort, local endpoints) for the Services that have one."""
    return {key: (plan.health_check_node_port, local_endpoints(plan, node)) for key, plan in services.items()
            if plan.health_check_node_port}


def update_wanted(wanted: dict[str, tuple[int, int]], services: dict[str, ServicePlan], keys: Iterable[str],
                  node: str) -> bool:
    """Bring ``wanted`` (what :func:`wanted_ports` returns) up to date for the Services ``keys`` only, so that
    a change costs what it touches; True when an entry changed."""
    changed = False
    for key in keys:
        plan = services.get(key)
        entry = (plan.health_check_node_port, local_endpoints(plan, node)) if plan and plan.health_check_node_port \
            else None
        if wanted.get(key) != entry:
            changed = True
            if entry is None:
                del wanted[key]
            else:
                wanted[key] = entry
    return changed


class HealthServers:
    """Per-Service health-check node port servers and the node health server."""

    def __init__(self, healthy: Callable[[], bool], bind_errors: Any = None, healthz_total: Any = None,
                 livez_total: Any = None) -> None:
        self.healthy = healthy
        self.bind_errors = bind_errors
        # kube-proxy's proxy_healthz_total / proxy_livez_total{code} (pkg/proxy/metrics/metrics.go): the node
        # health server's answers by HTTP status, counted as proxier_health.go's handlers do.
        self.healthz_total = healthz_total
        self.livez_total = livez_total
        self.counts: dict[str, int] = {}  # Service key -> local endpoints, read by the handlers
        self.ports: dict[int, str] = {}  # port -> Service key it serves
        self.runners: dict[int, web.AppRunner] = {}
        self.addresses: tuple[str, ...] = ()
        self.problems: dict[int, str] = {}  # port -> why it is not served
        self.node_runner: web.AppRunner | None = None
        self.last_updated = time.time()

    def touched(self) -> None:
        self.last_updated = time.time()

    async def sync(self, wanted: dict[str, tuple[int, int]], addresses: tuple[str, ...]) -> None:
        """Serve exactly ``wanted`` on ``addresses``: open, move and close servers as needed."""
        self.counts = {key: count for key, (_, count) in wanted.items()}
        want_ports = {port: key for key, (port, _) in wanted.items()}
        if addresses != self.addresses:  # the node's addresses moved: every server is bound again
            for port in list(self.runners):
                await self._close(port)
            self.addresses = addresses
            self.problems.clear()  # a port that failed may bind on the new addresses
        for port in [p for p in self.runners if want_ports.get(p) != self.ports.get(p)]:
            await self._close(port)
        for port, key in sorted(want_ports.items()):
            self.ports[port] = key
            if port not in self.runners and port not in self.problems:
                await self._open(port, key)
        for port in [p for p in self.problems if p not in want_ports]:
            del self.problems[port]
        self.ports = dict(want_ports)

    async def _open(self, port: int, key: str) -> None:
        if not self.addresses:
            return  # no Node facts yet: opened once the node's addresses are known
        namespace, _, name = key.partition("/")

        async def answer(_: web.Request) -> web.Response:
            count = self.counts.get(self.ports.get(port, ""), 0)
            healthy = self.healthy()
            body = {"service": {"namespace": namespace, "name": name}, "localEndpoints": count,
                    "serviceProxyHealthy": healthy}
            return web.json_response(body, status=200 if count and healthy else 503,
                                     headers={"X-Content-Type-Options": "nosniff"})

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            for address in self.addresses:
                await web.TCPSite(runner, address, port).start()
        except OSError as exc:
            await runner.cleanup()
            self.problems[port] = f"cannot listen on port {port} for Service {key}: {exc.strerror or exc}"
            log.warning("health-check node port: %s", self.problems[port])
            if self.bind_errors is not None:
                self.bind_errors.inc()
            return
        self.runners[port] = runner
        log.info("health-check node port %d for Service %s on %s", port, key, ", ".join(self.addresses))

    async def _close(self, port: int) -> None:
        runner = self.runners.pop(port, None)
        if runner is not None:
            await runner.cleanup()
            log.info("health-check node port %d closed", port)

    async def serve_node_health(self, listen: str) -> None:
        """kube-proxy's node health server on ``listen`` (host:port; empty: none)."""
        if not listen:
            return

        async def healthz(_: web.Request) -> web.Response:
            healthy = self.healthy()
            now = datetime.now(UTC)
            body = {"lastUpdated": datetime.fromtimestamp(self.last_updated, UTC).isoformat(),
                    "currentTime": now.isoformat(), "nodeEligible": True}
            status = 200 if healthy else 503
            if self.healthz_total is not None:
                self.healthz_total.labels(str(status)).inc()
            return web.json_response(body, status=status)

        async def livez(_: web.Request) -> web.Response:
            if self.livez_total is not None:
                self.livez_total.labels("200").inc()
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/livez", livez)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = config.listen_on(listen)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            log.warning("node health: cannot listen on %s (%s); not served", listen, exc.strerror or exc)
            if self.bind_errors is not None:
                self.bind_errors.inc()
            return
        self.node_runner = runner

    async def close(self) -> None:
        for port in list(self.runners):
            await self._close(port)
        if self.node_runner is not None:
            await self.node_runner.cleanup()
            self.node_runner = None


class HealthChecks:
    """The health-check node ports the plan asks for, and the servers answering on them."""

    def __init__(self, node: str, servers: HealthServers) -> None:
        self.node = node
        self.servers = servers
        self.wanted: dict[str, tuple[int, int]] = {}  # wanted_ports, kept per change

    async def on_applied(self, services: dict[str, ServicePlan], touched: set[str] | None,
                         addresses: tuple[str, ...]) -> None:
        """Every Service's ports (``touched`` None: at bootstrap) or only those a batch touched; the servers
        are synced only when what they serve changed."""
        if touched is None:
            self.wanted = wanted_ports(services, self.node)
            changed = True
        else:
            changed = update_wanted(self.wanted, services, touched, self.node)
        if changed or addresses != self.servers.addresses:
            await self.servers.sync(self.wanted, addresses)
        self.servers.touched()
