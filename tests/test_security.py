"""The secured bus (issue 14), against a real nats-server with kipvs's generated configuration and real TLS:
who is refused, what each identity may and may not do, and that the services still work with it on."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nkeys
import pytest
from nats.js.api import ConsumerConfig, DiscardPolicy

from services.planner.core import Planner
from shared.contract import events, topology
from shared.messaging import bus, plan_log
from shared.security import nats_credentials, nats_permissions, pki
from shared.security.nats_credentials import ClientAuth
from tests.helpers import eventually
from tests.secure_nats import SecureNats


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureNats]:
    server = SecureNats(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def declared(secure: SecureNats) -> AsyncIterator[SecureNats]:
    """The secured server with the topology declared by the admin identity (what 'kipvs topology apply' does)."""
    nc = await secure.connect("admin")
    await bus.setup(nc, 1, [topology.planner_consumer(), topology.applier_consumer("node-a"),
                            topology.applier_consumer("node-b")])
    await nc.close()
    yield secure


async def refused_to_connect(url: str, **options) -> str:
    """Connect once; the error nats-py or ssl raises, as text (fails when the connection is accepted)."""
    errors: list[str] = []

    async def record(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")

    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=1,
                                error_cb=record, **options)
    except Exception as exc:
        return " | ".join([*errors, f"{type(exc).__name__}: {exc}"])
    await nc.close()
    raise AssertionError(f"connected to {url} with {options}")


async def service_log_says(url: str, auth: ClientAuth | None, caplog: pytest.LogCaptureFixture, wanted: str) -> str:
    """Run bus.connect (the services' one path) until its log has a line with ``wanted``; that line."""
    stop = asyncio.Event()
    task = asyncio.create_task(bus.connect(url, "kipvs-test", stop, auth=auth))
    try:
        for _ in range(200):
            lines = [r.getMessage() for r in caplog.records if wanted in r.getMessage()]
            if lines:
                return lines[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no log line with {wanted!r}: {[r.getMessage() for r in caplog.records]}")
    finally:
        stop.set()
        with pytest.raises(bus.Stopped):
            await asyncio.wait_for(task, 15)


async def test_files_are_owner_only(secure: SecureNats) -> None:
    assert secure.dir.stat().st_mode & 0o777 == 0o700
    for path in secure.dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    # a second run keeps every credential (rotation is deleting one and running it again)
    before = {p.name: p.read_bytes() for p in secure.dir.iterdir()}
    assert not nats_credentials.ensure(secure.dir)
    assert before == {p.name: p.read_bytes() for p in secure.dir.iterdir()}


async def test_anonymous_and_wrong_identities_are_refused(secure: SecureNats, caplog) -> None:
    ca = secure.identity("tools").tls_context()
    anonymous = await refused_to_connect(secure.url, tls=ca)
    assert "Authorization Violation" in anonymous, anonymous
    stranger = secure.dir.parent / "stranger.nk"
    pki.write_private(stranger, nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER))
    wrong = await refused_to_connect(secure.url, tls=ca, nkeys_seed=str(stranger))
    assert "Authorization Violation" in wrong, wrong
    # the service's log names the identity and says the server refused it
    caplog.set_level(logging.WARNING, logger="kipvs.bus")
    line = await service_log_says(secure.url, ClientAuth(nkey_file=str(stranger), ca_file=str(secure.dir / "ca.pem")),
                                  caplog, "refused our identity")
    assert "stranger.nk" in line and "Authorization Violation" in line and "SU" not in line, line


async def test_untrusted_and_expired_certificates_are_refused(secure: SecureNats, caplog, tmp_path: Path) -> None:
    other = pki.make_ca("another CA")
    (tmp_path / "other-ca.pem").write_bytes(other.cert_pem)
    untrusted = ClientAuth(nkey_file=str(secure.dir / "tools.nk"), ca_file=str(tmp_path / "other-ca.pem"))
    text = await refused_to_connect(secure.url, **untrusted.connect_options())
    assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text, text
    caplog.set_level(logging.WARNING, logger="kipvs.bus")
    line = await service_log_says(secure.url, untrusted, caplog, "not trusted")
    assert "unable to get local issuer certificate" in line and "other-ca.pem" in line, line

    # the server's own certificate, expired yesterday (same CA): refused with that reason
    ca = pki.Issued((secure.dir / "ca.pem").read_bytes(), (secure.dir / "ca.key").read_bytes())
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = pki.issue_server(ca, pki.LOCAL_NAMES, days=29, now=long_ago)
    secure.stop()
    pki.write_private(secure.dir / "server.pem", expired.cert_pem)
    pki.write_private(secure.dir / "server.key", expired.key_pem)
    secure.start()
    caplog.clear()
    line = await service_log_says(secure.url, secure.identity("tools"), caplog, "not trusted")
    assert "certificate has expired" in line, line


async def test_hostname_is_checked(secure: SecureNats) -> None:
    """A certificate for other names than the URL's host is refused: 127.0.0.2 is not in its SANs."""
    text = await refused_to_connect(f"tls://127.0.0.2:{secure.port}", **secure.identity("tools").connect_options())
    assert "IP address mismatch" in text or "CERTIFICATE_VERIFY_FAILED" in text or "Connect call failed" in text, text


async def test_plain_tcp_client_is_refused(secure: SecureNats) -> None:
    text = await refused_to_connect(f"nats://127.0.0.1:{secure.port}", nkeys_seed=str(secure.dir / "tools.nk"))
    assert "TLS" in text or "SSL" in text or "secure" in text, text


async def permission_error(nc: nats.NATS, action) -> str:
    """Run ``action`` (a coroutine factory) and return the server's refusal, as the error callback got it."""
    seen: list[str] = []
    original = nc._error_cb

    async def record(exc: Exception) -> None:
        seen.append(str(exc))

    nc._error_cb = record
    try:
        with pytest.raises((nats.errors.Error, TimeoutError, nats.js.errors.Error)):
            await action()
        for _ in range(100):
            if any("permissions violation" in s.lower() for s in seen):
                break
            await asyncio.sleep(0.02)
    finally:
        nc._error_cb = original
    violations = [s for s in seen if "permissions violation" in s.lower()]
    assert violations, f"no permissions violation reported; saw {seen}"
    return violations[0]


async def test_tools_read_but_cannot_write(declared: SecureNats) -> None:
    admin = await declared.connect("admin")
    ajs = admin.jetstream()
    await ajs.publish(topology.kube_resync_subject("Service"), b"{}")
    await admin.close()

    tools = await declared.connect("tools", inbox_prefix="_INBOX_tools")
    js = tools.jetstream(timeout=3)
    read = [m async for m in bus.read_stream(js, bus.LogReader(topology.KUBE_STREAM))]
    assert len(read) == 1
    refusal = await permission_error(tools, lambda: js.publish(topology.PLAN_ALL_SUBJECT, b"x", timeout=1))
    assert topology.PLAN_ALL_SUBJECT in refusal
    refusal = await permission_error(tools, lambda: js.delete_stream(topology.PLAN_STREAM))
    assert "stream.delete.kipvs_plan" in refusal.lower()
    # nor may it update a durable that is not its own (the planner's), through any create subject
    refusal = await permission_error(tools, lambda: js.add_consumer(topology.KUBE_STREAM, ConsumerConfig(
        durable_name=topology.PLANNER_CONSUMER, filter_subject="kipvs.kube.>")))
    assert "consumer" in refusal.lower()
    refusal = await permission_error(tools, lambda: js.add_consumer(topology.KUBE_STREAM, ConsumerConfig(
        name=topology.PLANNER_CONSUMER, durable_name=topology.PLANNER_CONSUMER, filter_subject="kipvs.kube.>")))
    assert "consumer.create.kipvs_kube.planner" in refusal.lower()
    # any consumer-create right on KIPVS_PLAN would rewrite a node's durable by name (nats-server updates an
    # existing consumer through every create subject): the tools have none there, they read its mirror
    for config in (ConsumerConfig(name="applier-node-b", filter_subject=topology.plan_node_subject("node-a")),
                   ConsumerConfig(name="applier-node-b")):
        refusal = await permission_error(tools, lambda c=config: js.add_consumer(topology.PLAN_STREAM, c))
        assert "consumer.create.kipvs_plan" in refusal.lower()
    await tools.close()


# --- per-node applier identities: the auth callout, with tokens from the simulator's TokenRequest ---------

APPLIER_NS, APPLIER_SA = "kipvs-system", "kipvs-applier"


async def pod_token(sim, tmp_path: Path, pod: str, node: str | None, service_account: str = APPLIER_SA,
                    audience: str = "kipvs-nats") -> Path:
    """What the kubelet does for a projected token: a Pod on ``node`` and a TokenRequest bound to it; the
    token written to a file, as it is mounted into the applier's pod."""
    import aiohttp

    spec = {"nodeName": node} if node else {}
    created = await sim.apply({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": pod, "namespace": APPLIER_NS}, "spec": spec})
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": 3600,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod,
                                        "uid": created["metadata"]["uid"]}}}
    async with aiohttp.ClientSession() as http, http.post(
            f"{sim.url}/api/v1/namespaces/{APPLIER_NS}/serviceaccounts/{service_account}/token", json=body) as r:
        assert r.status == 201, await r.text()
        token = (await r.json())["status"]["token"]
    path = tmp_path / f"{pod}.token"
    pki.write_private(path, token.encode())
    return path


@pytest.fixture
async def callout(tmp_path: Path, sim) -> AsyncIterator[SecureNats]:
    """A secured server with the auth callout on, the topology declared, and ``kipvs auth`` answering."""
    from services.auth.main import AuthConfig, serve
    from shared.service import config, runtime

    server = SecureNats(tmp_path / "nats", callout=True)
    server.start()
    nc = await server.connect("admin")
    await bus.setup(nc, 1, [topology.planner_consumer()])
    await nc.close()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    cfg = config.load(AuthConfig, {"nats_url": server.url, "http_listen": "", "kubeconfig": str(kubeconfig),
                                   "nats_nkey_file": str(server.dir / "auth.nk"),
                                   "nats_ca_file": str(server.dir / "ca.pem"),
                                   "issuer_nkey_file": str(server.dir / "issuer.nk")}, {})
    stop = asyncio.Event()
    listening = asyncio.Event()

    class Ready(logging.Handler):  # nobody may publish on $SYS.REQ.USER.AUTH but the server: ask the log
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("answering NATS authorization requests"):
                listening.set()

    ready = Ready()
    logging.getLogger("kipvs.auth").addHandler(ready)
    task = asyncio.create_task(runtime.run_service("auth", cfg, serve, stop=stop))
    try:
        await asyncio.wait_for(listening.wait(), 30)
    finally:
        logging.getLogger("kipvs.auth").removeHandler(ready)
    yield server
    stop.set()
    await asyncio.wait_for(task, 30)
    server.stop()


def applier_identity(server: SecureNats, token: Path, node: str) -> ClientAuth:
    return ClientAuth(token_file=str(token), ca_file=str(server.dir / "ca.pem"),
                      inbox_prefix=f"_INBOX_applier-{node}")


async def test_a_node_gets_its_own_rights_and_nothing_else(callout: SecureNats, sim, tmp_path: Path) -> None:
    token = await pod_token(sim, tmp_path, "kipvs-applier-a1", "node-a")
    nc = await nats.connect(callout.url, allow_reconnect=False, connect_timeout=5,
                            **applier_identity(callout, token, "node-a").connect_options())
    js = nc.jetstream(timeout=3)
    # node-a creates its own durable (as its applier does after the bootstrap), reads it and reports
    await topology.recreate_applier_consumer(js, "node-a", 0)
    info = await js.consumer_info(topology.PLAN_STREAM, "applier-node-a")
    assert info.config.filter_subjects == [topology.PLAN_ALL_SUBJECT, topology.plan_node_subject("node-a")]
    sub = await js.pull_subscribe_bind(durable="applier-node-a", stream=topology.PLAN_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=0.5)  # allowed, just nothing yet
    ack = await js.publish(topology.status_subject("node-a", "applied"), b"{}")
    assert ack.stream == topology.STATUS_STREAM
    ack = await js.publish(topology.parked_subject("applier-node-a"), b"x")
    assert ack.stream == topology.PARKED_STREAM

    # its plan feed (KIPVS_PLAN's republish): the shared subject and its own node's, nothing of another node's
    fed: list[str] = []

    async def take(msg) -> None:
        fed.append(msg.subject)

    for subject in (topology.PLAN_ALL_SUBJECT, topology.plan_node_subject("node-a")):
        await nc.subscribe(topology.plan_feed_subject(subject), cb=take)
    await nc.flush(timeout=2)
    admin = await callout.connect("admin")
    await bus.setup(admin, 1, [topology.applier_consumer("node-b")])
    await admin.jetstream(timeout=5).publish(topology.PLAN_ALL_SUBJECT, b"{}")
    await admin.close()
    await eventually(lambda: fed == ["kipvs.feed.all"], 10, "the republished delta on node-a's feed")
    for subject in (topology.plan_feed_subject(topology.plan_node_subject("node-b")), "kipvs.feed.>"):
        refusal = await permission_error(nc, lambda subject=subject: _subscribe_and_flush(nc, subject))
        assert subject in refusal, refusal

    # its claim's key (node_claim.py: a takeover seen without a read per batch, issue 27), no other node's
    claims = f"$KV.{topology.APPLIER_CLAIMS_BUCKET}"
    own_key, other_key = f"{claims}.{topology.node_key('node-a')}", f"{claims}.{topology.node_key('node-b')}"
    seen: list[str] = []

    async def saw(msg) -> None:
        seen.append(msg.subject)
    await nc.subscribe(own_key, cb=saw)
    await nc.flush(timeout=2)
    await js.publish(own_key, b"{}")
    await eventually(lambda: seen == [own_key], 10, "node-a's own claim write on its key's subject")
    refusal = await permission_error(nc, lambda: _subscribe_and_flush(nc, other_key))
    assert other_key.lower() in refusal.lower(), refusal

    refusal = await permission_error(nc, lambda: js.publish(topology.PLAN_ALL_SUBJECT, b"{}", timeout=1))
    assert "kipvs.plan.all" in refusal
    other = await js.pull_subscribe_bind(durable="applier-node-b", stream=topology.PLAN_STREAM)
    refusal = await permission_error(nc, lambda: other.fetch(1, timeout=1))
    assert "consumer.msg.next.kipvs_plan.applier-node-b" in refusal.lower()
    refusal = await permission_error(nc, lambda: js.publish(topology.status_subject("node-b", "x"), b"{}", timeout=1))
    assert "kipvs.status.node-b.x" in refusal
    refusal = await permission_error(nc, lambda: js.publish(topology.parked_subject("applier-node-b"), b"x", timeout=1))
    assert "kipvs.parked.applier-node-b" in refusal
    refusal = await permission_error(nc, lambda: js.delete_stream(topology.PLAN_STREAM))
    assert "stream.delete.kipvs_plan" in refusal.lower()
    refusal = await permission_error(nc, lambda: js.add_consumer(topology.PLAN_STREAM, ConsumerConfig(
        durable_name="mine", filter_subject="kipvs.plan.>")))
    assert "consumer.durable.create.kipvs_plan.mine" in refusal.lower()
    # nor another node's durable: neither recreated nor deleted
    refusal = await permission_error(nc, lambda: topology.recreate_applier_consumer(js, "node-b", 0))
    assert "consumer.delete.kipvs_plan.applier-node-b" in refusal.lower()
    refusal = await permission_error(nc, lambda: topology.ensure_consumer(js, topology.applier_consumer("node-b")))
    assert "applier-node-b" in refusal.lower()
    refusal = await permission_error(nc, lambda: js.add_consumer(topology.KUBE_STREAM, ConsumerConfig(
        name="peek", filter_subject="kipvs.kube.>")))
    assert "consumer.create.kipvs_kube" in refusal.lower()
    # another node's inbox is not its to read
    refusal = await permission_error(nc, lambda: _subscribe_and_flush(nc, "_INBOX_applier-node-b.>"))
    assert "_inbox_applier-node-b" in refusal.lower()
    await nc.close()


async def _subscribe_and_flush(nc: nats.NATS, subject: str) -> None:
    await nc.subscribe(subject)
    await nc.flush(timeout=1)
    await asyncio.sleep(0.3)
    raise nats.errors.Error("subscription refused")  # the server's refusal arrives through the error callback


async def test_a_token_for_node_b_does_not_give_node_a(callout: SecureNats, sim, tmp_path: Path) -> None:
    token = await pod_token(sim, tmp_path, "kipvs-applier-b1", "node-b")
    # claiming node-a's inbox is not enough: the identity comes from the token
    nc = await nats.connect(callout.url, allow_reconnect=False, connect_timeout=5,
                            **applier_identity(callout, token, "node-b").connect_options())
    js = nc.jetstream(timeout=3)
    refusal = await permission_error(nc, lambda: js.publish(topology.status_subject("node-a", "applied"), b"{}",
                                                            timeout=1))
    assert "kipvs.status.node-a.applied" in refusal
    ack = await js.publish(topology.status_subject("node-b", "applied"), b"{}")
    assert ack.stream == topology.STATUS_STREAM
    await nc.close()


async def test_bad_tokens_are_refused_with_the_reason(callout: SecureNats, sim, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kipvs.auth")
    ca = str(callout.dir / "ca.pem")
    forged = tmp_path / "forged.token"
    forged.write_text("sim.not-a-token-the-cluster-issued")
    wrong_sa = await pod_token(sim, tmp_path, "someone-else", "node-a", service_account="default")
    no_node = await pod_token(sim, tmp_path, "pending-pod", None)
    wrong_audience = await pod_token(sim, tmp_path, "kipvs-applier-a2", "node-a", audience="https://kubernetes.default.svc")
    gone = await pod_token(sim, tmp_path, "kipvs-applier-a3", "node-a")
    await sim.delete("Pod", APPLIER_NS, "kipvs-applier-a3")
    cases = {forged: "invalid bearer token", wrong_sa: "is not the applier ServiceAccount",
             no_node: "the token names no node", wrong_audience: "is invalid for the target audiences",
             gone: 'pod "kipvs-applier-a3" not found'}
    for token, reason in cases.items():
        caplog.clear()
        text = await refused_to_connect(callout.url, **ClientAuth(token_file=str(token), ca_file=ca).connect_options())
        assert "Authorization Violation" in text, text
        await eventually_logged(caplog, reason)
        assert not any(token.read_text() in r.getMessage() for r in caplog.records), "a token was logged"
    # and the server logged the callout's reason too
    server_log = callout.log.read_text()
    assert "not the applier ServiceAccount" in server_log


async def eventually_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    for _ in range(100):
        if any(text in r.getMessage() for r in caplog.records):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}")


async def test_static_roles_still_work_with_the_callout_on(callout: SecureNats) -> None:
    tools = await callout.connect("tools", inbox_prefix="_INBOX_tools")
    info = await tools.jetstream(timeout=3).stream_info(topology.KUBE_STREAM)
    assert info.config.name == topology.KUBE_STREAM
    await tools.close()
    text = await refused_to_connect(callout.url, tls=callout.identity("tools").tls_context())
    assert "Authorization Violation" in text, text


async def test_the_pipeline_runs_with_identities_tls_and_the_callout(callout: SecureNats, sim, tmp_path: Path) -> None:
    """watcher -> planner (leader-elected) -> appliers of node-a and node-b, each with its own identity over TLS
    (static NKEYs for the watcher and the planner, pod tokens through the callout for the appliers); no
    service needs a subject its role does not have: the server logs no permission violation."""
    from services.applier.kernel.backend import MemoryKernel
    from services.applier.main import ApplierConfig, apply_plan
    from services.harness.simulator import scenario
    from services.planner import failover
    from services.planner.service_config import PlannerServiceConfig
    from services.watcher.main import WatcherConfig, watch
    from shared.contract import events
    from shared.service import config, runtime
    from tests.helpers import eventually, start_service

    cluster = scenario.load(Path(scenario.__file__).parent / "scenarios" / "small-cluster.yaml")
    await scenario.load_objects(sim, cluster)
    kubeconfig = tmp_path / "watcher-kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    ca = str(callout.dir / "ca.pem")
    common = {"nats_url": callout.url, "http_listen": "", "nats_ca_file": ca}
    watcher_cfg = config.load(WatcherConfig, {**common, "kubeconfig": str(kubeconfig), "read_timeout": 2.0,
                                              "nats_nkey_file": str(callout.dir / "watcher.nk")}, {})
    watcher_stop = asyncio.Event()
    watcher = asyncio.create_task(runtime.run_service("watcher", watcher_cfg, watch, stop=watcher_stop))
    # With leader election, as the manifests run it: the lease bucket, the fence marker and atomic batches
    # must all be within the planner's permissions too.
    planner_cfg = config.load(PlannerServiceConfig, {**common, "snapshot_every": "3", "leader_elect": "true",
                                                     "nats_nkey_file": str(callout.dir / "planner.nk")}, {})
    planner, planner_stop = start_service("planner", planner_cfg, failover.run)

    kernels = {node: MemoryKernel() for node in ("node-a", "node-b")}
    appliers = {}
    for node, kernel in kernels.items():
        token = await pod_token(sim, tmp_path, f"kipvs-applier-{node}", node)
        cfg = config.load(ApplierConfig, {**common, "node": node, "backend": "memory", "drift_period": "0.5",
                                          "nats_token_file": str(token)}, {})
        appliers[node] = start_service("applier", cfg, lambda ctx, k=kernel: apply_plan(ctx, k))
        if node == "node-a":  # node-b joins late: from the planner's snapshot and the plan's history
            await eventually(lambda: ("TCP", "10.96.0.10", 80) in kernels["node-a"].ipvs, what="node-a programmed")

    await eventually(lambda: all(("TCP", "10.96.0.10", 80) in k.ipvs for k in kernels.values()),
                     what="both nodes programmed")
    await sim.apply({**cluster.objects[3], "spec": {**cluster.objects[3]["spec"], "clusterIP": "10.96.0.10",
                                                    "ports": [{"name": "http", "port": 81, "targetPort": 8080,
                                                               "protocol": "TCP"}]}})
    await eventually(lambda: all(("TCP", "10.96.0.10", 81) in k.ipvs for k in kernels.values()),
                     what="a change reaching both nodes")

    for _, stop in appliers.values():
        stop.set()
    planner_stop.set()
    watcher_stop.set()
    await asyncio.wait_for(asyncio.gather(watcher, planner, *(t for t, _ in appliers.values())), 60)

    tools = await callout.connect("tools", inbox_prefix="_INBOX_tools")
    status = [m async for m in bus.read_stream(tools.jetstream(timeout=5), bus.LogReader(topology.STATUS_STREAM))]
    await tools.close()
    reporters = {events.decode(m.data).record.node for m in status
                 if isinstance(events.decode(m.data).record, events.ApplyReport)}
    assert reporters == {"node-a", "node-b"}
    server_log = callout.log.read_text()
    assert "Violation" not in server_log, [line for line in server_log.splitlines() if "Violation" in line]


# --- the manifests' secured wiring, checked with the real tools ------------------------------------------

def _secret_names(doc: dict) -> set[str]:
    spec = doc["spec"]["template"]["spec"]
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def test_each_workload_mounts_only_its_own_identity_and_the_secrets_exist(tmp_path: Path) -> None:
    import kubernetes_validate
    import yaml

    from shared.service.cli import main as kipvs
    from tests.test_deploy import documents

    assert kipvs(["credentials", "--dir", str(tmp_path / "c"), "--secrets", str(tmp_path / "secrets.yaml")]) == 0
    made = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    for secret in made:
        kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    made_names = {s["metadata"]["name"] for s in made}
    workloads = {d["metadata"]["name"]: d for d in documents() if d["kind"] in ("Deployment", "DaemonSet", "Job",
                                                                              "StatefulSet")}
    mounted = {name: _secret_names(doc) for name, doc in workloads.items()}
    assert mounted == {
        "nats": {"kipvs-nats-server-auth", "kipvs-nats-tls"},
        "kipvs-topology": {"kipvs-nats-admin", "kipvs-nats-ca"},
        "kipvs-watcher": {"kipvs-nats-watcher", "kipvs-nats-ca"},
        "kipvs-planner": {"kipvs-nats-planner", "kipvs-nats-ca"},
        "kipvs-auth": {"kipvs-nats-auth", "kipvs-nats-issuer", "kipvs-nats-ca"},
        "kipvs-applier": {"kipvs-nats-ca"},  # and its own projected token, no seed at all
    }
    assert set().union(*mounted.values()) <= made_names
    applier = workloads["kipvs-applier"]["spec"]["template"]["spec"]
    (token,) = [v for v in applier["volumes"] if v["name"] == "nats-token"]
    assert token["projected"]["sources"] == [{"serviceAccountToken": {"audience": "kipvs-nats",
                                                                      "expirationSeconds": 3600, "path": "token"}}]
    args = applier["containers"][0]["args"]
    assert args[args.index("--nats-token-file") + 1] == "/var/run/secrets/kipvs/nats/token"


def test_the_manifests_nats_config_runs_secured(tmp_path: Path) -> None:
    """deploy/kubernetes/20-nats.yaml's nats.conf, with the files 'kipvs credentials' makes, in a real
    nats-server (paths and ports moved into the test's directory): TLS on, no anonymous client, the tools
    identity connects and may read."""
    import os
    import subprocess

    import yaml

    from shared.messaging.embedded_nats import free_loopback_port, server_binary
    from shared.service.cli import main as kipvs
    from tests.helpers import wait_port

    creds_dir = tmp_path / "c"
    assert kipvs(["credentials", "--dir", str(creds_dir)]) == 0
    (config_map,) = [d for d in yaml.safe_load_all((Path(__file__).parents[1] / "deploy" / "kubernetes" /
                                                    "20-nats.yaml").read_text()) if d["kind"] == "ConfigMap"]
    text = config_map["data"]["nats.conf"]
    _monitoring_on_loopback_only(text)
    port, cluster, monitor = free_loopback_port(), free_loopback_port(), free_loopback_port()
    for tls_dir in (tmp_path / "etc" / "tls",):
        tls_dir.mkdir(parents=True)
        for name in ("ca.pem", "server.pem", "server.key"):
            (tls_dir / name).write_bytes((creds_dir / name).read_bytes())
    (tmp_path / "etc" / "auth").mkdir()
    (tmp_path / "etc" / "auth" / "auth.conf").write_bytes((creds_dir / "auth.conf").read_bytes())
    (tmp_path / "etc" / "config").mkdir()
    text = (text.replace("/etc/nats/tls", str(tmp_path / "etc" / "tls")).replace("/data", str(tmp_path / "data"))
            .replace("port: 4222", f"port: {port}\nhost: 127.0.0.1").replace("port: 6222", f"port: {cluster}")
            .replace("http: 127.0.0.1:8222", f"http: 127.0.0.1:{monitor}"))
    (tmp_path / "etc" / "config" / "nats.conf").write_text(text)
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen([server_binary(), "--config", str(tmp_path / "etc" / "config" / "nats.conf")],
                            stdout=log, stderr=log, env={**os.environ, "POD_NAME": "nats-0",
                                                 "CLIENT_ADVERTISE": f"127.0.0.1:{port}"})
    try:
        wait_port(port, proc)
        wait_port(monitor, proc)  # it does listen there, on loopback: the probes ask it

        async def check() -> None:
            # Anonymous: not a static user, so the server asks the auth callout, which does not run here: the
            # client is refused when the authorization timeout ends (nats-py may report the connection first).
            ca = ClientAuth(ca_file=str(creds_dir / "ca.pem")).tls_context()
            errors: list[str] = []

            async def record(exc: Exception) -> None:
                errors.append(str(exc))

            try:
                anonymous = await nats.connect(f"tls://localhost:{port}", allow_reconnect=False, connect_timeout=15,
                                               error_cb=record, tls=ca)
                with pytest.raises((nats.errors.Error, TimeoutError)):
                    await anonymous.jetstream(timeout=15).account_info()
                await anonymous.close()
            except (nats.errors.Error, OSError) as exc:
                errors.append(str(exc))
            assert errors, "the anonymous client was never refused"
            assert "authentication error" in (tmp_path / "nats.log").read_text()
            tools = ClientAuth(nkey_file=str(creds_dir / "tools.nk"), ca_file=str(creds_dir / "ca.pem"),
                               inbox_prefix="_INBOX_tools")
            nc = await nats.connect(f"tls://localhost:{port}", allow_reconnect=False, **tools.connect_options())
            await nc.flush(timeout=5)  # accepted (JetStream itself waits for the two other servers' routes)
            refusal = await permission_error(nc, lambda: _publish_and_flush(nc, topology.PLAN_ALL_SUBJECT))
            assert "kipvs.plan.all" in refusal
            await nc.close()

        asyncio.run(check())
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _monitoring_on_loopback_only(conf: str) -> None:
    """Issue 21: the NATS monitoring port (no authentication) was a containerPort on the pod's address."""
    import yaml

    assert "http: 127.0.0.1:8222" in conf and "http_port" not in conf and "https" not in conf, conf
    for doc in yaml.safe_load_all((Path(__file__).parents[1] / "deploy" / "kubernetes" / "20-nats.yaml").read_text()):
        assert "8222" not in str(doc.get("spec", {}).get("ports", "")), doc
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert all(p["containerPort"] != 8222 for p in container.get("ports", [])), container
            for probe in ("readinessProbe", "livenessProbe"):
                assert "httpGet" not in container[probe] and "127.0.0.1:8222" in str(container[probe]["exec"])


async def _publish_and_flush(nc: nats.NATS, subject: str) -> None:
    await nc.publish(subject, b"x")
    await nc.flush(timeout=1)
    await asyncio.sleep(0.3)
    raise nats.errors.Error("publish refused")  # the server's refusal arrives through the error callback


async def test_composes_server_config_with_a_static_node_identity(tmp_path: Path) -> None:
    """compose.yaml's credentials step: a whole server configuration and node-a's static identity, which has
    node-a's rights and not node-b's (no callout: no Kubernetes there)."""
    import json
    import subprocess

    from shared.messaging.embedded_nats import free_loopback_port, server_binary
    from shared.service.cli import main as kipvs
    from tests.helpers import wait_port

    d = tmp_path / "creds"
    assert kipvs(["credentials", "--dir", str(d), "--name", "nats", "--local-applier", "node-a", "--no-callout",
                  "--server-config", str(d / "nats-server.conf"), "--store-dir", str(tmp_path / "data")]) == 0
    config = json.loads((d / "nats-server.conf").read_text())
    assert "authorization" not in config and config["tls"]["cert_file"] == str(d / "server.pem")
    port = free_loopback_port()
    config.update(host="127.0.0.1", port=port, http_port=free_loopback_port())
    (tmp_path / "test.conf").write_text(json.dumps(config))
    with (tmp_path / "nats.log").open("wb") as log:
        proc = subprocess.Popen([server_binary(), "-c", str(tmp_path / "test.conf")], stdout=log, stderr=log)
    try:
        wait_port(port, proc)
        admin = ClientAuth(nkey_file=str(d / "admin.nk"), ca_file=str(d / "ca.pem"), inbox_prefix="_INBOX_admin")
        nc = await nats.connect(f"tls://127.0.0.1:{port}", allow_reconnect=False, **admin.connect_options())
        await bus.setup(nc, 1, [topology.applier_consumer("node-a")])
        await nc.close()
        node_a = ClientAuth(nkey_file=str(d / "applier.node-a.nk"), ca_file=str(d / "ca.pem"),
                            inbox_prefix="_INBOX_applier-node-a")
        nc = await nats.connect(f"tls://127.0.0.1:{port}", allow_reconnect=False, **node_a.connect_options())
        js = nc.jetstream(timeout=3)
        assert (await js.publish(topology.status_subject("node-a", "applied"), b"{}")).stream == topology.STATUS_STREAM
        refusal = await permission_error(nc, lambda: js.publish(topology.status_subject("node-b", "x"), b"{}",
                                                                timeout=1))
        assert "kipvs.status.node-b.x" in refusal
        await nc.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_tools_tap_and_replay_as_the_tools_identity(declared: SecureNats, tmp_path: Path) -> None:
    """'kipvs tap' and 'kipvs replay', as processes with the tools identity from the environment, read a
    log the watcher's and planner's identities wrote (the plan through its mirror, same sequences)."""
    import os
    import subprocess
    import sys

    from services.planner.active import plan
    from services.planner.service_config import PlannerServiceConfig
    from shared.service import config
    from tests.golden.regenerate import EVENTS
    from tests.helpers import publish_kube, start_service

    watcher = await declared.connect("watcher", inbox_prefix="_INBOX_watcher")
    await publish_kube(watcher.jetstream(timeout=5), EVENTS.read_text().splitlines()[:20], "sec")
    await watcher.close()
    cfg = config.load(PlannerServiceConfig, {"nats_url": declared.url, "http_listen": "",
                                             "nats_nkey_file": str(declared.dir / "planner.nk"),
                                             "nats_ca_file": str(declared.dir / "ca.pem")}, {})
    planner, stop = start_service("planner", cfg, plan)
    admin = await declared.connect("admin")
    ajs = admin.jetstream()

    async def mirrored() -> tuple[int, int]:
        return ((await ajs.stream_info(topology.PLAN_STREAM)).state.last_seq,
                (await ajs.stream_info(topology.PLAN_AUDIT_STREAM)).state.last_seq)

    for _ in range(600):
        plan_seq, mirror_seq = await mirrored()
        if plan_seq and plan_seq == mirror_seq:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(planner, 30)
    plan_seq, mirror_seq = await mirrored()
    assert plan_seq > 0 and plan_seq == mirror_seq
    await admin.close()

    kipvs = str(Path(sys.executable).parent / "kipvs")
    env = {**os.environ, "NATS_URL": declared.url, "KIPVS_NATS_NKEY_FILE": str(declared.dir / "tools.nk"),
           "KIPVS_NATS_CA_FILE": str(declared.dir / "ca.pem"), "KIPVS_STATE_DIR": str(tmp_path / "none")}
    tap = subprocess.run([kipvs, "tap", "--stream", "kube,plan", "--since", "1", "--no-follow", "--json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert tap.returncode == 0, tap.stderr
    import json

    lines = [json.loads(line) for line in tap.stdout.splitlines() if line.strip()]
    assert {line["stream"] for line in lines} == {topology.KUBE_STREAM, topology.PLAN_STREAM}
    assert max(line["seq"] for line in lines if line["stream"] == topology.PLAN_STREAM) == plan_seq
    replay = subprocess.run([kipvs, "replay"], capture_output=True, text=True, timeout=120, env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    # and without the identity, a sentence, not a traceback
    bare = {k: v for k, v in env.items() if not k.startswith("KIPVS_NATS_")}
    refused = subprocess.run([kipvs, "tap", "--since", "1", "--no-follow"], capture_output=True, text=True,
                             timeout=60, env=bare)
    assert refused.returncode == 2 and "cannot reach NATS" in refused.stderr and "Traceback" not in refused.stderr


async def test_an_applier_on_the_embedded_default_gets_its_own_node_identity(tmp_path: Path) -> None:
    """No flags at all: the embedded server is secured; 'kipvs applier --node node-a' gets a static identity with
    node-a's rights (made on first use, the running server reloaded) and its consumer declared by admin."""
    from services.applier.main import ApplierConfig
    from shared.messaging.embedded_nats import EmbeddedNats
    from shared.service import config, runtime

    seen: dict[str, object] = {}

    async def main(ctx: runtime.ServiceContext) -> None:
        # its own durable, created by itself as the applier does after its bootstrap
        seen["consumer"] = (await topology.recreate_applier_consumer(ctx.js, "node-a", 0)).config.durable_name
        seen["own"] = (await ctx.js.publish(topology.status_subject("node-a", "applied"), b"{}")).stream
        seen["other"] = await permission_error(ctx.nc, lambda: ctx.js.publish(
            topology.status_subject("node-b", "x"), b"{}", timeout=1))
        ctx.stop.set()

    cfg = config.load(ApplierConfig, {"state_dir": str(tmp_path), "http_listen": "", "node": "node-a",
                                      "backend": "memory"}, {})
    try:
        await asyncio.wait_for(runtime.run_service("applier", cfg, main, consumers=[]), 60)
        assert seen["consumer"] == "applier-node-a" and seen["own"] == topology.STATUS_STREAM
        assert "kipvs.status.node-b.x" in str(seen["other"])
        assert (tmp_path / "nats-auth" / "applier.node-a.nk").stat().st_mode & 0o777 == 0o600
    finally:
        EmbeddedNats.stop_running(tmp_path)


def test_jwts_round_trip_and_reject_tampering() -> None:
    """nats_jwt against its own rules (the server accepting them is tested above): signed by the issuer,
    checked against it, expiry enforced."""
    import base64
    import json

    from shared.security import nats_jwt

    account = nkeys.from_seed(nkeys.encode_seed(b"\x02" * 32, nkeys.PREFIX_BYTE_ACCOUNT))
    user = nkeys.from_seed(nkeys.encode_seed(b"\x03" * 32, nkeys.PREFIX_BYTE_USER)).public_key.decode()
    token = nats_jwt.encode(nats_jwt.user_claims(user, "KIPVS", "applier-node-a", {"pub": {"allow": ["x"]}},
                                                 expires=2_000_000_000), account, now=1_000_000_000)
    claims = nats_jwt.decode(token, "A", now=1_500_000_000)
    assert claims["iss"] == account.public_key.decode() and claims["sub"] == user and claims["aud"] == "KIPVS"
    assert claims["nats"]["type"] == "user" and claims["jti"] and claims["iat"] == 1_000_000_000
    with pytest.raises(nats_jwt.JwtError, match="expired"):
        nats_jwt.decode(token, "A", now=2_000_000_001)
    with pytest.raises(nats_jwt.JwtError, match="public N NKEY"):
        nats_jwt.decode(token, "N", now=1_500_000_000)  # an account issued it, not a server
    head, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["nats"]["pub"]["allow"] = [">"]
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(nats_jwt.JwtError, match="signature"):
        nats_jwt.decode(f"{head}.{forged_payload}.{signature}", "A", now=1_500_000_000)


def test_a_wrong_credential_file_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    kipvs = str(Path(sys.executable).parent / "kipvs")
    (tmp_path / "not-a-seed").write_text("hello\n")
    (tmp_path / "not-a-seed").chmod(0o600)
    seed = tmp_path / "open.nk"  # a valid seed others may read: refused like ssh refuses such a key
    seed.write_bytes(nkeys.encode_seed(b"\x04" * 32, nkeys.PREFIX_BYTE_USER))
    seed.chmod(0o644)
    for flags, said in ((["--nats-nkey-file", str(tmp_path / "missing.nk")], "cannot read the NKEY seed"),
                        (["--nats-nkey-file", str(seed)], "is readable by others (mode 0644)"),
                        (["--nats-nkey-file", str(tmp_path / "not-a-seed")], "does not hold an NKEY seed"),
                        (["--nats-ca-file", str(tmp_path / "missing.pem")], "cannot use the CA file")):
        done = subprocess.run([kipvs, "planner", "--nats-url", "nats://127.0.0.1:9", "--http-listen", "", *flags],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_a_service_waits_for_the_topology_and_says_so_until_admin_declares_it(secure: SecureNats) -> None:
    """The planner may not create streams: on an empty server it says what is missing, in one line, and
    retries; 'kipvs topology apply' with the admin identity declares everything and the planner goes on."""
    import subprocess
    import sys

    from services.planner.active import plan
    from services.planner.service_config import PlannerServiceConfig
    from shared.service import config, runtime
    from tests.helpers import eventually

    lines: list[str] = []

    class Keep(logging.Handler):  # on the logger itself: the service's logging setup replaces the root's handlers
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("kipvs.runtime").addHandler(keep)
    cfg = config.load(PlannerServiceConfig, {"nats_url": secure.url, "http_listen": "",
                                             "nats_nkey_file": str(secure.dir / "planner.nk"),
                                             "nats_ca_file": str(secure.dir / "ca.pem")}, {})
    ready = asyncio.Event()

    async def main(ctx: runtime.ServiceContext) -> None:
        ready.set()
        await plan(ctx)

    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run_service("planner", cfg, main, consumers=[topology.planner_consumer()],
                                                   stop=stop))
    try:
        await eventually(lambda: any("stream KIPVS_KUBE does not exist; the admin identity declares it" in line
                                     for line in lines), within=30, what="the planner saying what is missing")
    finally:
        logging.getLogger("kipvs.runtime").removeHandler(keep)
    assert not ready.is_set() and not task.done()
    kipvs = str(Path(sys.executable).parent / "kipvs")
    done = await asyncio.to_thread(subprocess.run, [
        kipvs, "topology", "apply", "--nats-url", secure.url, "--nats-nkey-file", str(secure.dir / "admin.nk"),
        "--nats-ca-file", str(secure.dir / "ca.pem")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "topology in place" in done.stdout + done.stderr, done.stdout + done.stderr
    await asyncio.wait_for(ready.wait(), 30)
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_the_kernel_view_runs_as_the_tools_identity(declared: SecureNats, capsys) -> None:
    """'kipvs ipvs' (and its --diff, which reads the published plan) connects with the tools identity and
    stays within it; without an applier answering it says so in one sentence."""
    import msgspec

    from shared.contract import events
    from shared.service import cli

    admin = await declared.connect("admin")  # stands in for node-a's applier: only the tool is under test

    async def answer(msg) -> None:
        await msg.respond(msgspec.msgpack.encode(events.IpvsInspectReply(
            node="node-a", backend="memory (test)", table=events.KernelTable(ipvs_version="1.2.1"))))

    await admin.subscribe(topology.inspect_subject("node-a"), cb=answer)
    await admin.flush()
    flags = ["--nats-url", declared.url, "--nats-nkey-file", str(declared.dir / "tools.nk"),
             "--nats-ca-file", str(declared.dir / "ca.pem")]
    try:
        assert await asyncio.to_thread(cli.main, ["ipvs", "--node", "node-a", *flags]) == 0
        assert "IP Virtual Server version 1.2.1" in capsys.readouterr().out
        assert await asyncio.to_thread(cli.main, ["ipvs", "--node", "node-a", "--diff", *flags]) == 0
        assert "0 differences" in capsys.readouterr().err
        assert await asyncio.to_thread(cli.main, ["ipvs", "--node", "node-b", "--timeout", "1", *flags]) == 2
        assert "no applier answered for node node-b" in capsys.readouterr().err
    finally:
        await admin.close()
    server_log = declared.log.read_text()
    assert "Violation" not in server_log, [line for line in server_log.splitlines() if "Violation" in line]


async def test_a_kernel_view_in_parts_passes_the_appliers_own_permissions(declared: SecureNats, capsys) -> None:
    """A 10,000-Service table is answered in parts by an applier with its node's identity: the server lets it
    send that many messages to the asker's reply subject (one response was the limit), and the tools
    identity takes them."""
    from services.applier import inspect
    from services.applier.kernel.backend import MemoryKernel
    from shared.plan.node_state import VirtualService
    from shared.security import nats_permissions as perms
    from shared.service import cli

    nats_credentials.ensure_local_applier(declared.dir, "node-a")
    declared.stop()
    declared.start()  # the server's configuration now has node-a's applier identity
    auth = ClientAuth(nkey_file=str(nats_credentials.local_applier_seed(declared.dir, "node-a")),
                      ca_file=str(declared.dir / nats_credentials.CA_CERT),
                      inbox_prefix=perms.inbox_prefix(perms.applier_durable("node-a")))
    applier = await nats.connect(declared.url, allow_reconnect=False, connect_timeout=3, **auth.connect_options())
    kernel = MemoryKernel()
    for i in range(10_000):
        key = ("TCP", f"10.96.{i >> 8}.{i & 255}", 80)
        kernel.ipvs[key] = VirtualService(*key, "rr", 0, {(f"10.244.{i >> 8}.{i & 255}", 8080): 1})
    await inspect.serve(applier, "node-a", kernel, lambda: ("apply", 0, ()))
    await applier.flush()
    flags = ["--nats-url", declared.url, "--nats-nkey-file", str(declared.dir / "tools.nk"),
             "--nats-ca-file", str(declared.dir / "ca.pem"), "--timeout", "10"]
    try:
        assert await asyncio.to_thread(cli.main, ["ipvs", "--node", "node-a", *flags]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert sum(1 for line in out.splitlines() if line.startswith("TCP  ")) == 10_000
    finally:
        await applier.close()
    server_log = declared.log.read_text()
    assert "Violation" not in server_log, [line for line in server_log.splitlines() if "Violation" in line]


def test_a_missing_role_identity_is_never_replaced_by_the_admins(tmp_path: Path) -> None:
    """On the embedded credentials, a role whose seed is gone is an error naming the file, not the admin's
    identity in its place (least privilege)."""
    from shared.security import nats_credentials

    directory = tmp_path / "nats-auth"
    nats_credentials.ensure(directory)
    (directory / "tools.nk").unlink()
    with pytest.raises(nats_credentials.CredentialsError, match=r"tools\.nk is missing"):
        nats_credentials.for_service("tools", "tools", embedded_dir=directory)



def test_an_identity_given_on_the_embedded_bus_trusts_its_servers_ca(tmp_path: Path) -> None:
    """``--nats-nkey-file`` without ``--nats-ca-file`` on a state directory's embedded server retried for
    ever on "certificate not trusted": the embedded server's own CA is the one to trust."""
    from shared.security import nats_credentials

    directory = tmp_path / "nats-auth"
    nats_credentials.ensure(directory)
    auth = nats_credentials.for_service("watcher", "watcher", nkey_file=str(directory / "watcher.nk"),
                                        embedded_dir=directory)
    assert auth is not None and auth.ca_file == str(directory / "ca.pem")
    given = nats_credentials.for_service("watcher", "watcher", nkey_file=str(directory / "watcher.nk"),
                                         ca_file="/etc/other/ca.pem", embedded_dir=directory)
    assert given is not None and given.ca_file == "/etc/other/ca.pem"

async def test_a_tool_with_another_roles_identity_says_what_was_refused(declared: SecureNats, capsys) -> None:
    """A valid identity of the wrong role (the watcher's) on a tool: the server's refusal in one sentence and
    exit 2, not a time-out traceback."""
    from shared.service import cli

    flags = ["--nats-url", declared.url, "--nats-nkey-file", str(declared.dir / "watcher.nk"),
             "--nats-ca-file", str(declared.dir / "ca.pem")]
    assert await asyncio.to_thread(cli.main, ["tap", "--stream", "plan", "--since", "1", "--no-follow",
                                              *flags]) == 2
    err = capsys.readouterr().err
    assert "NATS refused this identity" in err and "permissions violation" in err and "Traceback" not in err, err


async def _snapshot_by_admin(server: SecureNats) -> bytes:
    admin = await server.connect("admin")
    js = admin.jetstream(timeout=5)
    snap = Planner().snapshot(plan_stream_seq=3)
    data = events.encode(events.Envelope(id="snapshot/all/3", time_ns=1, producer="test", record=snap))
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    await store.put(topology.snapshot_object("all"), data)
    await admin.close()
    return data


async def test_a_hostile_node_cannot_make_consumers_or_fill_the_bus(callout: SecureNats, sim, tmp_path: Path) -> None:
    """Issue 21, High 5: with node-a's identity, 5,000 durables on the snapshot bucket's stream cost the servers
    248 MiB, and 1 MB messages on kipvs.status.node-a.<anything> filled the store. Now: no consumer there but
    its own reader (through which it still reads the snapshot), no other node's inspect subject, only the
    status kinds, each bounded by the server."""
    snapshot = await _snapshot_by_admin(callout)
    token = await pod_token(sim, tmp_path, "kipvs-applier-a9", "node-a")
    nc = await nats.connect(callout.url, allow_reconnect=False, connect_timeout=5,
                            **applier_identity(callout, token, "node-a").connect_options())
    js = nc.jetstream(timeout=3)
    obj = f"OBJ_{topology.SNAPSHOT_BUCKET}"
    refusal = await permission_error(nc, lambda: js.add_consumer(obj, ConsumerConfig(durable_name="d1")))
    assert f"consumer.durable.create.{obj}.d1".lower() in refusal.lower()
    refusal = await permission_error(nc, lambda: js.add_consumer(obj, ConsumerConfig(name="e1")))
    assert f"consumer.create.{obj}".lower() in refusal.lower()
    store = await js.object_store(topology.SNAPSHOT_BUCKET)  # nats-py's get: a consumer the server names
    await permission_error(nc, lambda: asyncio.wait_for(store.get(topology.snapshot_object("all")), 3))
    read = await plan_log._read_snapshot(js, nats_permissions.applier_reader("node-a"))  # its own reader: allowed
    assert read == snapshot
    refusal = await permission_error(nc, lambda: nc.request(topology.inspect_subject("node-b"), b"", timeout=1))
    assert "kipvs.inspect.node-b" in refusal
    refusal = await permission_error(nc, lambda: js.publish("kipvs.status.node-a.anything", b"{}", timeout=1))
    assert "kipvs.status.node-a.anything" in refusal
    with pytest.raises(nats.js.errors.APIError, match=r"(?i)maximum"):
        await js.publish(topology.status_subject("node-a", "drift"), b"x" * (topology.STATUS_MAX_MSG + 1))
    for i in range(topology.STATUS_PER_SUBJECT + 20):
        await js.publish(topology.status_subject("node-a", "facts"), b"%d" % i)
    admin = await callout.connect("admin")
    info = await admin.jetstream().stream_info(topology.STATUS_STREAM, subjects_filter="kipvs.status.node-a.facts")
    assert info.state.subjects == {"kipvs.status.node-a.facts": topology.STATUS_PER_SUBJECT}
    assert info.config.max_bytes == topology.STATUS_MAX_BYTES and info.config.discard == DiscardPolicy.OLD
    parked = await admin.jetstream().stream_info(topology.PARKED_STREAM)
    assert parked.config.max_bytes == topology.PARKED_MAX_BYTES
    assert parked.config.max_msg_size == topology.PARKED_MAX_MSG
    await admin.close()
    # its own claim only (one applier per node)
    claims = f"$KV.{topology.APPLIER_CLAIMS_BUCKET}"
    await js.publish(f"{claims}.node-a", b"{}")
    refusal = await permission_error(nc, lambda: js.publish(f"{claims}.node-b", b"{}", timeout=1))
    assert f"{claims}.node-b".lower() in refusal.lower()
    await nc.close()


async def test_a_service_with_another_roles_identity_says_so_in_one_line(declared: SecureNats) -> None:
    """Issue 21: a service (not only a tool) started with a valid identity of the wrong role retried forever
    without naming it. Now: the server's refusal in one sentence and exit 2."""
    import subprocess
    import sys

    kipvs = str(Path(sys.executable).parent / "kipvs")
    done = await asyncio.to_thread(subprocess.run, [
        kipvs, "planner", "--nats-url", declared.url, "--http-listen", "",
        "--nats-nkey-file", str(declared.dir / "watcher.nk"), "--nats-ca-file", str(declared.dir / "ca.pem")],
        capture_output=True, text=True, timeout=90)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith("kipvs planner: NATS refused this identity") and "permissions violation" in last, last
    assert "watcher.nk" in last, last  # the identity refused is named


async def test_the_planner_and_the_tools_read_the_snapshot_with_their_identities(declared: SecureNats) -> None:
    """The snapshot is read through a pull consumer now (plan_log._read_object), by every role."""
    snapshot = await _snapshot_by_admin(declared)
    for role in ("planner", "tools"):
        nc = await declared.connect(role)
        try:
            read = plan_log._read_snapshot(nc.jetstream(timeout=3), None)
            assert await asyncio.wait_for(read, 30) == snapshot, role
        finally:
            await nc.close()


async def test_the_tools_read_the_appliers_claims(declared: SecureNats) -> None:
    """kipvs status reads each node's superseded-applier record from the claims bucket as the tools identity."""
    import time

    from services.tools.status import second_appliers
    from shared.contract import node_claims

    admin = await declared.connect("admin")
    kv = await admin.jetstream().key_value(node_claims.BUCKET)
    await kv.put(node_claims.superseded_key("node-a"), node_claims.encode(node_claims.Superseded(
        node="node-a", instance="old/1/abc", by="new/1/def", at_ns=time.time_ns())))
    await admin.close()
    nc = await declared.connect("tools")
    try:
        found = await second_appliers(nc.jetstream(timeout=3), ["node-a", "node-b"], time.time_ns())
    finally:
        await nc.close()
    assert list(found) == ["node-a"] and "old/1/abc" in found["node-a"] and "new/1/def" in found["node-a"]
