"""The watcher against the simulator (real kubernetes-asyncio client) and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nats

from services.harness.simulator.server import Simulator
from services.planner.core import Planner
from services.watcher.main import WatcherConfig, watch
from shared.contract import events, topology
from shared.messaging import bus
from shared.service import config, runtime
from tests import kube
from tests.helpers import eventually
from tests.logread import parked_reasons, read_stream


class RunningWatcher:
    def __init__(self, task: asyncio.Task, stop: asyncio.Event) -> None:
        self.task, self.stop = task, stop

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


def start_watcher(nats_url: str, kubeconfig: Path, **settings) -> RunningWatcher:
    cfg = config.load(WatcherConfig, {"nats_url": nats_url, "kubeconfig": str(kubeconfig), "http_listen": "",
                                      "read_timeout": 2.0, "watch_timeout": 30, **settings}, {})
    stop = asyncio.Event()
    return RunningWatcher(asyncio.create_task(runtime.run_service("watcher", cfg, watch, stop=stop)), stop)


def kubeconfig_for(sim: Simulator, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(sim.kubeconfig())
    return path


async def kube_events(nats_url: str) -> list[events.KubeEvent]:
    nc = await nats.connect(nats_url)
    try:
        return [env.record for _, env in await read_stream(nc.jetstream(), topology.KUBE_STREAM)
                if isinstance(env.record, events.KubeEvent)]
    except nats.js.errors.NotFoundError:
        return []
    finally:
        await nc.close()


def check_log(records: list[events.KubeEvent], sim: Simulator) -> None:
    """Exactly once and complete: per object, versions strictly increase (no repeats, in order), and the
    last record of every object is the cluster's truth (alive at its version, or deleted)."""
    history: dict[tuple[str, str, str], list[events.KubeEvent]] = defaultdict(list)
    for r in records:
        history[(r.kind, r.namespace, r.name)].append(r)
    for key, recs in history.items():
        versions = [int(r.resource_version) for r in recs]
        assert versions == sorted(set(versions)), f"{key}: repeated or out-of-order versions {versions}"
        actions = [r.action for r in recs]
        for before, after in itertools.pairwise(actions):
            assert not (before == "DELETED" and after == "MODIFIED"), f"{key}: {actions}"
            assert not (before != "DELETED" and after == "ADDED"), f"{key}: {actions}"
    for key, recs in history.items():
        obj = sim.store.objects.get(key)
        if obj is None:
            assert recs[-1].action == "DELETED", f"{key} is gone but the log says {recs[-1].action}"
        else:
            assert recs[-1].action != "DELETED" and recs[-1].resource_version == obj["metadata"]["resourceVersion"], key
    missing = set(sim.store.objects) - set(history)
    assert not missing, f"objects never logged: {missing}"


async def logged_up_to_date(nats_url: str, sim: Simulator) -> bool:
    try:
        check_log(await kube_events(nats_url), sim)
        return True
    except AssertionError:
        return False


async def until_logged(nats_url: str, sim: Simulator, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await logged_up_to_date(nats_url, sim):
        if asyncio.get_running_loop().time() > deadline:
            check_log(await kube_events(nats_url), sim)  # raises with the reason
        await asyncio.sleep(0.1)


async def populate(sim: Simulator, n: int = 5) -> None:
    await sim.apply(kube.node("node-a"))
    for i in range(n):
        await sim.apply(kube.service(f"web-{i}", cluster_ip=f"10.96.0.{i + 10}"))
        await sim.apply(kube.endpoint_slice(f"web-{i}-abc", f"web-{i}", [kube.endpoint(f"10.244.1.{i + 10}")]))
        await sim.apply(kube.pod(f"web-{i}-pod", ip=f"10.244.1.{i + 10}"))


async def test_initial_list_and_live_changes_exactly_once_in_order(nats_url: str, sim: Simulator,
                                                                    tmp_path: Path) -> None:
    await populate(sim)
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), record=str(tmp_path / "rec.jsonl"))
    await until_logged(nats_url, sim)
    for i in range(3):
        await sim.apply(kube.service("web-0", cluster_ip=f"10.96.1.{i}"))
    await sim.delete("Pod", "default", "web-1-pod")
    await sim.apply(kube.service("late"))
    await until_logged(nats_url, sim)
    await w.close()
    records = await kube_events(nats_url)
    web0 = [(r.action, r.origin) for r in records if r.name == "web-0" and r.kind == "Service"]
    assert web0 == [("ADDED", "list"), ("MODIFIED", "watch"), ("MODIFIED", "watch"), ("MODIFIED", "watch")]
    # The recorded file replays to the true state of the cluster.
    state: dict[tuple[str, str, str], str] = {}
    for line in (tmp_path / "rec.jsonl").read_text().splitlines():
        ev = json.loads(line)
        meta = ev["object"]["metadata"]
        key = (ev["object"]["kind"], meta.get("namespace", ""), meta["name"])
        if ev["type"] == "DELETED":
            state.pop(key)
        else:
            state[key] = meta["resourceVersion"]
    assert state == {k: o["metadata"]["resourceVersion"] for k, o in sim.store.objects.items()}


async def test_dropped_connections_and_410_storm_lose_nothing(nats_url: str, sim: Simulator, tmp_path: Path) -> None:
    await populate(sim)
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path))
    await until_logged(nats_url, sim)
    for round_ in range(4):
        sim.drop_watches()
        await sim.apply(kube.service(f"web-{round_}", cluster_ip=f"10.96.2.{round_}"))
        await sim.delete("EndpointSlice", "default", f"web-{round_}-abc")  # deleted during the outage
        sim.compact()  # the watch cannot resume: 410, relist
        await asyncio.sleep(0.2)
    await until_logged(nats_url, sim)
    await w.close()
    records = await kube_events(nats_url)
    deletes = sorted(r.name for r in records if r.action == "DELETED" and r.kind == "EndpointSlice")
    assert deletes == ["web-0-abc", "web-1-abc", "web-2-abc", "web-3-abc"]
    check_log(records, sim)


async def test_half_open_stream_is_detected_and_resumed(nats_url: str, sim: Simulator, tmp_path: Path) -> None:
    await populate(sim, 2)
    sim.bookmark_interval = 30.0  # no bookmarks: only the read timeout can tell a stalled stream
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), read_timeout=1.0)
    await until_logged(nats_url, sim)
    await eventually(lambda: len(sim.watches) == 5, what="all five watches open")
    assert sim.stall_watches() == 5
    await sim.apply(kube.service("after-stall"))
    await until_logged(nats_url, sim, within=15)
    await w.close()


async def test_two_watchers_at_once_never_duplicate(nats_url: str, sim: Simulator, tmp_path: Path) -> None:
    await populate(sim)
    kc = kubeconfig_for(sim, tmp_path)
    a, b = start_watcher(nats_url, kc), start_watcher(nats_url, kc)
    for i in range(10):
        await sim.apply(kube.service("web-0", cluster_ip=f"10.96.3.{i}"))
        if i == 5:
            sim.drop_watches()
    await sim.delete("Service", "default", "web-1")
    await until_logged(nats_url, sim)
    await asyncio.sleep(0.5)  # let the slower watcher catch up and try to append the same events
    await a.close()
    await b.close()
    check_log(await kube_events(nats_url), sim)


async def test_malformed_objects_and_lines_are_parked_not_fatal(nats_url: str, sim: Simulator,
                                                               tmp_path: Path) -> None:
    await populate(sim, 1)
    sim.store.create({"kind": "Service", "metadata": {"namespace": "default"}, "spec": {}}, validate=False)
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), kinds=["Service"])
    await eventually(lambda: len(sim.watches) == 1, what="the Service watch")
    await sim.inject_watch_line("Service", "{this is not json")
    await sim.inject_watch_line("Service", json.dumps({"type": "ADDED", "object": {"metadata": {"name": "x"}}}))
    await sim.apply(kube.service("after-garbage"))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    for _ in range(1200):  # up to a minute on a loaded machine; returns as soon as it holds
        if len(await parked_reasons(js)) >= 3:
            break
        await asyncio.sleep(0.1)
    reasons = await parked_reasons(js)
    assert any("metadata.name is missing" in r for r in reasons), reasons
    assert any("watch line is not valid JSON" in r for r in reasons), reasons
    assert any("resourceVersion is missing" in r for r in reasons), reasons
    names = []
    for _ in range(50):
        names = [r.name for r in await kube_events(nats_url) if r.kind == "Service"]
        if "after-garbage" in names:
            break
        await asyncio.sleep(0.1)
    assert "after-garbage" in names, "the watcher stopped after bad input"
    await w.close()
    await nc.close()


async def test_sigkill_and_restart_resumes_from_the_log(nats_url: str, sim: Simulator, tmp_path: Path) -> None:
    await populate(sim, 20)
    kc = kubeconfig_for(sim, tmp_path)
    exe = Path(sys.executable).parent / "kipvs"
    cmd = [str(exe), "watcher", "--nats-url", nats_url, "--kubeconfig", str(kc), "--http-listen", "",
           "--read-timeout", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await until_logged(nats_url, sim)
        churn = asyncio.create_task(_churn(sim, 40))
        await asyncio.sleep(0.15)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst
        proc.wait(5)
        await churn
        for i in range(5):  # deleted while no watcher runs
            await sim.delete("Pod", "default", f"web-{i}-pod")
        sim.compact()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await until_logged(nats_url, sim)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, "the watcher did not stop cleanly on SIGTERM"
    records = await kube_events(nats_url)
    resync_deletes = [r.name for r in records if r.origin == "resync"]
    assert sorted(resync_deletes) == sorted(f"web-{i}-pod" for i in range(5))


async def _churn(sim: Simulator, n: int) -> None:
    for i in range(n):
        await sim.apply(kube.service(f"web-{i % 20}", cluster_ip=f"10.96.4.{i}"))
        await asyncio.sleep(0.01)


async def test_record_file_follows_the_log_when_an_ack_was_lost(nats_url: str, tmp_path: Path) -> None:
    """An append whose acknowledgement was lost (NATS killed after storing it) is retried and answered
    'duplicate': the change is in the log, so it must be in --record too (issue 13)."""
    from services.watcher.event_log import EventLog
    from services.watcher.objects import plan_event
    from shared.messaging import bus

    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    svc = kube.service("web")
    svc["metadata"]["resourceVersion"] = "7"
    event = plan_event("Service", "ADDED", svc, None, "watch")
    assert event is not None
    # The first attempt reached the store; its ack never came back.
    first = events.Envelope(id=event.id, time_ns=1, producer="watcher/a", record=event.record)
    await bus.publish(js, event.ident.subject, first, expected_last_subject_seq=0)
    record = tmp_path / "rec.jsonl"
    with record.open("a") as f:
        log = EventLog(js, "Service", {}, f)
        assert await log.append(event) is False, "the log has it already"
        assert await log.append(event) is False
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(x["type"], x["object"]["metadata"]["name"]) for x in lines] == [("ADDED", "web")], \
        "recorded exactly once, as the log holds it"
    await nc.close()


async def test_garbage_last_on_an_objects_subject_is_appended_over_not_a_crash_loop(nats_url: str, sim: Simulator,
                                                                                 tmp_path: Path) -> None:
    """Found by a new user: garbage last on an object's subject made every watcher start fail (issue 13)."""
    from shared.messaging import bus

    nc = await nats.connect(nats_url)
    await bus.setup(nc)
    await nc.jetstream().publish(topology.kube_object_subject("Service", "default", "web"), b"garbage\xff")
    await nc.close()
    await sim.apply(kube.service("web"))
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path))
    async def logged_web() -> list[events.KubeEvent]:
        nc = await nats.connect(nats_url)
        out = []
        async for msg in bus.read_stream(nc.jetstream(), bus.LogReader(topology.KUBE_STREAM),
                                         topology.kube_object_subject("Service", "default", "web")):
            with contextlib.suppress(events.ContractError):  # the garbage itself
                out.append(events.decode(msg.data).record)
        await nc.close()
        return out

    for _ in range(600):
        records = await logged_web()
        if records or w.task.done():
            break
        await asyncio.sleep(0.05)
    assert not w.task.done(), f"the watcher died: {w.task.exception()}"
    await w.close()
    assert [(r.action, r.name) for r in records] == [("ADDED", "web")]


# --- a restored API server (issue 21) ------------------------------------------------------------------------


async def log_state(nats_url: str) -> tuple[dict[tuple[str, str, str], events.KubeEvent], Planner]:
    """The last record of every object in the log, and the planner core fed the whole log in order (as a
    planner rebuilding from it does)."""
    nc = await nats.connect(nats_url)
    try:
        last: dict[tuple[str, str, str], events.KubeEvent] = {}
        planner = Planner()
        async for msg in bus.read_stream(nc.jetstream(), bus.LogReader(topology.KUBE_STREAM)):
            env = events.decode(msg.data)
            if isinstance(env.record, events.KubeEvent):
                last[(env.record.kind, env.record.namespace, env.record.name)] = env.record
            planner.handle(env, msg.metadata.sequence.stream)
        return last, planner
    finally:
        await nc.close()


def restore_mismatch(last: dict[tuple[str, str, str], events.KubeEvent], planner: Planner, sim: Simulator) -> str:
    """What differs between the cluster's Services and (the log's last records, the planner's state); ""."""
    truth = {k: o for k, o in sim.store.objects.items() if k[0] == "Service"}
    alive = {k: r for k, r in last.items() if k[0] == "Service" and r.action != "DELETED"}
    if set(alive) != set(truth):
        return f"log: alive {sorted(set(alive) ^ set(truth))} differ"
    for key, obj in truth.items():
        rec = alive[key]
        if (rec.resource_version, rec.object["spec"]) != (obj["metadata"]["resourceVersion"], obj["spec"]):
            return f"log: {key} holds rv {rec.resource_version} {rec.object['spec']['clusterIP']}, the API " \
                   f"server {obj['metadata']['resourceVersion']} {obj['spec']['clusterIP']}"
    held = {f"{ns}/{name}": o["spec"]["clusterIP"] for (_, ns, name), o in truth.items()}
    planned = {key: spec.cluster_ips[0] for key, spec in planner.services.items()}
    if planned != held:
        return f"planner: {sorted(set(planned.items()) ^ set(held.items()))} differ"
    return ""


async def until_restored(nats_url: str, sim: Simulator, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        problem = restore_mismatch(*await log_state(nats_url), sim)
        if not problem:
            return
        assert asyncio.get_running_loop().time() < deadline, problem
        await asyncio.sleep(0.2)


async def _restore_history(sim: Simulator, round_: int) -> None:
    """100 changes over ten Services after a snapshot (one created, one deleted), then the restore: the
    snapshot's versions are handed out again by the 30 changes that follow."""
    sim.snapshot()
    for i in range(100):
        await sim.apply(kube.service(f"svc-{i % 10}", cluster_ip=f"10.96.{10 + round_}.{i}"))
    await sim.apply(kube.service("born-after-snapshot", cluster_ip="10.96.9.9"))
    await sim.delete("Service", "default", "svc-9")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_restored_api_server_resyncs_log_and_planner(nats_url: str, sim: Simulator, tmp_path: Path) -> None:
    """etcd restored from a snapshot without a revision bump: versions go back and are handed out again.
    The running watcher, and one restarted after more changes, bring the log and the planner to the API
    server's objects (on main every changed Service stayed frozen at its pre-restore version)."""
    warnings = _Lines()
    logging.getLogger("kipvs.watcher").addHandler(warnings)
    for i in range(10):
        await sim.apply(kube.service(f"svc-{i}", cluster_ip=f"10.96.0.{i}"))
    kc = kubeconfig_for(sim, tmp_path)
    w = start_watcher(nats_url, kc, kinds=["Service"])
    await _through_a_restore(nats_url, sim)
    logging.getLogger("kipvs.watcher").removeHandler(warnings)
    assert any("resourceVersions went back" in line and "re-syncing the log" in line for line in warnings.lines)
    await w.close()
    # across a restart: more history, a second restore while no watcher runs, then a new watcher
    await _restore_history(sim, 1)
    w = start_watcher(nats_url, kc, kinds=["Service"])
    await until_restored(nats_url, sim)
    await w.close()
    await sim.restore()
    for i in range(30):
        await sim.apply(kube.service(f"svc-{i % 10}", cluster_ip=f"10.96.60.{i}"))
    w = start_watcher(nats_url, kc, kinds=["Service"])
    await until_restored(nats_url, sim)
    await sim.apply(kube.service("svc-0", cluster_ip="10.96.70.1"))  # and the watch goes on from there
    await until_restored(nats_url, sim)
    await w.close()
    resyncs = [env.record for _, env in await _read_all(nats_url) if isinstance(env.record, events.KubeResync)]
    assert [r.restored for r in resyncs].count(True) >= 2, "each restore is marked on its resync record"


async def _read_all(nats_url: str) -> list[tuple[str, events.Envelope]]:
    nc = await nats.connect(nats_url)
    try:
        return await read_stream(nc.jetstream(), topology.KUBE_STREAM)
    finally:
        await nc.close()


# --- objects too deep or too large (issue 21) ----------------------------------------------------------------


def _deep(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


async def _logged_and_parked(nats_url: str, w: RunningWatcher, wanted: set[str], parked: int) -> tuple[set[str],
                                                                                                   list[str]]:
    """Wait until every name in ``wanted`` is logged and ``parked`` messages are parked; the watcher must live."""
    nc = await nats.connect(nats_url)
    try:
        for _ in range(600):  # up to a minute on a loaded machine
            names = {r.name for r in await kube_events(nats_url)}
            reasons = await parked_reasons(nc.jetstream())
            if wanted <= names and len(reasons) >= parked:
                break
            assert not w.task.done(), f"the watcher ended: {w.task.exception()!r}"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert wanted <= names, f"not logged: {wanted - names}"
    assert not w.task.done()
    return names, reasons


def _big_pod(name: str) -> dict:
    pod = kube.pod(name, ip="10.244.1.99")
    pod["metadata"]["annotations"] = {"blob": "x" * 1_450_000}  # 1.45 MB: over the 1 MiB max_payload
    return pod


async def test_deep_and_oversized_objects_in_a_list_are_parked_the_rest_logged(nats_url: str, sim: Simulator,
                                                                              tmp_path: Path) -> None:
    """A 1.45 MB Pod made the Pod list retry forever (MaxPayloadError); an object nested too deep for
    Python's JSON decoder (RecursionError) failed the whole list. Each is parked with the reason, the
    rest of the list is logged and the watch goes on."""
    sim.store.create(_big_pod("big-listed"))
    deep = '{"metadata": {"name": "deep-listed", "namespace": "default", "resourceVersion": "1"}, "spec": ' + \
        '{"a": ' * 1100 + "1" + "}" * 1101  # more than Python's json (and the simulator) can encode
    sim.inject_list_item("Service", deep)
    deeper_than_allowed = kube.service("deep-150")
    deeper_than_allowed["spec"]["extra"] = _deep(150)
    sim.store.create(deeper_than_allowed)
    for i in range(3):
        sim.store.create(kube.pod(f"pod-{i}", ip=f"10.244.1.{i + 1}"))
        sim.store.create(kube.service(f"svc-{i}", cluster_ip=f"10.96.0.{i + 1}"))
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), kinds=["Service", "Pod"])
    await asyncio.sleep(0.5)
    await sim.apply(kube.pod("after-pod", ip="10.244.1.9"))
    names, reasons = await _logged_and_parked(nats_url, w, {"svc-0", "svc-1", "svc-2", "pod-0", "pod-1", "pod-2",
                                                            "after-pod"}, 3)
    await w.close()
    assert not names & {"big-listed", "deep-listed", "deep-150"}, names
    assert [r for r in reasons if "big-listed" in r and "bytes as a record" in r and "max_payload" in r], reasons
    assert [r for r in reasons if "Service in the list nests too deep to decode" in r], reasons
    assert [r for r in reasons if "nests deeper than 100 levels" in r], reasons


async def test_deep_and_oversized_objects_in_a_watch_are_parked_the_rest_logged(nats_url: str, sim: Simulator,
                                                                               tmp_path: Path) -> None:
    """A watch line nested 1,100 deep (2.2 KB) ended the watcher process; a 1.45 MB Pod could not be
    logged. Each is parked with the reason and the watch goes on."""
    await sim.apply(kube.service("svc-0"))
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), kinds=["Service", "Pod"])
    await eventually(lambda: len(sim.watches) == 2, within=60, what="both lists done and watches open")
    line = '{"type": "ADDED", "object": ' + '{"a": ' * 1100 + "1" + "}" * 1100 + "}"
    assert len(line) > 2000
    await sim.inject_watch_line("Service", line)
    deep_watched = kube.service("deep-watched")
    deep_watched["spec"]["extra"] = _deep(150)  # decodable, but deeper than any consumer should take
    await sim.apply(deep_watched)
    await sim.apply(_big_pod("big-watched"))
    await sim.apply(kube.service("after", cluster_ip="10.96.0.9"))
    await sim.apply(kube.pod("after-pod", ip="10.244.1.9"))
    names, reasons = await _logged_and_parked(nats_url, w, {"svc-0", "after", "after-pod"}, 3)
    await w.close()
    assert not names & {"big-watched", "deep-watched"}, names
    assert [r for r in reasons if "big-watched" in r and "bytes as a record" in r], reasons
    assert [r for r in reasons if "Service watch line nests too deep to decode" in r], reasons
    assert [r for r in reasons if "nests deeper than 100 levels" in r], reasons


async def test_a_resync_record_over_the_max_payload_is_logged_in_key_ranges(nats_url: str) -> None:
    """30,000 live Pods make a 1.4 MB resync record: the server refused it, and the list retried forever.
    Now the live set goes in KubeResyncRange parts; a planner holding Pods the list lacks deletes them."""
    from services.watcher.event_log import EventLog

    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    log = EventLog(js, "Pod", {}, max_payload=lambda: nc.max_payload)
    live = {f"kube-system/coredns-7db6d8ff4d-{i:05d}": str(1_000_000 + i) for i in range(30_000)}
    assert await log.append_resync(events.KubeResync(kind="Pod", resource_version="2000000", live=live)) >= 2
    planner = Planner()
    held = [*list(live)[::5000], "kube-system/zz-gone", "aaa/gone", "kube-system/coredns-7db6d8ff4d-10000x"]
    for seq, key in enumerate(held, start=1):
        ns, _, name = key.partition("/")
        planner.handle(events.Envelope(id=f"p{seq}", time_ns=1, producer="t", record=events.KubeEvent(
            kind="Pod", action="ADDED", namespace=ns, name=name, resource_version="5",
            object=kube.pod(name, ns=ns))), seq)
    resyncs = bus.read_stream(js, bus.LogReader(topology.KUBE_STREAM), topology.kube_resync_subject("Pod"))
    msgs = [m async for m in resyncs]
    assert all(len(m.data) <= nc.max_payload for m in msgs)
    covered: dict[str, str] = {}
    for seq, msg in enumerate(msgs, start=100):
        env = events.decode(msg.data)
        assert isinstance(env.record, events.KubeResyncRange)
        covered |= env.record.live
        planner.handle(env, seq)
    await nc.close()
    assert covered == live
    assert {key for _, key in planner.versions} == set(list(live)[::5000]), "the parts deleted what the list lacks"



async def _through_a_restore(nats_url: str, sim: Simulator) -> None:
    """The issue's scenario once the first list is logged: 100 changes, a restore to the snapshot taken
    before them, then 30 changes; returns when the log holds the API server's objects."""
    await until_logged(nats_url, sim)
    await _restore_history(sim, 0)
    await until_logged(nats_url, sim)
    await sim.restore()
    for i in range(30):
        await sim.apply(kube.service(f"svc-{i % 10}", cluster_ip=f"10.96.50.{i}"))
    await until_restored(nats_url, sim)

async def test_two_watchers_through_a_restore_log_each_change_once(nats_url: str, sim: Simulator,
                                                                   tmp_path: Path) -> None:
    """Both watchers see the restore; the log follows the API server, and no object's history holds the
    same state twice in a row (exactly once, also for the re-sync)."""
    for i in range(10):
        await sim.apply(kube.service(f"svc-{i}", cluster_ip=f"10.96.0.{i}"))
    kc = kubeconfig_for(sim, tmp_path)
    a, b = start_watcher(nats_url, kc, kinds=["Service"]), start_watcher(nats_url, kc, kinds=["Service"])
    await _through_a_restore(nats_url, sim)
    await asyncio.sleep(1.0)  # let the slower watcher finish its own re-sync
    await a.close()
    await b.close()
    await until_restored(nats_url, sim, within=1)
    history: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for r in await kube_events(nats_url):
        history[(r.namespace, r.name)].append((r.action, r.resource_version, json.dumps(r.object, sort_keys=True)))
    for key, states in history.items():
        for before, after in itertools.pairwise(states):
            assert before != after, f"{key}: the same state logged twice in a row: {before[:2]}"
            assert not (before[0] == "DELETED" and after[0] == "DELETED"), f"{key}: deleted twice"


async def test_a_list_page_over_its_byte_bound_is_asked_again_smaller(nats_url: str, sim: Simulator,
                                                                      tmp_path: Path) -> None:
    """A list page was read whole, however large; now it has a bound, and the page is asked again with
    half the limit until it fits."""
    from services.watcher.event_log import EventLog
    from services.watcher.list_watch import KindWatcher, WatchMetrics, WatchSettings, list_function
    from shared.service.metrics import Registry

    for i in range(20):
        obj = kube.service(f"svc-{i}", cluster_ip=f"10.96.0.{i + 1}")
        obj["metadata"]["annotations"] = {"note": "n" * 10_000}
        await sim.apply(obj)
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    api = await kube.api_client(sim, tmp_path)
    try:
        watcher = KindWatcher("Service", list_function(api, "Service"), EventLog(js, "Service", {}), js,
                              WatchSettings(max_page_bytes=50_000), WatchMetrics.declare(Registry()),
                              asyncio.Event())
        await asyncio.wait_for(watcher._list(), 60)
    finally:
        await api.close()
        await nc.close()
    assert {r.name for r in await kube_events(nats_url)} == {f"svc-{i}" for i in range(20)}
    limits = [q for m, q in sim.requests if "limit=" in q]
    assert any("limit=500" in q for q in limits) and any("limit=3&" in q or q.endswith("limit=3") for q in limits)


async def test_an_object_that_cannot_be_taken_at_relist_is_never_taken_for_deleted(nats_url: str, sim: Simulator,
                                                                                 tmp_path: Path) -> None:
    """A listed object the watcher must park (too deep to decode) may be one the log holds: its absence from
    the list is no proof it is gone. The resync deleted the logged Service and nodes dropped it (found by a
    hostile review); now nothing missing from such a list is deleted, until a list without parked objects."""
    sim.store.create(kube.service("s4", cluster_ip="10.96.0.4"))
    sim.store.create(kube.service("s5", cluster_ip="10.96.0.5"))
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), kinds=["Service"])
    await _logged_and_parked(nats_url, w, {"s4", "s5"}, 0)
    await w.close()
    sim.store.delete("Service", "default", "s4")  # the list now lacks it; a deep copy of it stands in its place
    sim.inject_list_item("Service", '{"metadata": {"name": "s4", "namespace": "default", "resourceVersion": "99"}, '
                         '"spec": ' + '{"a": ' * 1100 + "1" + "}" * 1101)
    w = start_watcher(nats_url, kubeconfig_for(sim, tmp_path), kinds=["Service"])
    await _logged_and_parked(nats_url, w, {"s4", "s5"}, 1)
    for _ in range(300):  # the second list's resync record, within 30 s
        resyncs = await _resyncs(nats_url)
        if len(resyncs) >= 2:
            break
        await asyncio.sleep(0.1)
    await w.close()
    assert len(resyncs) >= 2
    assert [(e.name, e.action) for e in await kube_events(nats_url) if e.action == "DELETED"] == []
    assert set(resyncs[-1].live) == {"default/s4", "default/s5"}


async def _resyncs(nats_url: str) -> list[events.KubeResync]:
    nc = await nats.connect(nats_url)
    try:
        return [env.record for _, env in await read_stream(nc.jetstream(), topology.KUBE_STREAM)
                if isinstance(env.record, events.KubeResync)]
    finally:
        await nc.close()
