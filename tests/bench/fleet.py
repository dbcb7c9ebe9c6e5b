"""Fleet benchmark (issue 17): how the change -> last node applied time, the plan stream's fan-out and the NATS
servers' cost grow with the number of nodes, on a real three-server JetStream cluster (R3 streams, as in
deploy/).

Everything is real but the kernel: three nats-server processes on loopback in one cluster, the Kubernetes API
simulator with S Services x E endpoints, the watcher and the planner as ``kipvs`` processes, and N appliers
(tests/bench/fleet_nodes.py: the production service runtime, consumer, plan and resolve code on the memory
kernel, each with its own NATS connection and durable consumer, many per process). For each N (ascending; the
fleet grows between steps) it times a few hundred endpoint changes under steady churn: from the simulator's
write to the moment the last node's apply report for the delta carrying the change is on the bus. It also
counts the plan messages published per change, samples the servers' RSS and CPU (/proc), the appliers' RSS per
node, and a new node's bootstrap (start to first apply report) with S Services. Ratios against N=1 from the
same run are printed next to the issue's goals; nothing is asserted.

    python -m tests.bench fleet --nodes 1,100,1000 --services 10000 --endpoints 10 --changes 300
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig

from services.applier import plan_consumer
from services.harness.simulator.server import Simulator
from shared.contract import events
from shared.messaging.embedded_nats import free_loopback_port, server_binary
from tests.bench import fleet_nodes
from tests.helpers import wait_port

KIPVS = str(Path(sys.executable).with_name("kipvs"))
GOALS = {"messages_per_change": 1.0, "p99_ratio_at_1000": 5.0, "bootstrap_s_at_10000": 10.0,
         "cpu_ms_at_100": 0.076, "rss_mib_per_node": 0.3}
NAMESPACE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- processes --------------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    return 0.0


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return 0.0


class Cluster:
    """Three nats-server processes on loopback forming one JetStream cluster."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.ports = [free_loopback_port() for _ in range(size)]
        self.cluster_ports = [free_loopback_port() for _ in range(size)]
        self.monitor_ports = [free_loopback_port() for _ in range(size)]  # /varz, /connz, /subsz, /jsz
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
            argv = [server_binary(), "--jetstream", "--store_dir", str(self.root / f"n{i}"), "--addr", "127.0.0.1",
                    "--port", str(port), "--server_name", f"n{i}", "--cluster_name", "kipvs-bench",
                    "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}", "--routes", routes,
                    "--http_port", str(self.monitor_ports[i])]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_port(port, proc)

    async def ready(self, within: float = 60.0) -> None:
        """Wait until the cluster can place a three-replica stream (a fresh cluster first elects its meta leader
        and learns its peers; until then kipvs's services would be refused: "no suitable peers")."""
        deadline = time.monotonic() + within
        nc = await nats.connect(self.url.split(","), max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            while True:
                try:
                    await js.add_stream(StreamConfig(name="BENCH_READY", subjects=["bench.ready"], num_replicas=3,
                                                     storage=StorageType.MEMORY))
                    await js.delete_stream("BENCH_READY")
                    return
                except (nats.errors.Error, TimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"fleet benchmark: the NATS cluster did not form: {exc}") from None
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)

    def rss_mib(self) -> float:
        return sum(rss_mib(p.pid) for p in self.procs)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def monitor(self, endpoint: str) -> list[dict[str, Any]]:
        """Each server's monitoring endpoint (``varz``, ``connz?subs=1``, ``subsz``, ``jsz``...) as JSON, over
        loopback HTTP (nats-server's own counters: what it read and wrote, per server)."""
        answers = []
        for port in self.monitor_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=10) as reply:
                answers.append(json.loads(reply.read(64 * 1024**2)))
        return answers


def _spawn(argv: list[str], log: Path, stdout: Any = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=stdout or log.open("ab"), stderr=log.open("ab"), start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the fleet's own process group: nothing else
        proc.wait(10)


# --- the cluster's objects ----------------------------------------------------------------------------------

def node_object(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i}", "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
                                      if i < 62500 else "10.250.0.1"}]}}


def service_object(i: int) -> dict[str, Any]:
    ip = f"10.96.{i // 250}.{i % 250 + 1}"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def slice_object(i: int, endpoints: int, nodes: int, not_ready: int = -1) -> dict[str, Any]:
    eps = [{"addresses": [f"10.{64 + i // 6000}.{(i // 25) % 240}.{(i % 25) * 10 + e + 1}"],
            "nodeName": f"node-{(i + e) % nodes}",
            "conditions": {"ready": e != not_ready, "serving": e != not_ready, "terminating": False}}
           for e in range(endpoints)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-a", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}


# --- observing the bus --------------------------------------------------------------------------------------

@dataclass
class Observer:
    """Core-NATS subscriptions on the plan and the apply reports (stored by JetStream, seen here as published)."""

    plan: list[tuple[float, str, int, frozenset[str]]] = field(default_factory=list)  # time, subject, seq, keys
    # node -> (plan seq, when the applier made the report: its kernel written, when the report reached us)
    reports: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    apply_ms: list[tuple[float, float]] = field(default_factory=list)  # (time, the applier's own batch time)
    nc: nats.NATS | None = None

    async def start(self, nc: nats.NATS) -> None:
        self.nc = nc
        async def on_plan(msg) -> None:
            env = events.decode(msg.data)
            rec = env.record
            if isinstance(rec, events.PlanDelta):
                keys = frozenset(op.service.key for op in rec.ops if isinstance(op, events.SetService))
                self.plan.append((time.time(), msg.subject, rec.seq if rec.scope == "all" else 0, keys))

        async def on_report(msg) -> None:
            env = events.decode(msg.data)
            rec = env.record
            if isinstance(rec, events.ApplyReport):
                self.reports.setdefault(rec.node, []).append((rec.plan_seq, env.time_ns / 1e9, time.time()))
                if rec.operations:
                    self.apply_ms.append((time.time(), rec.duration_ms))

        await nc.subscribe("kipvs.plan.>", cb=on_plan)
        await nc.subscribe("kipvs.status.*.applied", cb=on_report)
        await nc.subscribe(f"{fleet_nodes.CORE_REPORTS}.*.applied", cb=on_report)  # --reports core

    def reached(self, node: str, seq: int, seen: bool = False) -> float | None:
        """When ``node`` had applied a plan at or after ``seq`` (its report's time: the kernel was written;
        the same clock, one machine), or with ``seen`` when that report reached the bus's subscribers."""
        got = self.reports.get(node, [])
        i = bisect.bisect_left([s for s, _, _ in got], seq)
        return got[i][2 if seen else 1] if i < len(got) else None

    def latest(self) -> int:
        return max((seq for _, _, seq, _ in self.plan), default=0)


async def wait_for(predicate, within: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"fleet benchmark: timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(step)


# --- the run ------------------------------------------------------------------------------------------------

@dataclass
class Options:
    nodes: list[int]
    services: int = 2_000
    endpoints: int = 10
    changes: int = 100
    rate: float = 5.0  # changes per second
    consumer: str = "r1-memory"
    per_process: int = 250  # appliers per fleet process
    fetch_wait: float = 0.0  # seconds each applier's fetch waits at the server; 0: kipvs's own
    acks: str = "explicit"  # none: consumers without acks (fleet_nodes.without_acks), to measure their cost
    reports: str = "stream"  # core: reports on core NATS, not into KIPVS_STATUS, to measure their cost
    plan_feed: str = "feed"  # the appliers' plan input: feed (issue 27) or consumer (a durable per node)
    report_interval: float = 1.0  # seconds between two apply reports of a node; 0: one per batch
    # ... under sustained churn: 1 s here (the applier's default is 5 s), else a change's latency would be
    # measured to a report up to 5 s later (a report names only the newest delta applied)
    busy_report_interval: float = 1.0


async def _run(opt: Options, root: Path) -> list[dict[str, float]]:
    cluster = Cluster(root)
    cluster.start()
    await cluster.ready()
    sim = Simulator(bookmark_interval=5.0)
    procs: list[subprocess.Popen] = []
    try:
        max_nodes = max(opt.nodes)
        for i in range(max_nodes):
            sim.store.create(node_object(i))
        for i in range(opt.services):
            sim.store.create(service_object(i))
            sim.store.create(slice_object(i, opt.endpoints, max_nodes))
        await sim.start()
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(sim.kubeconfig())
        common = ["--nats-url", cluster.url, "--http-listen", "", "--nats-replicas", "3", "--log-level", "warning"]
        procs.append(_spawn([KIPVS, "watcher", "--kubeconfig", str(kubeconfig), *common], root / "watcher.log"))
        procs.append(_spawn([KIPVS, "planner", *common], root / "planner.log"))

        nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1)
        observer = Observer()
        await observer.start(nc)
        # The initial build: every Service planned (one SetService each, maybe several per delta).
        planned: set[str] = set()

        def all_planned() -> bool:
            for _, _, _, keys in observer.plan[len(planned_seen):]:
                planned.update(keys)
            planned_seen[:] = observer.plan
            return len(planned) >= opt.services
        planned_seen: list[Any] = []
        t0 = time.monotonic()
        await wait_for(all_planned, 60 + opt.services / 50, "the initial plan")
        print(f"  initial plan of {opt.services:,} Services published in {time.monotonic() - t0:.1f}s", flush=True)

        rows: list[dict[str, float]] = []
        started = 0
        rng = random.Random(17)
        flips: dict[int, int] = {}
        for n in sorted(opt.nodes):
            try:
                row = await _step(opt, n, started, procs, observer, cluster, sim, rng, flips, root)
            except RuntimeError as exc:  # the machine's limit: report what was measured below it
                print(f"  N={n}: {exc}; the fleet stops growing here", flush=True)
                break
            started = n
            rows.append(row)
            print("  " + json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        await nc.close()
        return rows
    finally:
        for proc in procs:
            _end(proc)
        await sim.stop()
        cluster.stop()


async def _step(opt: Options, n: int, started: int, procs: list[subprocess.Popen], observer: Observer,
                cluster: Cluster, sim: Simulator, rng: random.Random, flips: dict[int, int],
                root: Path) -> dict[str, float]:
    """One fleet size: grow the fleet to ``n`` appliers, then measure idle, churn and a new node's bootstrap."""
    max_nodes = max(opt.nodes)
    # Grow the fleet to n appliers, a fleet process per `per_process`.
    while started < n:
        count = min(opt.per_process, n - started)
        procs.append(_fleet(cluster.url, "node-", started, count, opt, root))
        started += count
    want = [f"node-{i}" for i in range(n)]
    target = observer.latest()
    t0 = time.monotonic()
    await wait_for(lambda: all(observer.reached(w, target) is not None for w in want),
                   120 + n * 1.0 + opt.services * n / 10_000, f"{n} appliers to bootstrap")
    up_s = time.monotonic() - t0
    print(f"  {n} appliers up in {up_s:.1f}s", flush=True)
    fleet_pids = [p.pid for p in procs[2:]]
    await asyncio.sleep(3)  # let the start-up settle

    idle_cpu0, idle_t0 = cluster.cpu_seconds(), time.monotonic()
    await asyncio.sleep(10)
    idle_cpu = (cluster.cpu_seconds() - idle_cpu0) / (time.monotonic() - idle_t0)

    # Steady churn: one endpoint's readiness flips in a random Service, `rate` times a second.
    plan_before, apply_before = len(observer.plan), len(observer.apply_ms)
    status_before = await _status_stream(observer)
    cpu0, wall0 = cluster.cpu_seconds(), time.monotonic()
    fleet_cpu0 = sum(cpu_seconds(pid) for pid in fleet_pids)
    changes: list[tuple[float, str]] = []
    for _ in range(opt.changes):
        i = rng.randrange(opt.services)
        flips[i] = (flips.get(i, -1) + 2) % (opt.endpoints + 1) - 1  # -1 (all ready), 0, 1, ...: never twice
        obj = slice_object(i, opt.endpoints, max_nodes, not_ready=flips[i])
        changes.append((time.time(), f"{NAMESPACE}/svc-{i}"))
        await sim.apply(obj)
        await asyncio.sleep(1 / opt.rate)
    # Every change's delta (the first shared delta after the write that sets its Service), then
    # every node past it.
    def deltas_of() -> list[int]:
        found = []
        for t, key in changes:
            found.append(next((dseq for when, _, dseq, keys in observer.plan[plan_before:]
                               if dseq and when >= t and key in keys), 0))
        return found

    with contextlib.suppress(RuntimeError):
        await wait_for(lambda: all(deltas_of()), 60, "the planner to publish every change", step=0.5)
    deltas = deltas_of()
    last = max(deltas)
    try:
        await wait_for(lambda: all(observer.reached(w, last) is not None for w in want),
                       120 + n * 0.2, f"{n} nodes to apply the churn")
    except RuntimeError as exc:
        behind = sorted((max((s for s, _, _ in observer.reports.get(w, [])), default=0), w) for w in want)
        done = sum(1 for s, _ in behind if s >= last)
        raise RuntimeError(f"{exc} ({done} of {n} had; the furthest behind: "
                           + ", ".join(f"{w} at {s}" for s, w in behind[:3]) + f"; the last delta is {last})") from None
    churn_wall = time.monotonic() - wall0
    status_after = await _status_stream(observer)
    churn_cpu = (cluster.cpu_seconds() - cpu0) / churn_wall
    fleet_cpu = (sum(cpu_seconds(pid) for pid in fleet_pids) - fleet_cpu0) / churn_wall
    lat, seen = [], []
    for (t, _), seq in zip(changes, deltas, strict=True):
        if seq:
            lat.append(max(observer.reached(w, seq) or 0.0 for w in want) - t)
            seen.append(max(observer.reached(w, seq, seen=True) or 0.0 for w in want) - t)
    published = len(observer.plan) - plan_before
    lat.sort()
    seen.sort()
    row = {
        "nodes": n,
        "changes": len(lat),
        "p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
        "p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000 if lat else float("nan"),
        # ...until the last node's report is stored in KIPVS_STATUS and seen: N reports per change into one
        # R3 stream, the fan-in that grows with N
        "reported_p50_ms": statistics.median(seen) * 1000 if seen else float("nan"),
        "reported_p99_ms": seen[max(0, int(len(seen) * 0.99) - 1)] * 1000 if seen else float("nan"),
        "messages_per_change": published / opt.changes,
        "servers_rss_mib": cluster.rss_mib(),
        "servers_idle_cpu": idle_cpu,
        "servers_churn_cpu": churn_cpu,
        # the servers' CPU per change and node: what one more node costs the cluster per change
        "servers_cpu_ms_per_change_node": (churn_cpu - idle_cpu) * churn_wall * 1000 / opt.changes / n,
        # the appliers' processes together, in cores: near the machine's free cores, the latencies
        # above measure N appliers queueing for 2 cores, not the bus
        "fleet_cpu": fleet_cpu,
        "fleet_up_s": up_s,
        "applier_rss_mib_per_node": sum(rss_mib(pid) for pid in fleet_pids) / n,
        # inside each applier, per batch: resolve, diff, (memory) kernel write; O(change) if it does
        # not grow with --services
        "node_apply_ms_p50": statistics.median([ms for _, ms in observer.apply_ms[apply_before:]] or [0.0]),
        # what the churn added to KIPVS_STATUS (every kind of report), per change and node
        "status_msgs_per_change_node": (status_after[0] - status_before[0]) / opt.changes / n,
        "status_bytes_per_change": (status_after[1] - status_before[1]) / opt.changes,
        "status_msgs_per_node_s": (status_after[0] - status_before[0]) / churn_wall / n,
    }
    row["bootstrap_s"] = await _bootstrap(cluster.url, opt, observer, root, n)
    return row


async def _status_stream(observer: Observer) -> tuple[int, int]:
    """(messages, bytes) KIPVS_STATUS holds now."""
    assert observer.nc is not None
    state = (await observer.nc.jetstream(timeout=10).stream_info("KIPVS_STATUS")).state
    return state.messages, state.bytes


def _fleet(url: str, prefix: str, first: int, count: int, opt: Options, root: Path,
           stdout: Any = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.bench.fleet_nodes", "--nats-url", url, "--prefix", prefix,
            "--first", str(first), "--count", str(count), "--consumer", opt.consumer,
            "--fetch-wait", str(opt.fetch_wait), "--acks", opt.acks, "--reports", opt.reports,
            "--plan-feed", opt.plan_feed, "--report-interval", str(opt.report_interval),
            "--busy-report-interval", str(opt.busy_report_interval)]
    return _spawn(argv, root / f"fleet-{prefix}{first}.log", stdout)


async def _bootstrap(url: str, opt: Options, observer: Observer, root: Path, n: int) -> float:
    """A new node joins: seconds from its applier's start to its first apply report (kernel writes excluded:
    the memory kernel), with the whole plan of ``opt.services`` Services to read from the snapshot."""
    name = f"joiner{n}-"
    proc = _fleet(url, name, 0, 1, opt, root, stdout=subprocess.PIPE)
    try:
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
        started = json.loads(line)["started"]
        await wait_for(lambda: observer.reports.get(f"{name}0"), 120, "a new node's bootstrap", step=0.02)
        return observer.reports[f"{name}0"][0][1] - started
    finally:
        _end(proc)


def run(opt: Options) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="kipvs-fleet-") as tmp:
        try:
            return asyncio.run(_run(opt, Path(tmp)))
        except RuntimeError as exc:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in Path(tmp).glob("*.log"))
            raise RuntimeError(f"{exc}\n{logs}") from None


def report(opt: Options, rows: list[dict[str, float]]) -> None:
    print(f"== fleet: {opt.services:,} Services x {opt.endpoints} endpoints, {opt.changes} endpoint changes at "
          f"{opt.rate:g}/s per fleet size; 3 nats-servers (R3 streams); plan input: "
          + ("the republished feed" if opt.plan_feed == "feed" else
             f"consumers {opt.consumer}, fetch wait {opt.fetch_wait or plan_consumer.FETCH_WAIT:g} s, acks {opt.acks}")
          + f"; reports {'on core NATS' if opt.reports == 'core' else 'into KIPVS_STATUS'}, at most one per "
          f"{opt.report_interval:g} s per node ({opt.busy_report_interval:g} s under churn) ==")
    if not rows:
        print("nothing measured: not even the first fleet size could be run")
        return
    base = rows[0]
    head = (f"{'nodes':>6} {'p50 ms':>8} {'p99 ms':>8} {'x p99':>6} {'msg/chg':>7} {'srv RSS':>8} {'x':>5} "
            f"{'idle cpu':>8} {'churn cpu':>9} {'x':>5} {'RSS/node':>8} {'boot s':>6}")
    print(head)
    for r in rows:
        print(f"{r['nodes']:>6.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['p99_ms'] / base['p99_ms']:>6.2f} "
              f"{r['messages_per_change']:>7.2f} {r['servers_rss_mib']:>7.0f}M "
              f"{r['servers_rss_mib'] / base['servers_rss_mib']:>5.2f} {r['servers_idle_cpu'] * 100:>7.1f}% "
              f"{r['servers_churn_cpu'] * 100:>8.1f}% {r['servers_churn_cpu'] / base['servers_churn_cpu']:>5.2f} "
              f"{r['applier_rss_mib_per_node']:>7.1f}M {r['bootstrap_s']:>6.2f}")
    print("p50/p99 ms until the last node's apply report is stored and seen (N reports per change into one R3 "
          "stream): " + ", ".join(f"N={r['nodes']:.0f} {r['reported_p50_ms']:.0f}/{r['reported_p99_ms']:.0f}"
                                  for r in rows))
    print("servers' CPU ms per change per node (churn minus idle): "
          + ", ".join(f"N={r['nodes']:.0f} {r['servers_cpu_ms_per_change_node']:.3f}" for r in rows))
    print("appliers' processes during churn, cores: "
          + ", ".join(f"N={r['nodes']:.0f} {r['fleet_cpu']:.2f}" for r in rows)
          + "  (near the free cores: the latencies measure N appliers sharing this machine)")
    print("time to start and bootstrap the fleet (consumers created), s: "
          + ", ".join(f"N={r['nodes']:.0f} {r['fleet_up_s']:.1f}" for r in rows))
    print("apply ms per batch inside a node (resolve + diff + memory kernel), p50: "
          + ", ".join(f"N={r['nodes']:.0f} {r['node_apply_ms_p50']:.2f}" for r in rows))
    print("KIPVS_STATUS growth under churn, messages per change per node / bytes per change / messages per node "
          "per second: " + ", ".join(f"N={r['nodes']:.0f} {r['status_msgs_per_change_node']:.2f} / "
                                     f"{r['status_bytes_per_change']:.0f} / {r['status_msgs_per_node_s']:.2f}"
                                     for r in rows))
    if len(rows) > 1:
        print("servers' RSS per added node, MiB: " + ", ".join(
            f"N={a['nodes']:.0f}->{b['nodes']:.0f} {rss_per_node(a, b):.2f}" for a, b in itertools.pairwise(rows)))
    print(f"ratios (x) are against N={base['nodes']:.0f} from this run; cpu is the three servers together, in cores")
    print(f"issue 27's goals: servers' CPU per change per node at N=100 at most {GOALS['cpu_ms_at_100']:g} ms "
          f"(a tenth of 0.76, the issue's figure for the consumer design on this machine); servers' RSS per added node "
          f"at most {GOALS['rss_mib_per_node']:g} MiB; KIPVS_STATUS messages per change per node at most 1 and per "
          f"node per second at most 1")
    print(f"goals: messages per endpoint change {GOALS['messages_per_change']:g} whatever N; p99 at N=1,000 at most "
          f"x{GOALS['p99_ratio_at_1000']:g} the p99 at N=1; a new node bootstrapped from 10,000 Services in under "
          f"{GOALS['bootstrap_s_at_10000']:g} s (kernel writes excluded)")


def rss_per_node(a: dict[str, float], b: dict[str, float]) -> float:
    return (b["servers_rss_mib"] - a["servers_rss_mib"]) / (b["nodes"] - a["nodes"])


# --split: the same fleet three times, taking one cost away each time (fleet_nodes.py's knobs)
SPLIT = (("as configured", {}), ("reports on core NATS", {"reports": "core"}),
         ("and no acks", {"reports": "core", "acks": "none"}))


def split(opt: Options) -> None:
    """Run the fleet with each of SPLIT's settings and print the servers' CPU and RSS per change per node
    taken by the status reports (first minus second), the acknowledgements (second minus third) and the
    delivery itself (the third: pull requests and messages)."""
    runs = []
    # the feed has no acknowledgements: its third run would repeat the second
    for label, change in SPLIT if opt.plan_feed == "consumer" else SPLIT[:2]:
        print(f"-- {label}", flush=True)
        one = dataclasses.replace(opt, **change)
        rows = run(one)
        report(one, rows)
        runs.append(rows)
    print("== where the servers' CPU per change per node goes (ms; differences of the runs above) ==")
    for i, row in enumerate(runs[0]):
        if any(len(r) <= i for r in runs):
            break
        cpu = [r[i]["servers_cpu_ms_per_change_node"] for r in runs]
        cpu += cpu[-1:] * (3 - len(cpu))
        print(f"N={row['nodes']:.0f}: total {cpu[0]:.3f} = status reports {cpu[0] - cpu[1]:.3f} + acks "
              f"{cpu[1] - cpu[2]:.3f} + delivery (pull requests, messages) {cpu[2]:.3f}; KIPVS_STATUS "
              f"{runs[0][i]['status_msgs_per_change_node']:.2f} messages and "
              f"{runs[0][i]['status_bytes_per_change'] / max(row['nodes'], 1):.0f} bytes per change per node")
    if all(len(r) > 1 for r in runs):
        rss = [rss_per_node(r[0], r[1]) for r in runs]
        rss += rss[-1:] * (3 - len(rss))
        print(f"servers' RSS per added node, MiB: total {rss[0]:.2f} = status reports {rss[0] - rss[1]:.2f} + acks "
              f"{rss[1] - rss[2]:.2f} + delivery {rss[2]:.2f} (noisy: one sample each)")


def options(argv: list[str] | None = None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,20,100", help="fleet sizes, comma-separated (default 1,20,100)")
    parser.add_argument("--services", type=int, default=2_000, help="Services (default 2,000)")
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per Service (default 10)")
    parser.add_argument("--changes", type=int, default=100, help="endpoint changes per fleet size (default 100)")
    parser.add_argument("--rate", type=float, default=5.0, help="endpoint changes per second (default 5)")
    parser.add_argument("--consumer", choices=["r1-memory", "r1", "r3"], default="r1-memory",
                        help="applier consumers: one replica in memory (kipvs's design), one on disk, or three "
                             "(what they inherited from the stream before issue 17)")
    parser.add_argument("--fetch-wait", type=float, default=0.0,
                        help="seconds each applier's fetch waits at the server (default 0: kipvs's own)")
    parser.add_argument("--acks", choices=["explicit", "none"], default="explicit",
                        help="none: applier consumers without acknowledgements (a measurement, not a design)")
    parser.add_argument("--reports", choices=["stream", "core"], default="stream",
                        help="core: apply reports on core NATS instead of KIPVS_STATUS (a measurement)")
    parser.add_argument("--plan-feed", choices=["feed", "consumer"], default="feed",
                        help="the appliers' plan input: feed (the republished plan, issue 27; default) or consumer "
                             "(a durable consumer per node, before issue 27)")
    parser.add_argument("--report-interval", type=float, default=1.0,
                        help="seconds between two apply reports of a node (default 1; 0: one per batch, before "
                             "issue 27)")
    parser.add_argument("--busy-report-interval", type=float, default=1.0,
                        help="... under sustained churn (default 1 here, so that every change's latency is measured "
                             "to a report within a second; the applier's default is 5)")
    parser.add_argument("--split", action="store_true",
                        help="run three times (as configured; reports on core NATS; and no acks) and print where "
                             "the servers' CPU and memory per node go")
    parser.add_argument("--per-process", type=int, default=250, help="appliers per fleet process (default 250)")
    args = parser.parse_args(argv)
    try:
        nodes = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--nodes: {args.nodes!r} is not a comma-separated list of numbers")
    if not nodes or nodes[0] < 1 or args.services < 1 or args.endpoints < 1 or args.changes < 1:
        parser.error("--nodes, --services, --endpoints and --changes must be at least 1")
    return Options(nodes=nodes, services=args.services, endpoints=args.endpoints, changes=args.changes,
                   rate=args.rate, consumer=args.consumer, per_process=args.per_process,
                   fetch_wait=args.fetch_wait, acks=args.acks, reports=args.reports,
                   plan_feed=args.plan_feed, report_interval=args.report_interval,
                   busy_report_interval=args.busy_report_interval), args.split


def main(argv: list[str] | None = None) -> int:
    opt, split_costs = options(argv)
    if split_costs:
        split(opt)
        return 0
    report(opt, run(opt))
    return 0
