"""Planner failover (issue 17), with real parts: nats-server (one, and a three-server cluster with R3 streams
and an R3 lease bucket), the simulator, the watcher, two planners with ``--leader-elect`` and two appliers
(memory kernel) as processes.

- the lease and the fence against a real server, step by step (the paths a process test cannot force),
  and a batch sent again after an unknown outcome;
- kill -9 the active planner during churn: the standby takes over in under 5 s, the plan stream holds every
  delta a single planner replaying the same log publishes, exactly once, and the nodes converge;
- SIGSTOP the active planner, let the standby take over, SIGCONT it: nothing it publishes lands after the new
  planner's fence, and it stands by again.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.js.errors import APIError, KeyWrongLastSequenceError

from services.planner.core import Planner
from services.planner.fence import PUBLISHER, Deposed, raise_fence
from services.planner.lease import Lease, LeaseTiming, Observation, lease_value
from services.planner.publisher import PlanPublisher
from shared.contract import events, topology
from shared.messaging import bus
from shared.messaging.embedded_nats import free_loopback_port
from tests import kube
from tests.helpers import eventually
from tests.test_nats_faults import NODES, Server, System, _burst, _converged, _expected

FAST = LeaseTiming(lease_duration=1.5, renew_deadline=1.0, retry_period=0.25)


# -- pure parts ---------------------------------------------------------------------------------------------

def test_a_candidate_takes_a_free_lease_at_once_and_a_held_one_only_after_the_lease_duration() -> None:
    seen = Observation()
    assert seen.expired(now=0.0, lease_duration=3.0)  # never written
    assert seen.saw(revision=4, holder="a", now=10.0)
    assert not seen.expired(now=12.9, lease_duration=3.0)
    assert not seen.saw(revision=4, holder="a", now=12.0)  # the same entry again: the clock does not restart
    assert seen.expired(now=13.0, lease_duration=3.0)
    assert seen.saw(revision=5, holder="a", now=13.0)  # renewed: wait again
    assert not seen.expired(now=15.0, lease_duration=3.0)
    assert seen.saw(revision=6, holder="", now=15.0)  # released
    assert seen.expired(now=15.0, lease_duration=3.0)


def test_leader_election_timing_must_let_the_holder_give_up_first() -> None:
    LeaseTiming(3.0, 2.0, 0.5).check()
    for bad in (LeaseTiming(3.0, 3.0, 0.5), LeaseTiming(3.0, 2.0, 2.0), LeaseTiming(3.0, 4.0, 0.5)):
        with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
            bad.check()


# -- the lease and the fence against a real server -----------------------------------------------------------

async def test_lease_one_holder_a_standby_takes_over_when_renewals_stop_and_the_old_holder_learns_it(
        nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    stop = asyncio.Event()
    a, b = Lease(js, "a", FAST), Lease(js, "b", FAST)
    try:
        assert await asyncio.wait_for(a.acquire(stop), 5)  # free: at once
        a_lost = asyncio.Event()
        holding = asyncio.create_task(a.hold(a_lost))
        b_wins = asyncio.create_task(b.acquire(stop))
        await asyncio.sleep(3 * FAST.lease_duration)
        assert not b_wins.done(), "a standby took a lease that was being renewed"
        holding.cancel()  # a stops renewing, as if paused
        t0 = time.monotonic()
        assert await asyncio.wait_for(b_wins, 5)
        waited = time.monotonic() - t0
        assert FAST.lease_duration - FAST.retry_period <= waited < FAST.lease_duration + 1.5, waited
        assert b.previous == "a"
        entry = await (await js.key_value(topology.PLANNER_LEASE_BUCKET)).get(topology.PLANNER_LEASE_KEY)
        assert json.loads(entry.value)["holderIdentity"] == "b"
        # a resumes renewing: its compare-and-set finds b's revision, so it learns it lost the lease.
        await asyncio.wait_for(a.hold(a_lost), 5)
        assert a_lost.is_set() and not a.held()
        # b stops cleanly: a (standing by again) takes over at once, not after the lease duration.
        a_wins = asyncio.create_task(a.acquire(stop))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await b.release()
        assert await asyncio.wait_for(a_wins, 5)
        assert time.monotonic() - t0 < FAST.lease_duration
    finally:
        stop.set()
        await nc.close()


async def test_a_renewal_stored_but_unanswered_is_not_taken_for_a_takeover(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    lease = Lease(js, "a", FAST)
    try:
        assert await asyncio.wait_for(lease.acquire(asyncio.Event()), 5)
        kv = await js.key_value(topology.PLANNER_LEASE_BUCKET)
        # What a renewal that timed out after the server stored it leaves: our value, a revision we never saw.
        await kv.update(topology.PLANNER_LEASE_KEY, lease_value("a", FAST, "t", 1), last=lease.revision)
        lost = asyncio.Event()
        holding = asyncio.create_task(lease.hold(lost))
        await asyncio.sleep(4 * FAST.retry_period)
        assert not lost.is_set() and lease.held()
        # Another holder's value is a takeover (written at a revision the holder has, racing its renewals).
        for _ in range(50):
            try:
                await kv.update(topology.PLANNER_LEASE_KEY, lease_value("b", FAST, "t", 2), last=lease.revision)
                break
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("could not write another holder's value")
        await asyncio.wait_for(holding, 5)
        assert lost.is_set()
    finally:
        await nc.close()


def _delta(seq: int, name: str) -> events.Envelope:
    """A shared delta removing a Service named ``name``: its content tells a stale one from the real one."""
    return events.Envelope(id=f"plan/all/{seq}", time_ns=seq, producer="planner",
                           record=events.PlanDelta(scope="all", seq=seq, source_seq=seq,
                                                   ops=(events.RemoveService(f"default/{name}"),)))


async def test_the_fence_refuses_every_delta_of_a_deposed_planner(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    try:
        fence_a = await raise_fence(js, "planner-a", 1, lambda: True)
        a_deposed = asyncio.Event()
        a = PlanPublisher(js, {}, fence_a, a_deposed, nc)
        a.add([_delta(1, "one"), _delta(2, "two")])
        assert await a.flush() == 2
        # b takes over (its marker is now the subject's last) and publishes delta 3.
        fence_b = await raise_fence(js, "planner-b", 2, lambda: True)
        b = PlanPublisher(js, {"all": (2, 0)}, fence_b, asyncio.Event(), nc)
        b.add([_delta(3, "three")])
        assert await b.flush() == 1
        # a wakes up with deltas 3 and 4 to publish: its flush reads the fence first and stands down.
        a.add([_delta(3, "three-stale"), _delta(4, "four-stale")])
        with pytest.raises(bus.Retry, match="another planner took over"):
            await a.flush()
        assert a_deposed.is_set()
        # Paused between that read and its publishes, its batch reaches the server: refused there, whole
        # (the read is replaced by what it returned before b's marker: the one timing a test cannot force).
        paused_deposed = asyncio.Event()
        paused = PlanPublisher(js, {"all": (3, 0)}, fence_a, paused_deposed, nc)
        paused._check_fence = lambda: asyncio.sleep(0, fence_a.headers())  # type: ignore[method-assign]
        paused.add([_delta(4, "four-stale"), _delta(5, "five-stale")])
        with pytest.raises(bus.Retry, match="another planner took over"):
            await paused.flush()
        assert paused_deposed.is_set()
        stale = _delta(4, "four-stale")
        with pytest.raises(APIError) as refused:  # one message alone, as a planner without batches would send it
            await js.publish(topology.PLAN_ALL_SUBJECT, events.encode(stale),
                             headers={**bus.msg_id_header(stale), **fence_a.headers()})
        assert bus.is_wrong_last_sequence(refused.value)
        # A planner that finds it lost the lease after reading the subject raises no marker.
        with pytest.raises(Deposed):
            await raise_fence(js, "planner-a", 1, lambda: False)
        msgs = [m async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM))]
        by = [(m.subject, m.headers.get(PUBLISHER)) for m in msgs]
        assert by == [(topology.PLAN_LEADER_SUBJECT, "planner-a"), (topology.PLAN_ALL_SUBJECT, "planner-a"),
                      (topology.PLAN_ALL_SUBJECT, "planner-a"), (topology.PLAN_LEADER_SUBJECT, "planner-b"),
                      (topology.PLAN_ALL_SUBJECT, "planner-b")]
        assert [events.decode(m.data).record.seq for m in msgs if m.subject == topology.PLAN_ALL_SUBJECT] == [1, 2, 3]
    finally:
        await nc.close()


# -- processes: two planners, churn, kill -9 / SIGSTOP ---------------------------------------------------------

class FailoverSystem(System):
    """The watcher, two planners with leader election and one applier per node, as processes."""

    def __init__(self, url: str, kubeconfig: Path, logs: Path, replicas: int = 1) -> None:
        super().__init__(url, kubeconfig, logs, replicas)
        self.http: dict[str, int] = {}

    def start(self) -> None:
        common = ["--nats-url", self.url, "--http-listen", "", "--nats-replicas", str(self.replicas)]
        self._run("watcher", ["watcher", "--kubeconfig", str(self.kubeconfig), *common])
        for name in ("planner-1", "planner-2"):
            self.http[name] = free_loopback_port()
            self._run(name, ["planner", "--leader-elect", "--snapshot-every", "25", *common[:-4],
                             "--nats-replicas", str(self.replicas), "--http-listen", f"127.0.0.1:{self.http[name]}"])
        for node in NODES:
            self._run(node, ["applier", "--node", node, "--backend", "memory", "--drift-period", "5", *common])

    def planner_by_pid(self, pid: int) -> str:
        return next(name for name, proc in self.procs.items() if proc.pid == pid and name.startswith("planner"))

    def get(self, name: str, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http[name]}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def master_status(self, name: str) -> float | None:
        status, text = self.get(name, "/metrics")
        for line in text.splitlines() if status == 200 else []:
            if line.startswith("kipvs_planner_leader_election_master_status "):
                return float(line.split()[1])
        return None


async def _holder(js) -> str:
    """The lease's holderIdentity ("" when free or unreadable: a cluster electing)."""
    try:
        entry = await (await js.key_value(topology.PLANNER_LEASE_BUCKET)).get(topology.PLANNER_LEASE_KEY)
        return json.loads(entry.value)["holderIdentity"] if entry.value else ""
    except Exception:
        return ""


def _pid(identity: str) -> int:
    return int(identity.split("_")[-2])


async def _active_and_standby(js, system: FailoverSystem) -> tuple[str, str, str]:
    """(active planner's name, standby's name, active's identity) once one holds the lease, the other is
    ready as a standby and the metrics say which is which."""
    found: list[str] = []

    async def settled() -> bool:
        identity = await _holder(js)
        if not identity:
            return False
        active = system.planner_by_pid(_pid(identity))
        standby = "planner-2" if active == "planner-1" else "planner-1"
        if (system.master_status(active), system.master_status(standby)) != (1.0, 0.0):
            return False
        if system.get(standby, "/readyz")[0] != 200 or system.get(standby, "/livez")[0] != 200:
            return False
        found[:] = [active, standby, identity]
        return True

    deadline = time.monotonic() + 90
    while not await settled():
        system.check_alive()
        assert time.monotonic() < deadline, f"no active planner with a ready standby; logs in {system.logs}"
        await asyncio.sleep(0.2)
    return found[0], found[1], found[2]


async def _takeover(js, old: str, started: float, within: float = 5.0) -> tuple[str, float]:
    """Wait for a holder other than ``old`` and for its fence marker: (new identity, seconds since ``started``)."""
    deadline = started + 30
    while time.monotonic() < deadline:
        identity = await _holder(js)
        if identity and identity != old:
            try:
                marker = await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_LEADER_SUBJECT)
            except Exception:
                marker = None
            if marker is not None and marker.headers and marker.headers.get(PUBLISHER) == identity:
                return identity, time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"no takeover from {old} within 30s")


async def _exactly_once(js) -> list[tuple[int, str]]:
    """Assert the plan stream holds each delta a single planner replaying the whole log publishes, once and
    equal; returns (stream seq, publisher) of every message of the plan stream."""
    replay = Planner()
    want = []
    async for msg in bus.read_stream(js, bus.LogReader(topology.KUBE_STREAM), "kipvs.kube.>"):
        try:
            env = events.decode(msg.data)
        except events.ContractError:
            continue
        want += [env.record for env in replay.handle(env, msg.metadata.sequence.stream)]
    got, who = [], []
    async for msg in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM)):
        who.append((msg.metadata.sequence.stream, (msg.headers or {}).get(PUBLISHER, "")))
        if msg.subject != topology.PLAN_LEADER_SUBJECT:
            got.append(events.decode(msg.data).record)
    counts = collections.Counter((d.scope, d.seq) for d in got)
    assert [k for k, n in counts.items() if n > 1] == [], "a delta was published twice"
    key = lambda d: (d.scope, d.seq)  # noqa: E731
    assert sorted(((d.scope, d.seq, d.source_seq, d.ops) for d in got), key=lambda t: t[:2]) == \
        sorted(((d.scope, d.seq, d.source_seq, d.ops) for d in want), key=lambda t: t[:2]), \
        f"published {len(got)} deltas, a single planner's replay gives {len(want)}; missing: " \
        f"{sorted(set(map(key, want)) - set(map(key, got)))[:5]}"
    return who


async def _start(sim, tmp_path: Path, url: str, replicas: int) -> FailoverSystem:
    for node, ip in NODES.items():
        await sim.apply(kube.node(node, ip))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(sim.kubeconfig())
    logs = tmp_path / "logs"
    logs.mkdir()
    system = FailoverSystem(url, kubeconfig, logs, replicas)
    system.start()
    return system


async def _connect(url: str):
    return await nats.connect(url.split(","), connect_timeout=2)


async def test_kill_9_the_active_planner_on_a_three_server_cluster(sim, tmp_path: Path) -> None:
    cluster_ports = [free_loopback_port() for _ in range(3)]
    servers = [Server(tmp_path / f"store-{i}", f"n{i}", cluster_ports[i],
                      [p for j, p in enumerate(cluster_ports) if j != i]) for i in range(3)]
    for s in servers:
        s.start()
    url = ",".join(f"nats://127.0.0.1:{s.port}" for s in servers)
    system = await _start(sim, tmp_path, url, 3)
    nc = None
    try:
        await _converged(url, _expected(sim), system, within=240)
        nc = await _connect(url)
        js = nc.jetstream(timeout=5)
        lease_stream = await js.stream_info(f"KV_{topology.PLANNER_LEASE_BUCKET}")
        assert lease_stream.config.num_replicas == 3
        active, standby, identity = await _active_and_standby(js, system)
        burst = asyncio.create_task(_burst(sim, 120))
        await asyncio.sleep(1.5)
        killed = time.monotonic()
        system.procs[active].send_signal(signal.SIGKILL)  # during churn
        system.procs[active].wait(10)
        new, took = await _takeover(js, identity, killed)
        assert system.planner_by_pid(_pid(new)) == standby
        assert took < 5.0, f"the standby took {took:.1f}s to take over"
        print(f"takeover after kill -9: {took:.2f}s")
        await burst
        await _burst(sim, 10, offset=120)
        del system.procs[active]  # dead on purpose
        await _converged(url, _expected(sim), system, within=240)
        assert system.master_status(standby) == 1.0
        await _exactly_once(js)
    finally:
        if nc is not None:
            await nc.close()
        codes = system.stop()
        for s in servers:
            s.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_a_paused_active_planner_publishes_nothing_after_the_new_one(sim, tmp_path: Path) -> None:
    server = Server(tmp_path / "store", "solo")
    server.start()
    url = f"nats://127.0.0.1:{server.port}"
    system = await _start(sim, tmp_path, url, 1)
    nc = None
    paused = None
    try:
        nc = await _connect(url)
        js = nc.jetstream(timeout=5)
        active, standby, identity = await _active_and_standby(js, system)
        burst = asyncio.create_task(_burst(sim, 150))
        await asyncio.sleep(1.5)
        stopped = time.monotonic()
        paused = system.procs[active]
        os.kill(paused.pid, signal.SIGSTOP)  # mid-churn: batches in hand, publishes possibly in flight
        new, took = await _takeover(js, identity, stopped)
        assert took < 5.0, f"the standby took {took:.1f}s to take over"
        print(f"takeover after SIGSTOP: {took:.2f}s")
        marker = (await js.get_last_msg(topology.PLAN_STREAM, topology.PLAN_LEADER_SUBJECT)).seq

        async def new_one_published() -> bool:
            info = await js.stream_info(topology.PLAN_STREAM)
            return info.state.last_seq > marker

        deadline = time.monotonic() + 20
        while not await new_one_published():
            assert time.monotonic() < deadline, "the new planner published nothing"
            await asyncio.sleep(0.05)
        os.kill(paused.pid, signal.SIGCONT)
        paused = None
        # It wakes up, learns it lost the lease (or is refused by the fence) and stands by again, warm.
        await eventually(lambda: system.master_status(active) == 0.0, within=20, what="the old planner to step down")
        await eventually(lambda: system.get(active, "/readyz")[0] == 200, within=60,
                         what="the old planner to be a ready standby again")
        await burst
        await _burst(sim, 10, offset=150)
        await _converged(url, _expected(sim), system, within=120)
        who = await _exactly_once(js)
        late = [(seq, by) for seq, by in who if seq > marker and by != new]
        assert late == [], f"messages landed after the new planner's fence from another planner: {late[:5]}"
        log = (system.logs / f"{active}.log").read_text()
        # Deposed (it heard the lease or the fence), or its first request after the pause timed out: either
        # way it stood by, and the fence above is what guarantees nothing of it landed.
        assert "STANDBY, deposed" in log or "STANDBY, the bus failed" in log, log[-3000:]
        print(f"{len(who)} plan messages, {sum(1 for seq, _ in who if seq > marker)} after the new fence")
        assert system.master_status(standby) == 1.0
    finally:
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
        if nc is not None:
            await nc.close()
        codes = system.stop()
        server.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_a_batch_whose_outcome_was_unknown_is_read_back_not_stored_twice(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = await bus.setup(nc)
    try:
        fence = await raise_fence(js, "planner-a", 1, lambda: True)
        first = PlanPublisher(js, {}, fence, asyncio.Event(), nc)
        first.add([_delta(1, "one"), _delta(2, "two")])
        assert await first.flush() == 2
        # The same planner, not knowing whether that batch was stored (its answer lost), sends it again with more.
        again = PlanPublisher(js, {}, fence, asyncio.Event(), nc)
        again.add([_delta(1, "one"), _delta(2, "two"), _delta(3, "three")])
        with pytest.raises(bus.Retry, match="duplicate"):
            await again.flush()  # an atomic batch holding a stored id is refused whole
        assert await again.flush() == 1  # read back first: only delta 3 is sent
        msgs = [m async for m in bus.read_stream(js, bus.LogReader(topology.PLAN_STREAM), topology.PLAN_ALL_SUBJECT)]
        assert [events.decode(m.data).record.seq for m in msgs] == [1, 2, 3]
        assert again.published == {"all": 3} and again.stream_seq == msgs[-1].metadata.sequence.stream
    finally:
        await nc.close()
