"""Issue 26's smaller rough edges, each as a user meets it: kubectl against the simulator (get, annotate), ``kipvs plan
--at`` before the log began, ``kipvs why`` on a node that started after the change, a fresh node's first
apply in the applier's log, ``kipvs nats --stop`` seen by the server's owner."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config

from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.applier.ops import DesiredState, describe_changes, diff
from services.harness.simulator.server import Simulator
from services.harness.simulator.store import Store, merge_patch
from services.planner.main import PlannerServiceConfig, plan
from shared.contract import topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port
from shared.service import config
from tests import kube
from tests.golden.regenerate import EVENTS
from tests.helpers import kipvs, publish_kube, start_service, until
from tests.logread import read_stream

KIPVS = str(Path(sys.executable).with_name("kipvs"))
LINES = EVENTS.read_text().splitlines()


async def test_kubectl_lists_the_simulators_services(sim: Simulator, tmp_path: Path) -> None:
    """The simulator serves discovery (/api, /apis, each group version's resources) as kube-apiserver does,
    so kubectl with the simulator's kubeconfig lists its objects (it answered 404 to discovery before)."""
    await sim.apply(kube.service("web", cluster_ip="10.96.0.10"))
    await sim.apply(kube.node("node-a"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: run `make debs` (Debian's kubernetes-client ships it)")
    for argv, want in ((["get", "services", "-A"], "web"),
                       (["get", "svc", "-n", "default", "-o", "name"], "service/web"),
                       (["get", "nodes", "-o", "name"], "node/node-a"),
                       (["get", "endpointslices", "-A"], "No resources found")):
        done = await asyncio.to_thread(subprocess.run, [kubectl, "--kubeconfig", str(kubeconfig), *argv],
                                       capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and want in done.stdout + done.stderr, (argv, done.stdout, done.stderr)
    # the same discovery through the real Kubernetes client
    api = await kube_config.new_client_from_config(str(kubeconfig))
    try:
        core = await client.CoreV1Api(api).get_api_resources()
        assert {"services", "pods", "nodes"} <= {r.name for r in core.resources}
        groups = await client.ApisApi(api).get_api_versions()
        assert "discovery.k8s.io" in {g.name for g in groups.groups}
    finally:
        await api.close()


async def test_kubectl_annotate_patches_a_service_in_the_simulator(sim: Simulator, tmp_path: Path) -> None:
    """docs/kube-proxy.md's example, ``kubectl annotate service web kipvs.io/scheduler=sh``, works against the
    simulator: kubectl sends a JSON merge patch (the simulator answered 405 to PATCH before), a watch sees it
    as MODIFIED, and ``key-`` removes the annotation again."""
    await sim.apply(kube.service("web", cluster_ip="10.96.0.10"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: run `make debs` (Debian's kubernetes-client ships it)")

    async def run(*argv: str) -> str:
        done = await asyncio.to_thread(subprocess.run, [kubectl, "--kubeconfig", str(kubeconfig), *argv],
                                       capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout

    rv = sim.store.rv
    await run("annotate", "service", "web", "kipvs.io/scheduler=sh")
    service = json.loads(await run("get", "service", "web", "-o", "json"))
    assert service["metadata"]["annotations"] == {"kipvs.io/scheduler": "sh"}
    assert service["spec"]["clusterIP"] == "10.96.0.10", "the patch kept what it did not name"
    assert service["metadata"]["generation"] == 1, "metadata only: kube-apiserver leaves generation"
    assert [c.type for c in sim.store.history if c.rv > rv] == ["MODIFIED"]
    await run("annotate", "service", "web", "kipvs.io/scheduler-")
    service = json.loads(await run("get", "service", "web", "-o", "json"))
    assert "kipvs.io/scheduler" not in (service["metadata"].get("annotations") or {})


def test_generation_counts_spec_changes_only() -> None:
    """kube-apiserver's ``PrepareForUpdate``: generation + 1 for a spec change, not for labels, annotations
    or status; an EndpointSlice's labels count (pkg/registry/discovery/endpointslice/strategy.go)."""
    store = Store()
    store.create(kube.service("web", cluster_ip="10.96.0.10"))

    def generation() -> int:
        return store.get("Service", "default", "web")["metadata"]["generation"]

    store.patch("Service", "default", "web", {"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}})
    store.patch("Service", "default", "web", {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}})
    assert generation() == 1
    store.patch("Service", "default", "web", {"spec": {"sessionAffinity": "ClientIP"}})
    assert generation() == 2
    store.create(kube.endpoint_slice("web-1", "web", [kube.endpoint("10.244.1.5")]))
    store.patch("EndpointSlice", "default", "web-1", {"metadata": {"annotations": {"c": "d"}}})
    assert store.get("EndpointSlice", "default", "web-1")["metadata"]["generation"] == 1
    store.patch("EndpointSlice", "default", "web-1", {"metadata": {"labels": {"kubernetes.io/service-name": "x"}}})
    assert store.get("EndpointSlice", "default", "web-1")["metadata"]["generation"] == 2


def test_merge_patch_follows_rfc_7386() -> None:
    """RFC 7386's own examples (appendix A), plus: neither argument is changed."""
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch({"a": ["b"]}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch([1, 2], {"a": "b", "c": None}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


async def test_plan_at_a_moment_before_the_first_record_says_so(nats_url: str, capsys) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = await bus.setup(nc)
        await publish_kube(js, LINES, "golden")
        first_ns = (await read_stream(js, topology.KUBE_STREAM))[0][1].time_ns
    finally:
        await nc.close()
    before = (datetime.fromtimestamp(first_ns / 1e9, UTC) - timedelta(minutes=1)).isoformat()
    code, out, err = await kipvs("plan", "--nats-url", nats_url, "--node", "node-a", "--at", before, capsys=capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, (code, out, err)
    assert "is before the log's first record (KUBE #1" in err and "no Node" not in err, err


def test_a_fresh_nodes_first_programming_is_not_called_repairs() -> None:
    """The bootstrap's log line counts additions, changes and removals: an empty kernel's first programming
    is all additions (it said "35 repairs to reach it")."""
    desired = DesiredState.of({}, None).state()
    assert describe_changes([]) == "the kernel already matched it"
    ops = [f"AddService TCP 10.96.0.{i} 80" for i in range(3)] + ["AddReal x", "AddEntry y"]
    assert describe_changes(ops) == "5 kernel changes to reach it (5 added)"
    assert describe_changes(["AddReal a", "EditService b", "DelReal c", "DelService d"]) == (
        "4 kernel changes to reach it (1 added, 1 changed, 2 removed)")
    assert not diff(desired, desired, set())


async def test_why_does_not_read_a_nodes_start_up_wait_as_latency(nats_url: str, capsys) -> None:
    """The planner planned everything before node-a's applier started: the report that covers the VIP is
    the applier's bootstrap report, and `kipvs why` says it came at the node's start, not that programming
    took that long; a change while the applier runs is shown with its latency."""
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc, consumers=[topology.planner_consumer()])
    await publish_kube(js, LINES, "golden")
    common = {"nats_url": nats_url, "http_listen": ""}
    planner, planner_stop = start_service("planner", config.load(PlannerServiceConfig, common, {}), plan)
    applier = applier_stop = None
    try:
        async def planned() -> bool:
            info = await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)
            return info.ack_floor.stream_seq >= len(LINES)

        await until(planned, "the planner to plan the log")
        await asyncio.sleep(1.0)  # the change is well before the node starts
        cfg = config.load(ApplierConfig, {**common, "node": "node-a", "backend": "memory"}, {})
        applier, applier_stop = start_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel()))

        async def reported() -> bool:
            return bool(await read_stream(js, topology.STATUS_STREAM, "kipvs.status.node-a.applied"))

        await until(reported, "node-a's bootstrap report")
        code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "10.96.0.10:80", capsys=capsys)
        assert code == 0 and "start-up wait, not programming latency" in out, out
        assert "node-a started at plan seq=" in out and "kernel ops to reach it" in out, out
        assert "ms after the Kubernetes change)" not in out, out
        code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "10.96.0.10:80", "--json",
                                   capsys=capsys)
        since = json.loads(out)["since"]
        assert since["latency_ms"] is None and since["at_node_start"] and since["after_ms"] >= 1000, since

        late = kube.service("late", cluster_ip="10.96.0.77")
        late["metadata"]["resourceVersion"] = "999"
        await publish_kube(js, [json.dumps({"type": "ADDED", "object": late})], "late")

        async def late_applied() -> bool:
            code, out, _ = await kipvs("why", "--nats-url", nats_url, "--node", "node-a", "10.96.0.77:80",
                                       capsys=capsys)
            return code == 0 and "ms after the Kubernetes change)" in out

        await until(late_applied, "the live change's latency in kipvs why")
    finally:
        planner_stop.set()
        if applier_stop is not None:
            applier_stop.set()
        await asyncio.gather(planner, *([applier] if applier else []), return_exceptions=True)
        await nc.close()


def test_kipvs_nats_stop_is_a_clean_stop_for_the_servers_owner(tmp_path: Path) -> None:
    """`kipvs nats --stop` stops the server `kipvs nats` runs in the foreground: the owner says so and exits 0
    (it logged "nats-server exited on its own" as an ERROR and exited 1)."""
    port = free_loopback_port()
    owner = subprocess.Popen([KIPVS, "nats", "--state-dir", str(tmp_path), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert owner.stdout is not None
        assert "listening on" in owner.stdout.readline()
        done = subprocess.run([KIPVS, "nats", "--state-dir", str(tmp_path), "--stop"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "stopped the embedded NATS server" in done.stdout, done
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert owner.returncode == 0 and "ERROR" not in out and "was stopped" in out, (owner.returncode, out)


def test_a_failed_demo_step_copies_the_services_logs_out(tmp_path: Path, capsys) -> None:
    """A demo step that fails (here the auth service's start, its wait squeezed to nothing) copies the
    services' logs to --copy-logs-to (in the guest: its share with the host), and the host keeps them:
    the error's "see .../auth.log" pointed into a guest that was gone."""
    from services.harness.demo.main import keep_guest_logs

    env = {**os.environ, "KIPVS_GUEST_TIME_SCALE": "0.0001"}
    done = subprocess.run([sys.executable, "-m", "services.harness.demo.run", "--backend", "memory", "--workdir",
                           str(tmp_path / "work"), "--copy-logs-to", str(tmp_path / "share" / "logs")],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "the auth service did not start within" in out, out[-3000:]
    assert (tmp_path / "share" / "logs" / "auth.log").is_file(), out[-3000:]
    assert f"the services' logs are copied to {tmp_path / 'share' / 'logs'}" in out
    capsys.readouterr()
    keep_guest_logs(tmp_path / "share" / "logs", tmp_path / "kept")
    assert (tmp_path / "kept" / "auth.log").is_file()
    assert f"logs from the guest are kept in {tmp_path / 'kept'}" in capsys.readouterr().out


def test_the_demos_waits_follow_the_machines_pace(monkeypatch) -> None:
    """Calibration never shortens the guest's scale and stretches it when a Python start is slow."""
    from services.harness.demo import pace

    monkeypatch.setenv("KIPVS_GUEST_TIME_SCALE", "3")
    monkeypatch.setattr(pace, "REFERENCE_START_S", 1e-6)  # as if this machine were very slow
    assert pace.calibrate() == pytest.approx(3 * pace.MAX_STRETCH)
    monkeypatch.setenv("KIPVS_GUEST_TIME_SCALE", "3")
    monkeypatch.setattr(pace, "REFERENCE_START_S", 1e6)  # as if it were very fast
    assert pace.calibrate() == 3.0
