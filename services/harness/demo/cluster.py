"""A whole kipvs system on one machine, for the demo and the end-to-end tests: the embedded NATS server,
the Kubernetes API simulator (in this process, so changes are timed where they happen), the watcher and
the planner as real processes, one applier per node: in the node's network namespace with real IPVS
(``netlink``, inside the QEMU guest), or on the memory kernel (``memory``, anywhere).

It also answers the questions the demo and the tests ask: what every node should hold (the planner's
core over the log), whether each node holds it (its apply reports; with ``netlink``, its kernel too),
and what a request through a VIP returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.applier.exclude import ExcludeCIDRs
from services.applier.exclude import parse as parse_cidrs
from services.applier.ops import digest
from services.harness.guest.vm import time_scale
from services.harness.simulator import scenario as scenarios
from services.harness.simulator.server import Simulator
from services.planner.core import Planner, PlannerConfig
from services.planner.lease import parse_value as parse_lease
from services.planner.log_replay import replay_log
from services.planner.render import ipvsadm
from shared.contract import events, topology
from shared.messaging import bus
from shared.messaging.embedded_nats import EmbeddedNats
from shared.plan.node_state import NodeState
from shared.plan.resolve import resolve_node, resolve_service
from shared.security.pki import write_private
from shared.tools.log_client import read_all

from . import network
from .network import NodeSpec, PodSpec

Backend = Literal["netlink", "memory"]
KIPVS = str(Path(sys.executable).with_name("kipvs"))
CLUSTER_CIDR = "10.244.0.0/16"  # every node's pod CIDR (10.244.N.0/24) is inside it


def node_state(planner: Planner, node: str, exclude_cidrs: tuple[str, ...] = ()) -> NodeState:
    """What the node's applier programs: the plan resolved for it, less its --ipvs-exclude-cidrs."""
    if not exclude_cidrs:
        return resolve_node(planner.plans.values(), planner.nodes.get(node))
    only = ExcludeCIDRs(parse_cidrs(exclude_cidrs)).contribution
    state, facts = NodeState(), planner.nodes.get(node)
    for key in sorted(planner.plans):
        part = only(resolve_service(planner.plans[key], facts))
        assert part is not None
        state.add(part)
    return state.finish()


async def applier_token(sim: Simulator | None, node: str, folder: Path) -> Path:
    """What the kubelet does for the applier's pod on ``node``: the pod, and a projected token bound to it
    (audience kipvs-nats), in a file of ``folder`` only its owner reads."""
    assert sim is not None
    pod = await sim.apply({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": f"kipvs-applier-{node}", "namespace": "kipvs-system"},
                           "spec": {"nodeName": node, "serviceAccountName": "kipvs-applier",
                                    "hostNetwork": True}})  # as the DaemonSet: no endpoint mark
    issued = sim.tokens.request("kipvs-system", "kipvs-applier", {"spec": {
        "audiences": ["kipvs-nats"], "expirationSeconds": 24 * 3600,
        "boundObjectRef": {"kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}}})
    path = folder / f"{node}.token"
    write_private(path, issued["status"]["token"].encode())
    return path


@dataclass
class Cluster:
    workdir: Path
    backend: Backend
    scenario: scenarios.Scenario
    nodes: list[NodeSpec] = field(default_factory=list)
    pods: dict[str, PodSpec] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    nats_server: EmbeddedNats | None = None
    sim: Simulator | None = None
    nc: Any = None
    js: JetStreamContext | None = None
    pod_server: asyncio.subprocess.Process | None = None
    drain_timeout: float = 15.0  # short, so the demo shows a removed real server draining and then going
    host_link: str = ""  # ADDRESS/PREFIX of the guest's eth0, the host's way in (netlink backend)
    view: Planner = field(default_factory=lambda: Planner(PlannerConfig()))  # see planned()
    keeping: bool = False  # the script reached --keep's wait: a stop then is the normal end
    applier_args: tuple[str, ...] = ()  # more flags for every applier (netlink backend)
    exclude_cidrs: tuple[str, ...] = ()  # every applier's --ipvs-exclude-cidrs (its nodes' state leaves them out)
    credentials: Path | None = None  # the bus's credentials, made beforehand (the guest's are the host's)

    @property
    def url(self) -> str:
        """Where the services reach NATS."""
        assert self.nats_server is not None
        return f"nats://{network.BRIDGE_IP if self.backend == 'netlink' else '127.0.0.1'}:{self.nats_server.port}"

    @property
    def public_url(self) -> str:
        """Where tools on the host reach NATS (the guest's end of the host link, when there is one)."""
        assert self.nats_server is not None
        return f"nats://{self.host_link.split('/')[0]}:{self.nats_server.port}" if self.host_link else self.url

    # --- starting ---------------------------------------------------------------------------------

    async def start_nats(self) -> None:
        host = network.BRIDGE_IP if self.backend == "netlink" else "127.0.0.1"
        if self.backend == "netlink":
            self.nodes = [NodeSpec(o["metadata"]["name"], _internal_ip(o), f"10.244.{i}.0/24")
                          for i, o in enumerate(self._objects("Node"), 1)]
            network.build_nodes(self.nodes)
            if self.host_link:
                network.host_link(self.host_link)
                host = "0.0.0.0"  # the guest's own addresses only: its bridge and the link from the host
        # Secured as in a cluster: TLS, an identity per role, appliers vouched for by 'kipvs auth' (the callout)
        # from their pod's ServiceAccount token, which the simulator issues and reviews as kube-apiserver does.
        extra = (self.host_link.split("/")[0],) if self.host_link else ()
        self.nats_server = EmbeddedNats(self.workdir / "nats", host=host, callout=True,
                                        names=(network.BRIDGE_IP, *extra), credentials=self.credentials)
        await self.nats_server.start(port=4222 if self.host_link else 0)
        admin = self.nats_server.identity("admin")
        # Reconnecting for ever: a test stops the server as long as it needs (beyond nats-py's 60 attempts)
        self.nc = await nats.connect(self.url, name="kipvs-demo", max_reconnect_attempts=-1,
                                     **(admin.connect_options() if admin else {}))
        self.js = self.nc.jetstream(timeout=5 * time_scale())  # nats-py's default 5 s, at this machine's pace

    async def start_simulator(self) -> None:
        self.sim = Simulator(bookmark_interval=5.0)
        await scenarios.load_objects(self.sim, self.scenario)
        await self.sim.start()
        (self.workdir / "kubeconfig").write_text(self.sim.kubeconfig())
        if self.backend == "netlink":
            self.pod_server = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.harness.demo.pods", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=self._log("pods"))
        for obj in self._objects("Pod"):
            await self.add_pod(obj)

    @property
    def auth_dir(self) -> Path:
        assert self.nats_server is not None
        return self.nats_server.auth_dir

    async def auth_listening(self, within: float) -> None:
        """Wait until the auth callout answers (its log says so): appliers connecting before it would wait
        for the server's authorization timeout."""
        within *= time_scale()  # a Python start is slow under emulation or on a loaded machine
        log = self.workdir / "logs" / "auth.log"
        deadline = asyncio.get_running_loop().time() + within
        while "answering NATS authorization requests" not in (log.read_text() if log.exists() else ""):
            process = self.processes.get("auth")
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"the auth service exited with {process.returncode}; see {log}")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the auth service did not start within {within:.0f}s; see {log}")
            await asyncio.sleep(0.1)

    async def start(self, service: str) -> None:
        """Start (or restart) one service: auth, watcher, planner, planner-<n> (one of several, with
        ``--leader-elect``, as deploy/kubernetes/40-planner.yaml runs them) or applier-<node>."""
        common = ["--nats-url", self.url, "--http-listen", "", "--log-format", "json",
                  "--nats-ca-file", str(self.auth_dir / "ca.pem")]
        role = "planner" if service.startswith("planner") else service
        if role in ("auth", "watcher", "planner"):
            common += ["--nats-nkey-file", str(self.auth_dir / f"{role}.nk")]
        if service == "auth":
            argv = [KIPVS, "auth", "--kubeconfig", str(self.workdir / "kubeconfig"),
                    "--issuer-nkey-file", str(self.auth_dir / "issuer.nk"), *common]
        elif service == "watcher":
            argv = [KIPVS, "watcher", "--kubeconfig", str(self.workdir / "kubeconfig"), *common]
        elif role == "planner":
            argv = [KIPVS, "planner", *common, *(leader_elect_flags() if service != "planner" else ())]
        else:
            if "auth" not in self.processes:  # an applier's identity comes from the auth callout
                await self.start("auth")
                await self.auth_listening(within=60)
            node = service.removeprefix("applier-")
            argv = [KIPVS, "applier", "--node", node, "--drift-period", "10",
                    "--drain-timeout", str(self.drain_timeout), *common,
                    "--nats-token-file", str(await applier_token(self.sim, node, self.workdir / "tokens"))]
            if self.backend == "memory":
                argv += ["--backend", "memory"]
            else:
                argv = ["ip", "netns", "exec", node, *argv, "--cluster-cidr", CLUSTER_CIDR, *self.applier_args]
                argv += [f"--ipvs-exclude-cidrs={cidr}" for cidr in self.exclude_cidrs]
        self.processes[service] = await asyncio.create_subprocess_exec(
            *argv, stdout=self._log(service), stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    async def kill(self, service: str) -> None:
        process = self.processes.pop(service)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    def node_names(self) -> list[str]:
        return [o["metadata"]["name"] for o in self._objects("Node")]

    def _objects(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.scenario.objects if o.get("kind") == kind]

    def _log(self, name: str) -> Any:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return (logs / f"{name}.log").open("ab")

    # --- pods -------------------------------------------------------------------------------------

    async def add_pod(self, obj: dict[str, Any]) -> PodSpec:
        """Create the pod's namespace and HTTP server (netlink backend), then the Pod object."""
        meta = obj["metadata"]
        pod = PodSpec(meta.get("namespace", "default"), meta["name"], obj["spec"]["nodeName"], obj["status"]["podIP"])
        if self.backend == "netlink":
            network.add_pod(pod)
            await self._pods_command(f"add {pod.netns} {pod.name} {pod.node}")
        self.pods[pod.name] = pod
        return pod

    async def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        if self.backend == "netlink":
            await self._pods_command(f"del {pod.netns}")
            network.remove_pod(pod)

    async def _pods_command(self, line: str) -> None:
        assert self.pod_server is not None and self.pod_server.stdin and self.pod_server.stdout
        self.pod_server.stdin.write(line.encode() + b"\n")
        await self.pod_server.stdin.drain()
        reply = await asyncio.wait_for(self.pod_server.stdout.readline(), 10 * time_scale())
        if reply.strip() != b"ok":
            raise RuntimeError(f"pod server: {line!r} -> {reply!r}")

    # --- what should be and what is ---------------------------------------------------------------

    async def planned(self) -> Planner:
        """The planner's core over the whole log now. Kept and fed only what the log gained since the last
        call (the core is deterministic: incremental equals from scratch), so polling it stays cheap."""
        assert self.js is not None
        with contextlib.suppress(NotFoundError):  # no stream yet: the watcher has not started
            await replay_log(self.js, self.view, None)  # to the log's end
        return self.view

    def node_state(self, planner: Planner, node: str) -> NodeState:
        return node_state(planner, node, self.exclude_cidrs)

    async def report_entries(self, node: str) -> list[tuple[int, events.ApplyReport]]:
        """The node's apply reports with their times (ns)."""
        assert self.js is not None
        return [(e.envelope.time_ns, e.envelope.record)
                for e in await read_all(self.js, bus.LogReader(topology.STATUS_STREAM),
                                        topology.status_subject(node, "applied"))
                if e.envelope is not None and isinstance(e.envelope.record, events.ApplyReport)]

    async def reports(self, node: str) -> list[events.ApplyReport]:
        return [report for _, report in await self.report_entries(node)]

    async def node_in_step(self, planner: Planner, node: str) -> bool:
        """The node's last apply report says it holds the planned state (and, with netlink, its kernel does)."""
        reports = await self.reports(node)
        want = self.node_state(planner, node)
        if not reports or reports[-1].plan_seq != planner.seq or reports[-1].desired_digest != digest(want):
            return False
        return self.backend == "memory" or await self.kernel_table(node) == sorted(ipvsadm(want).splitlines())

    async def converged(self, within: float = 60.0) -> float:
        """Wait until the watcher has logged every object, the planner has planned it and every node holds it."""
        within *= time_scale()  # under emulation every process is slower
        started = asyncio.get_running_loop().time()
        deadline = started + within
        while True:
            planner = await self.planned()
            if self.sim is not None and _logged_all(planner, self.sim):
                checks = [await self.node_in_step(planner, n) for n in self.node_names()]
                if all(checks):
                    return asyncio.get_running_loop().time() - started
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the system did not converge within {within:.0f}s; logs in {self.workdir / 'logs'}")
            await asyncio.sleep(0.2)

    async def kernel_table(self, node: str) -> list[str]:
        """The node's IPVS table, less its draining real servers (:func:`network.ipvs_table`)."""
        return await network.ipvs_table(node)

    async def ipvsadm_list(self, node: str) -> str:
        if self.backend == "memory":
            planner = await self.planned()
            return ipvsadm(self.node_state(planner, node))
        return (await network.in_node(node, "ipvsadm", "-L", "-n"))[1]

    async def requests(self, node: str, ip: str, port: int, count: int = 1) -> list[str]:
        """``count`` HTTP requests from inside ``node`` through ``ip:port`` (:func:`network.requests`). The
        node's traffic to a VIP is masqueraded by kipvs's nftables rules, as kube-proxy's rule does: replies
        from a pod on another node come back to this node, not to the VIP that every node holds."""
        return await network.requests(node, ip, port, count)

    async def request(self, node: str, ip: str, port: int) -> str:
        return (await self.requests(node, ip, port))[0]

    # --- stopping ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        for service in list(self.processes):
            process = self.processes.pop(service)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10 * time_scale())
            except TimeoutError:
                process.kill()
                await process.wait()
        if self.pod_server is not None:
            with contextlib.suppress(ProcessLookupError):
                self.pod_server.kill()
            await self.pod_server.wait()
        if self.nc is not None:
            await self.nc.close()
        if self.sim is not None:
            await self.sim.stop()
        if self.nats_server is not None:
            await self.nats_server.stop()
        if self.backend == "netlink":
            network.teardown(self.nodes, list(self.pods.values()))


def leader_elect_flags() -> list[str]:
    """``--leader-elect`` with the lease's timing (the defaults, 3/2/0.5 s) stretched by half the time
    scale: under emulation a renewal can take longer than 2 s without any planner being dead."""
    stretch = max(1.0, time_scale() / 2)
    return ["--leader-elect", f"--leader-elect-lease-duration={3.0 * stretch}",
            f"--leader-elect-renew-deadline={2.0 * stretch}", f"--leader-elect-retry-period={0.5 * stretch}"]


async def active_planner(cluster: Cluster) -> str | None:
    """The name of the planner-<n> process holding the lease (its holderIdentity is
    ``<host>_<pid>_<random>``, failover.default_identity), or None while none holds it."""
    assert cluster.js is not None
    try:
        entry = await (await cluster.js.key_value(topology.PLANNER_LEASE_BUCKET)).get(topology.PLANNER_LEASE_KEY)
    except (NotFoundError, nats.errors.TimeoutError):  # KeyNotFoundError is one
        return None
    holder, _ = parse_lease(entry.value)
    pid = holder.split("_")[-2] if holder.count("_") >= 2 else ""
    return next((name for name, process in cluster.processes.items()
                 if name.startswith("planner-") and str(process.pid) == pid), None)


def _internal_ip(node: dict[str, Any]) -> str:
    return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")


def _logged_all(planner: Planner, sim: Simulator) -> bool:
    """Every object the simulator holds is in the planner's view at its current resourceVersion."""
    want = {(o["kind"], _key(o)): o["metadata"]["resourceVersion"] for o in sim.store.objects.values()}
    return set(planner.versions) == set(want) and all(planner.versions[k] == rv for k, rv in want.items())


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return events.object_key(meta.get("namespace", ""), meta["name"])


def workdir_for(base: Path | None = None) -> Path:
    where = base or Path(os.environ.get("TMPDIR", "/tmp")) / f"kipvs-demo-{os.getpid()}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    return where
