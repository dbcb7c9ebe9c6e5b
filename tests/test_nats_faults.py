"""The bus itself fails (issue 13), with every part real: the simulator, and the watcher, planner and two
appliers as processes (`kipvs ...`, appliers on the memory kernel). NATS is killed with SIGKILL in the
middle of a burst of changes and restarted; then a three-server JetStream cluster (R3 streams) loses one
server while changes flow, and gets it back. Each case ends with every node's last apply report holding
exactly `kipvs plan`'s answer for the cluster's final objects, and nothing parked."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from services.applier.ops import digest
from services.planner.core import PlannerConfig
from services.planner.log_replay import plan_events, read_events
from shared.contract import topology
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.plan.resolve import resolve_node
from tests import kube
from tests.helpers import wait_port
from tests.logread import parked_reasons, read_stream

KIPVS = str(Path(sys.executable).with_name("kipvs"))
NODES = {"node-a": "192.0.2.1", "node-b": "192.0.2.2"}


class Server:
    """One nats-server process (optionally a member of a cluster), restartable on the same ports."""

    def __init__(self, store: Path, name: str, cluster_port: int = 0, routes: list[int] | None = None) -> None:
        self.store, self.name, self.port = store, name, free_loopback_port()
        self.cluster_port, self.routes = cluster_port, routes or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [server_binary(), "--jetstream", "--store_dir", str(self.store), "--addr", "127.0.0.1", "--port",
                str(self.port), "--server_name", self.name]
        if self.cluster_port:
            argv += ["--cluster_name", "kipvs-test", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


class System:
    """The watcher, the planner and one applier per node, as processes."""

    def __init__(self, url: str, kubeconfig: Path, logs: Path, replicas: int = 1) -> None:
        self.url, self.kubeconfig, self.logs, self.replicas = url, kubeconfig, logs, replicas
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        common = ["--nats-url", self.url, "--http-listen", "", "--nats-replicas", str(self.replicas)]
        self._run("watcher", ["watcher", "--kubeconfig", str(self.kubeconfig), *common])
        self._run("planner", ["planner", "--snapshot-every", "25", *common])
        for node in NODES:
            self._run(node, ["applier", "--node", node, "--backend", "memory", "--drift-period", "5", *common])

    def _run(self, name: str, argv: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([KIPVS, *argv], stdout=log, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited ({proc.returncode}): " + \
                (self.logs / f"{name}.log").read_text()[-2000:]

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = -9
        return codes


def _svc(i: int, version: int) -> dict:
    svc = kube.service(f"s{i}", cluster_ip=f"10.96.1.{i}")
    svc["spec"]["ports"][0]["port"] = 80 + version
    return svc


def _slice(i: int, count: int) -> dict:
    return kube.endpoint_slice(f"s{i}-x", f"s{i}", [kube.endpoint(f"10.244.{i}.{k + 1}", "node-a" if k % 2 else
                                                                  "node-b") for k in range(count)])


async def _burst(sim, rounds: int, offset: int = 0) -> None:
    for r in range(rounds):
        i = (r + offset) % 15 + 1
        await sim.apply(_svc(i, (r + offset) % 3))
        await sim.apply(_slice(i, (r + offset) % 4 + 1))
        if r % 7 == 3:
            await sim.delete("EndpointSlice", "default", f"s{i}-x")
        await asyncio.sleep(0.01)


def _expected(sim) -> dict[str, str]:
    lines = []
    for kind in ("Node", "Service", "EndpointSlice", "Pod"):
        for obj in sim.store.list(kind, None)["items"]:
            lines.append(json.dumps({"type": "ADDED", "object": {**obj, "kind": kind}}))
    planner = plan_events(read_events(lines, "sim"), PlannerConfig())
    return {node: digest(resolve_node(planner.plans.values(), planner.nodes[node])) for node in NODES}


async def _converged(url: str, want: dict[str, str], system: System, within: float = 180) -> None:
    deadline = time.monotonic() + within
    got: dict[str, str] = {}
    while time.monotonic() < deadline:
        system.check_alive()
        try:
            nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=1,
                                    allow_reconnect=False)
        except Exception:  # the cluster may be electing leaders: try again
            await asyncio.sleep(1)
            continue
        parked: list[str] | None = None
        try:
            js = nc.jetstream(timeout=5)
            for node in NODES:
                reports = [env.record for _, env in await read_stream(js, topology.STATUS_STREAM,
                                                                       topology.status_subject(node, "applied"))]
                if reports:
                    got[node] = reports[-1].desired_digest
            if got == want:
                parked = await parked_reasons(js)
        except Exception as exc:  # a leader election in progress: read again
            print(f"reading the status stream: {type(exc).__name__}: {exc}")
        finally:
            await nc.close()
        if parked is not None:
            assert parked == [], f"valid input was parked: {parked[:3]}"
            return
        await asyncio.sleep(1)
    raise AssertionError(f"the nodes did not converge: {got} != {want}; logs in {system.logs}")


async def _setup_cluster(sim, tmp_path: Path, url: str, replicas: int) -> System:
    for node, ip in NODES.items():
        await sim.apply(kube.node(node, ip))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    logs = tmp_path / "logs"
    logs.mkdir()
    system = System(url, kubeconfig, logs, replicas)
    system.start()
    return system


async def test_nats_killed_mid_burst_and_restarted(sim, tmp_path: Path) -> None:
    server = Server(tmp_path / "store", "solo")
    server.start()
    system = await _setup_cluster(sim, tmp_path, f"nats://127.0.0.1:{server.port}", 1)
    try:
        burst = asyncio.create_task(_burst(sim, 60))
        await asyncio.sleep(3)
        server.kill()  # SIGKILL in the middle of the burst
        await asyncio.sleep(2)
        server.start()
        await burst
        await _burst(sim, 10, offset=60)
        await _converged(f"nats://127.0.0.1:{server.port}", _expected(sim), system)
    finally:
        codes = system.stop()
        server.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_three_server_cluster_loses_a_server_while_changes_flow(sim, tmp_path: Path) -> None:
    cluster_ports = [free_loopback_port() for _ in range(3)]
    servers = [Server(tmp_path / f"store-{i}", f"n{i}", cluster_ports[i],
                      [p for j, p in enumerate(cluster_ports) if j != i]) for i in range(3)]
    for s in servers:
        s.start()
    url = ",".join(f"nats://127.0.0.1:{s.port}" for s in servers)
    system = await _setup_cluster(sim, tmp_path, url, 3)
    try:
        await _converged(url, _expected(sim), system, within=240)  # streams R3 up and planned once
        nc = await nats.connect(url.split(","))
        info = await nc.jetstream().stream_info(topology.PLAN_STREAM)
        assert info.config.num_replicas == 3
        await nc.close()
        burst = asyncio.create_task(_burst(sim, 40))
        await asyncio.sleep(2)
        servers[1].kill()
        await burst
        await _converged(url, _expected(sim), system, within=240)  # two servers keep the quorum
        servers[1].start()
        await _burst(sim, 10, offset=40)
        await _converged(url, _expected(sim), system, within=240)
    finally:
        codes = system.stop()
        for s in servers:
            s.stop()
    assert all(code == 0 for code in codes.values()), codes
