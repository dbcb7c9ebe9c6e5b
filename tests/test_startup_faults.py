"""Starting and stopping under faults (issue 13), as a user runs the services: an unreachable NATS is
said, visible on the health port and interruptible; a user's mistake is one sentence and exit 2; health
tells the truth (/livez, /healthz with kube-proxy's meaning, /readyz)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.planner.active import plan
from services.planner.service_config import PlannerServiceConfig
from shared.contract import topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port
from shared.service import config
from tests import kube
from tests.helpers import eventually, publish_kube, start_service

KIPVS = str(Path(sys.executable).with_name("kipvs"))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_http(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _get(port, "/livez")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_unreachable_nats_is_said_visible_and_sigterm_ends_the_wait(tmp_path: Path) -> None:
    port = free_loopback_port()
    closed = free_loopback_port()  # nothing listens there
    proc = subprocess.Popen([KIPVS, "planner", "--nats-url", f"nats://127.0.0.1:{closed}", "--http-listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(port)
        assert _get(port, "/livez")[0] == 200
        status, text = _get(port, "/readyz")
        assert status == 503 and f"connecting to NATS at nats://127.0.0.1:{closed}" in text
        assert _get(port, "/healthz")[0] == 200, "an unreachable NATS is no reason to restart the process"
        time.sleep(1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
        assert time.monotonic() - started < 5, "SIGTERM ends the wait for NATS at once"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"cannot reach NATS at nats://127.0.0.1:{closed}" in out and "Traceback" not in out


def test_user_mistakes_at_start_are_one_sentence_and_exit_2(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run([KIPVS, "planner", "--state-dir", str(not_a_dir / "state"), "--http-listen", ""],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot use the state directory {not_a_dir / 'state'}" in done.stderr
    done = subprocess.run([KIPVS, "watcher", "--kubeconfig", str(tmp_path / "missing.yaml"), "--nats-url",
                           "nats://127.0.0.1:1", "--http-listen", ""], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"kipvs watcher: cannot load the kubeconfig {tmp_path / 'missing.yaml'}: no such file"


def test_malformed_kubeconfig_is_one_sentence(tmp_path: Path, nats_url: str) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nclusters: 12\n")
    done = subprocess.run([KIPVS, "watcher", "--kubeconfig", str(bad), "--nats-url", nats_url, "--http-listen",
                           ""], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"kipvs watcher: cannot load the kubeconfig {bad}:" in done.stderr


class StuckKernel(MemoryKernel):
    """A kernel whose writes hang until released: a wedged applier with a live NATS connection."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.stuck = False

    async def apply(self, ops):  # type: ignore[no-untyped-def]
        if self.stuck:
            await self.release.wait()
        return await super().apply(ops)


async def test_healthz_fails_when_input_waits_unhandled_and_recovers(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    common = {"nats_url": nats_url}
    planner_task, planner_stop = start_service("planner", config.load(PlannerServiceConfig,
                                                                      {**common, "http_listen": ""}, {}), plan)
    port = free_loopback_port()
    kernel = StuckKernel()
    cfg = config.load(ApplierConfig, {**common, "http_listen": f"127.0.0.1:{port}", "node": "node-a",
                                      "backend": "memory", "healthz_stale_after": "1"}, {})
    applier, stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel))

    async def status(path: str) -> int:
        return (await asyncio.to_thread(_get, port, path))[0]

    node = json.dumps({"type": "ADDED", "object": {**kube.node("node-a", "192.0.2.1"),
                                                   "metadata": {"name": "node-a", "resourceVersion": "1"}}})
    await publish_kube(js, [node], "n")
    for _ in range(200):
        if await status("/readyz") == 200:
            break
        await asyncio.sleep(0.05)
    assert await status("/readyz") == 200 and await status("/healthz") == 200
    kernel.stuck = True
    svc = kube.service("web")
    svc["metadata"]["resourceVersion"] = "2"
    await publish_kube(js, [json.dumps({"type": "ADDED", "object": svc})], "s")
    for _ in range(100):
        if await status("/healthz") == 503:
            break
        await asyncio.sleep(0.1)
    assert await status("/healthz") == 503, "a change queued and not programmed within the bound"
    assert await status("/livez") == 200, "the process itself is alive: liveness must not restart it"
    kernel.release.set()
    await eventually(lambda: ("TCP", "10.96.0.10", 80) in kernel.ipvs, 10, "the change programmed")
    for _ in range(100):
        if await status("/healthz") == 200:
            break
        await asyncio.sleep(0.1)
    assert await status("/healthz") == 200
    stop.set()
    planner_stop.set()
    await applier
    await planner_task
    await nc.close()
