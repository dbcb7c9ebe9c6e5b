"""A connection the server closes is reopened by the service runtime, whatever closed it (issue 21, item 1),
against a real nats-server with kipvs's secured configuration, the real auth callout and the simulator's
TokenRequest/TokenReview: an applier keeps applying past its identity's expiries, follows again after a server
restart with the callout down, and after the CA was rotated; its /healthz fails while it cannot apply."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.auth.main import AuthConfig, serve
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port
from shared.security import nats_credentials
from shared.service import config, runtime
from tests import kube
from tests.helpers import eventually, publish_kube, start_service
from tests.secure_nats import SecureNats
from tests.test_security import pod_token

KIPVS = str(Path(sys.executable).with_name("kipvs"))


class Callout:
    """``kipvs auth`` in this process, answering the server's authorization requests; ``kill`` ends it at
    once (as kill -9 would: no draining), ``start`` brings a new one up."""

    def __init__(self, server: SecureNats, sim, tmp_path: Path, ttl: float) -> None:
        kubeconfig = tmp_path / "auth-kubeconfig"
        kubeconfig.write_text(sim.kubeconfig())
        self.cfg = config.load(AuthConfig, {
            "nats_url": server.url, "http_listen": "", "kubeconfig": str(kubeconfig),
            "nats_nkey_file": str(server.dir / "auth.nk"), "nats_ca_file": str(server.dir / "ca.pem"),
            "issuer_nkey_file": str(server.dir / "issuer.nk"), "user_jwt_ttl": str(ttl)}, {})
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        listening = asyncio.Event()

        class Ready(logging.Handler):  # only the server may publish on $SYS.REQ.USER.AUTH: ask the log
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("answering NATS authorization requests"):
                    listening.set()

        ready = Ready()
        logging.getLogger("kipvs.auth").addHandler(ready)
        self.task = asyncio.create_task(runtime.run_service("auth", self.cfg, serve, stop=asyncio.Event()))
        try:
            await asyncio.wait_for(listening.wait(), 30)
        finally:
            logging.getLogger("kipvs.auth").removeHandler(ready)

    async def kill(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
            self.task = None


def service_lines(first: int, count: int) -> list[str]:
    """Watch lines of ``count`` Services with one endpoint each on node-a (ClusterIP 10.96.1.<i>)."""
    lines = []
    for i in range(first, first + count):
        svc = kube.service(f"s{i}", cluster_ip=f"10.96.1.{i}")
        svc["metadata"]["resourceVersion"] = str(1000 + i)
        sl = kube.endpoint_slice(f"s{i}-x", f"s{i}", [kube.endpoint(f"10.244.1.{i}")])
        sl["metadata"]["resourceVersion"] = str(2000 + i)
        lines += [json.dumps({"type": "ADDED", "object": svc}), json.dumps({"type": "ADDED", "object": sl})]
    return lines


def programmed(kernel: MemoryKernel, i: int) -> bool:
    return ("TCP", f"10.96.1.{i}", 80) in kernel.ipvs


class Pipeline:
    """The secured bus with the callout, the topology declared, a planner (static identity) and node-a's
    applier (a pod token through the callout) on a memory kernel; kube events are logged with the admin's."""

    def __init__(self, server: SecureNats, callout: Callout) -> None:
        self.server = server
        self.callout = callout
        self.kernel = MemoryKernel()
        self.tasks: list[tuple[asyncio.Task, asyncio.Event]] = []
        self.applier_cfg: ApplierConfig | None = None

    async def start(self, sim, tmp_path: Path, healthz_stale_after: float = 60.0) -> None:
        admin = await self.server.connect("admin")
        await bus.setup(admin, 1, [topology.planner_consumer()])
        node = kube.node("node-a", "192.0.2.1")
        node["metadata"]["resourceVersion"] = "1"
        await publish_kube(admin.jetstream(timeout=10), [json.dumps({"type": "ADDED", "object": node}),
                                                         *service_lines(1, 1)], "first")
        await admin.close()
        ca = str(self.server.dir / "ca.pem")
        common = {"nats_url": self.server.url, "nats_ca_file": ca}
        planner_cfg = config.load(PlannerServiceConfig, {**common, "http_listen": "",
                                                         "nats_nkey_file": str(self.server.dir / "planner.nk")}, {})
        self.tasks.append(start_service("planner", planner_cfg, plan))
        token = await pod_token(sim, tmp_path, "kipvs-applier-a1", "node-a")
        self.applier_cfg = config.load(ApplierConfig, {
            **common, "node": "node-a", "backend": "memory", "nats_token_file": str(token),
            "http_listen": f"127.0.0.1:{free_loopback_port()}", "healthz_bind_address": "",
            "healthz_stale_after": str(healthz_stale_after)}, {})
        self.tasks.append(start_service("applier", self.applier_cfg, lambda ctx: apply_plan(ctx, self.kernel)))
        await eventually(lambda: programmed(self.kernel, 1), 60, "node-a programmed")

    async def log_services(self, first: int, count: int, source: str) -> None:
        """Log Services as the watcher would, with the admin identity (its own connection each time: the
        server may be the one being restarted)."""
        admin = await self.server.connect("admin")
        try:
            await publish_kube(admin.jetstream(timeout=10), service_lines(first, count), source)
        finally:
            await admin.close()

    async def healthz(self) -> tuple[int, str]:
        assert self.applier_cfg is not None
        async with aiohttp.ClientSession() as http, http.get(
                f"http://{self.applier_cfg.http_listen}/healthz") as r:
            return r.status, await r.text()

    async def reopened(self) -> float:
        """The applier's kipvs_nats_connections_reopened_total."""
        assert self.applier_cfg is not None
        async with aiohttp.ClientSession() as http, http.get(f"http://{self.applier_cfg.http_listen}/metrics") as r:
            text = await r.text()
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("kipvs_nats_connections_reopened_total "))

    async def stop(self) -> None:
        for _, stop in self.tasks:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*(t for t, _ in self.tasks), return_exceptions=True), 60)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[SecureNats]:
    server = SecureNats(tmp_path / "nats", callout=True)
    server.start()
    yield server
    server.stop()


async def test_an_applier_keeps_applying_past_its_identitys_expiries(secured: SecureNats, sim, tmp_path: Path) -> None:
    """Issue 21 item 1: with the callout's user JWTs living 3 s, the server ends node-a's connection every 3 s;
    the applier connects again (its token read again, a new JWT) and goes on applying what is planned."""
    callout = Callout(secured, sim, tmp_path, ttl=3)
    await callout.start()
    pipeline = Pipeline(secured, callout)
    try:
        await pipeline.start(sim, tmp_path)
        for i in range(2, 12):  # about 11 s: three expiries and more
            await pipeline.log_services(i, 1, f"churn-{i}")
            await asyncio.sleep(1.0)
        await eventually(lambda: all(programmed(pipeline.kernel, i) for i in range(1, 12)), 60,
                         "every Service logged across the expiries programmed on node-a")
        assert await pipeline.reopened() >= 3
        status, text = await pipeline.healthz()
        assert status == 200, text
    finally:
        await pipeline.stop()
        await callout.kill()


def kill_server(server: SecureNats) -> None:
    """kill -9 of nats-server (its store stays)."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)


async def test_nodes_follow_again_after_a_server_restart_with_the_callout_down(secured: SecureNats, sim,
                                                                                tmp_path: Path) -> None:
    """Issue 21 item 1: kill -9 of the callout and of nats-server, nats-server started again and the callout
    only later: while the server refuses node-a (no callout answers), the applier cannot apply and, past its
    bound, /healthz says so (503); once the callout is back the applier connects again and follows."""
    callout = Callout(secured, sim, tmp_path, ttl=3600)
    await callout.start()
    pipeline = Pipeline(secured, callout)
    try:
        await pipeline.start(sim, tmp_path, healthz_stale_after=3.0)
        await callout.kill()
        kill_server(secured)
        secured.start()
        await pipeline.log_services(2, 1, "while-refused")
        deadline = asyncio.get_running_loop().time() + 30
        while (health := await pipeline.healthz())[0] == 200:
            assert asyncio.get_running_loop().time() < deadline, "healthz stayed 200 while node-a was refused"
            await asyncio.sleep(0.2)
        assert health[0] == 503 and "closed by the server" in health[1], health
        assert not programmed(pipeline.kernel, 2)
        await callout.start()
        await eventually(lambda: programmed(pipeline.kernel, 2), 60, "node-a to follow again")
        await pipeline.log_services(3, 1, "after")
        await eventually(lambda: programmed(pipeline.kernel, 3), 60, "node-a to apply what comes next")
        assert (await pipeline.healthz())[0] == 200
    finally:
        await pipeline.stop()
        await callout.kill()


async def test_a_plain_url_to_a_tls_server_says_so_and_sigterm_ends_the_wait(tmp_path: Path) -> None:
    """Issue 21 (medium): 'kipvs planner --nats-url nats://...' against a server that wants TLS, no CA file given:
    the log says why in one line and the wait is retried; SIGTERM ends it (it hung silently, deaf to SIGTERM)."""
    server = SecureNats(tmp_path)
    server.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            KIPVS, "planner", "--nats-url", f"nats://localhost:{server.port}", "--http-listen", "",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        try:
            said = ""
            while "not trusted" not in said:
                said = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
                assert said, "the planner ended without saying why it cannot connect"
            assert "--nats-ca-file" in said and "Traceback" not in said, said
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        server.stop()


async def test_services_follow_a_rotated_ca_reading_its_file_again(secured: SecureNats, sim, tmp_path: Path) -> None:
    """Issue 21 item 1: the CA is rotated (a new CA file, the server restarted with a certificate of the new
    CA): nats-py would reconnect forever with the TLS context of the old file; the services (callout,
    planner, applier) refuse the new certificate once, connect again reading the CA file again, and the
    pipeline goes on."""
    callout = Callout(secured, sim, tmp_path, ttl=3600)
    await callout.start()
    pipeline = Pipeline(secured, callout)
    try:
        await pipeline.start(sim, tmp_path)
        old_ca = (secured.dir / nats_credentials.CA_CERT).read_bytes()
        (secured.dir / nats_credentials.CA_CERT).unlink()
        (secured.dir / nats_credentials.CA_KEY).unlink()
        nats_credentials.ensure(secured.dir)
        assert (secured.dir / nats_credentials.CA_CERT).read_bytes() != old_ca
        kill_server(secured)
        secured.start()
        await pipeline.log_services(2, 1, "after-rotation")
        await eventually(lambda: programmed(pipeline.kernel, 2), 60, "node-a to follow after the CA rotation")
        assert await pipeline.reopened() >= 1
    finally:
        await pipeline.stop()
        await callout.kill()



async def test_healthz_fails_only_for_a_closed_connection_left_closed_past_the_bound() -> None:
    """The rule /healthz follows (pure logic): a connection the server closed fails it only once it has stayed
    closed longer than the bound; a NATS outage (nats-py reconnecting, nothing queued) never does."""
    health = runtime.Health(stale_after=5.0)
    now = asyncio.get_running_loop().time()
    assert health.healthy() == (True, "ok")  # starting, or an outage: no closed connection, nothing queued
    health.closed_since, health.closed_reason = now - 4.0, "the server refused our identity"
    assert health.healthy()[0]
    health.closed_since = now - 6.0
    ok, why = health.healthy()
    assert not ok and "closed by the server" in why and "refused our identity" in why, why
    health.closed_since = None  # reopened
    assert health.healthy()[0]
