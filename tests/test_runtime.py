"""The service runtime: health, readiness and metrics over HTTP, the embedded default NATS, stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import nats
import pytest

from shared.contract import topology
from shared.messaging.embedded_nats import EmbeddedNats
from shared.service import config, runtime
from tests.helpers import eventually


async def test_http_endpoints_follow_service_state(nats_url: str) -> None:
    cfg = config.load(config.CommonConfig, {"nats_url": nats_url}, {})
    stop = asyncio.Event()
    seen: dict[str, tuple[int, str]] = {}

    async def main(ctx: runtime.ServiceContext) -> None:
        ctx.metrics.counter("kipvs_test_things_total", "things").inc(3)
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{ctx.http_port}"
            for path in ("/healthz", "/readyz"):
                async with http.get(base + path) as r:
                    seen["before " + path] = (r.status, await r.text())
            ctx.set_ready()
            async with http.get(base + "/readyz") as r:
                seen["after /readyz"] = (r.status, await r.text())
            async with http.get(base + "/metrics") as r:
                seen["/metrics"] = (r.status, await r.text())
        await ctx.stop.wait()

    task = asyncio.create_task(runtime.run_service("test", cfg, main, stop=stop))
    await eventually(lambda: len(seen) >= 4)
    stop.set()
    await task
    assert seen["before /healthz"] == (200, "ok\n")
    assert seen["before /readyz"] == (503, "starting\n")
    assert seen["after /readyz"] == (200, "ready\n")
    assert "kipvs_test_things_total 3" in seen["/metrics"][1]


async def test_an_ipv6_listen_address_is_logged_in_brackets(caplog: pytest.LogCaptureFixture) -> None:
    """``--http-listen ::1:0`` (kube-proxy's ``[::1]:0`` reads the same): the log gives a URL one can paste."""
    caplog.set_level("INFO", logger="kipvs.runtime")
    runner, port = await runtime._start_http(runtime.Health(stale_after=5.0), "::1:0")
    try:
        assert f"health and metrics on http://[::1]:{port}/ " in caplog.text, caplog.text
        async with aiohttp.ClientSession() as http, http.get(f"http://[::1]:{port}/livez") as r:
            assert r.status == 200
    finally:
        assert runner is not None
        await runner.cleanup()
    assert [config.url_host(h) for h in (None, "0.0.0.0", "::")] == ["*", "0.0.0.0", "[::]"]


async def test_embedded_default_starts_a_server_and_a_second_service_reuses_it(tmp_path: Path) -> None:
    cfg = config.load(config.CommonConfig, {"state_dir": str(tmp_path), "http_listen": ""}, {})
    stop = asyncio.Event()
    urls: list[str] = []

    async def main(ctx: runtime.ServiceContext) -> None:
        urls.append(ctx.nc.connected_url.netloc)
        info = await ctx.js.stream_info(topology.KUBE_STREAM)
        assert info.config.name == topology.KUBE_STREAM
        reused = EmbeddedNats.running_in(tmp_path)
        assert reused is not None
        urls.append(f"127.0.0.1:{reused.port}")
        await ctx.stop.wait()

    task = asyncio.create_task(runtime.run_service("test", cfg, main, stop=stop))
    await eventually(lambda: len(urls) >= 2)
    stop.set()
    await task
    assert urls[0] == urls[1]
    assert (tmp_path / "jetstream").is_dir()
    # The bus belongs to the state directory: it outlives the service that started it ...
    first = EmbeddedNats.running_in(tmp_path)
    assert first is not None, "stopping one service must not stop the bus for the others"
    # ... and, killed, it comes back on the same port with the next service, where the others reconnect.
    pid = json.loads((tmp_path / "nats-server.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: EmbeddedNats.running_in(tmp_path) is None)
    urls.clear()
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("test", cfg, main, stop=stop))
    await eventually(lambda: len(urls) >= 2)
    stop.set()
    await task
    assert urls[0] == f"127.0.0.1:{first.port}", "the same port as before"
    done = subprocess.run([str(Path(sys.executable).parent / "kipvs"), "nats", "--state-dir", str(tmp_path),
                           "--stop"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "stopped the embedded NATS server" in done.stdout
    await eventually(lambda: EmbeddedNats.running_in(tmp_path) is None)


def test_kipvs_nats_runs_jetstream_on_loopback_and_stops_on_sigterm(tmp_path: Path) -> None:
    from shared.messaging.embedded_nats import free_loopback_port

    port = free_loopback_port()
    exe = Path(sys.executable).parent / "kipvs"
    proc = subprocess.Popen([str(exe), "nats", "--state-dir", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"listening on nats://127.0.0.1:{port}" in line

        async def use() -> None:
            from shared.security import nats_credentials

            # secured by default: TLS and an identity, made in the state directory on first start
            with pytest.raises((nats.errors.Error, OSError)):
                await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=3)
            admin = nats_credentials.embedded_client(tmp_path / "nats-auth", "admin")
            nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, **admin.connect_options())
            js = nc.jetstream()
            await js.add_stream(name="probe", subjects=["probe"])
            ack = await js.publish("probe", b"x")
            assert ack.seq == 1
            await nc.close()

        asyncio.run(use())
        # Another server on the same port is refused, not reported as listening.
        other = subprocess.run([str(exe), "nats", "--state-dir", str(tmp_path / "other"), "--port", str(port)],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in other.stdout + other.stderr
        assert "listening" not in other.stdout
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
