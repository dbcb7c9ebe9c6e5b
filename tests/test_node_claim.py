"""One applier per node (issue 21): a second ``kipvs applier --node node-a`` beside the first split the
node's durable's deltas and both went stale. The newest one takes the node's claim; the older one stops
applying, says so (log, readiness, ``kipvs_applier_node_claim_held`` 0) and ``kipvs status`` names it.
Real nats-server, the simulator, the whole pipeline; memory kernels."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import nats
import pytest

from services.applier import node_claim
from services.applier import shell as applier_shell
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.applier.node_claim import NodeClaim
from services.tools import status as status_tool
from shared.contract import events, node_claims, topology
from shared.messaging.embedded_nats import free_loopback_port
from shared.security import nats_permissions as perms
from shared.service import config, runtime
from shared.service.metrics import Registry
from tests import kube
from tests.helpers import until
from tests.stack import Scrape, Stack, start_stack


async def _second_applier(stack: Stack, nats_url: str,
                          stop: asyncio.Event | None = None) -> tuple[MemoryKernel, asyncio.Task]:
    port = free_loopback_port()
    stack.ports["second"] = port
    kernel = MemoryKernel()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": f"127.0.0.1:{port}", "node": "node-a",
                                      "backend": "memory", "healthz_bind_address": ""}, {})
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: apply_plan(ctx, kernel),
                                                   stop=stop or stack.stop))
    stack.tasks.append(task)
    return kernel, task


def _held(scrape: Scrape) -> float:
    return scrape.value("kipvs_applier_node_claim_held")


async def test_a_second_applier_of_a_node_takes_over_and_the_first_stops(nats_url: str, sim, tmp_path: Path,
                                                                          capsys) -> None:
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())
    handler = Said()
    logging.getLogger("kipvs.applier").addHandler(handler)
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        await stack.sim.apply(kube.node("node-a", "192.0.2.10"))
        await stack.sim.apply(kube.service("web"))
        await stack.until(lambda s: s.value("kipvs_applier_plan_seq") == 2, "web on node-a")
        assert _held(await stack.scrape("applier")) == 1
        first_kernel = stack.kernel
        second_kernel, _ = await _second_applier(stack, nats_url)
        await until(lambda: stack.ready("second"), "the second applier ready")
        await until(lambda: _not(stack.ready("applier")), "the first applier not ready (superseded)")
        first = await stack.scrape("applier")
        assert _held(first) == 0
        assert _held(await stack.scrape("second")) == 1
        frozen = first.value("kipvs_applier_plan_seq")
        for i in range(20):  # the reproduction: 20 changes of one slice
            await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint(f"10.244.1.{i + 1}")]))

        async def second_caught_up() -> bool:
            seq = (await stack.scrape("planner")).value("kipvs_planner_delta_seq")
            return seq >= 4 and (await stack.scrape("second")).value("kipvs_applier_plan_seq") == seq \
                and _reals(second_kernel) == {"10.244.1.20"}
        await until(second_caught_up, "the second applier holding every change")
        assert (await stack.scrape("applier")).value("kipvs_applier_plan_seq") == frozen  # it applied nothing
        assert "10.244.1.20" not in _reals(first_kernel)
        assert any("took over this node's claim; this applier" in line for line in said), said
        capsys.readouterr()
        args = _status_args(nats_url)
        assert await status_tool.status(args) == 1
        out = capsys.readouterr().out
        assert "a second applier" in out and "runs idle" in out, out
    finally:
        logging.getLogger("kipvs.applier").removeHandler(handler)
        await stack.close()


async def _not(ready) -> bool:
    return not await ready


def _reals(kernel: MemoryKernel) -> set[str]:
    return {real[0] for vs in kernel.ipvs.values() for real in vs.reals}


def _status_args(nats_url: str):
    parser = status_tool.argparse.ArgumentParser()
    status_tool.add_arguments(parser)
    return parser.parse_args(["--nats-url", nats_url, "--max-behind", "1000"])


@pytest.mark.parametrize("pair", [("a.b", "a-b"), ("a", "a-reader")])
def test_node_names_map_to_their_own_durable_reader_and_claim(pair: tuple[str, str]) -> None:
    names = {n: (topology.applier_durable(n), perms.applier_reader(n)) for n in pair}
    everything = [name for both in names.values() for name in both]
    assert len(set(everything)) == len(everything), names


def test_long_node_names_stay_within_nats_limits_and_apart() -> None:
    """Kubernetes node names run to 253 characters; nats-server refuses consumer names over 255."""
    base = "n" * 200
    names = [f"{base}-{i}" for i in range(3)] + ["x" * 253, "x" * 252, "a" * 180, "a" * 181]
    keys = [topology.node_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    for name in names:
        for consumer in (topology.applier_durable(name), perms.applier_reader(name)):
            assert len(consumer) <= 255 and "." not in consumer and "*" not in consumer and ">" not in consumer
    assert topology.node_key("a" * 180) == "a" * 180  # short names are kept as they are


@pytest.mark.parametrize("bad", ["node-a.*", "node->", "Node-A", "node a", "n" * 254, ""])
def test_a_node_name_that_cannot_be_mapped_safely_is_refused_in_one_line(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid Kubernetes name") as refused:
        topology.applier_durable(bad)
    assert "\n" not in str(refused.value)
    if bad:  # (an empty --node has its own sentence: "node is required")
        with pytest.raises(config.ConfigError, match="not a valid Kubernetes name"):
            config.load(ApplierConfig, {"node": bad, "backend": "memory", "http_listen": ""}, {})


async def test_without_the_claims_bucket_the_node_is_applied_and_claimed_once_it_exists(nc) -> None:
    """A kipvs upgraded without 'kipvs topology apply': no bucket yet. The applier goes on (a node that
    cannot be programmed after an upgrade is worse) and takes the claim as soon as the bucket exists."""

    js = nc.jetstream(timeout=5)
    stop = asyncio.Event()
    claim = NodeClaim(js, "node-a", Registry("applier"), check_every=0.1)
    assert await asyncio.wait_for(claim.take(stop), 10)
    assert not claim.held and not claim.lost and await claim.still_held()
    watching = asyncio.create_task(claim.watch(stop))
    await topology.ensure_claims_bucket(js)
    await until(lambda: _true(claim.held), "the claim taken once the bucket exists", within=10)
    newer = NodeClaim(js, "node-a", Registry("applier"), check_every=0.1)
    await newer.take(stop)
    await asyncio.wait_for(watching, 10)  # the watch ends: the claim is lost
    assert claim.lost and not await claim.still_held() and claim.holder == newer.instance
    stop.set()


async def _true(value: bool) -> bool:
    return value


async def test_an_applier_superseded_while_bootstrapping_leaves_the_durable_alone(nats_url: str, monkeypatch) -> None:
    """The newer applier took the node during this one's bootstrap: this one must not create (and so reset)
    the node's durable, which is the newer one's now; it idles, not ready."""

    newer: list[NodeClaim] = []
    original = applier_shell.Applier.bootstrap

    async def bootstrap_then_superseded(self) -> None:
        await original(self)
        claim = NodeClaim(self.ctx.js, "node-a", Registry("applier"))
        await claim.take(asyncio.Event())
        newer.append(claim)
    monkeypatch.setattr(applier_shell.Applier, "bootstrap", bootstrap_then_superseded)
    port = free_loopback_port()
    stop = asyncio.Event()
    cfg = config.load(ApplierConfig, {"nats_url": nats_url, "http_listen": f"127.0.0.1:{port}", "node": "node-a",
                                      "backend": "memory", "healthz_bind_address": ""}, {})
    task = asyncio.create_task(runtime.run_service("applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel()),
                                                   stop=stop))
    stack = Stack(None, MemoryKernel(), {"applier": port}, [task], stop)  # type: ignore[arg-type]
    try:
        await until(lambda: _true(bool(newer)), "the newer claim taken during the bootstrap")
        await until(lambda: _not(stack.ready("applier")), "not ready")
        await asyncio.sleep(0.5)  # past the check before the consumer
        assert _held(await stack.scrape("applier")) == 0 and not await stack.ready("applier")
        nc = await nats.connect(nats_url)
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().consumer_info(topology.PLAN_STREAM, topology.applier_durable("node-a"))
        await nc.close()
        assert not task.done()  # idle, not ended (a restart would take the node back: two would take turns)
    finally:
        await stack.close()


async def test_a_superseded_applier_whose_service_restarts_never_takes_the_node_back(nc) -> None:
    """The runtime starts a service's main again after a bus failure (a closed connection, a replaced
    stream): a superseded applier's new run must not put its claim back over the newer applier's, or the
    two would take turns. Each claim carries its process's start; the older process stays superseded."""
    js = nc.jetstream(timeout=5)
    await topology.ensure_claims_bucket(js)
    stop = asyncio.Event()
    older = NodeClaim(js, "node-a", Registry("applier"), instance="pod-old/7/aaaaaa", started_ns=1_000)
    newer = NodeClaim(js, "node-a", Registry("applier"), instance="pod-new/9/bbbbbb", started_ns=2_000)
    assert await older.take(stop) and older.held
    assert await newer.take(stop) and newer.held
    assert not await older.still_held()
    restarted = NodeClaim(js, "node-a", Registry("applier"), instance="pod-old/7/cccccc", started_ns=1_000)
    assert await restarted.take(stop)
    assert restarted.lost and not restarted.held and restarted.holder == newer.instance
    assert not await restarted.still_held()
    assert await newer.still_held() and newer.held
    again = NodeClaim(js, "node-a", Registry("applier"), instance="pod-new/9/dddddd", started_ns=2_000)
    assert await again.take(stop) and again.held  # the newer one's own restart keeps the node


async def test_an_unreadable_claim_value_is_claimed_again_not_taken_for_a_takeover(nc) -> None:
    """A node may write its own claim key: junk there named no other applier, yet it idled the node's
    applier for good (not ready, healthy, so never restarted). It is claimed again."""
    js = nc.jetstream(timeout=5)
    await topology.ensure_claims_bucket(js)
    claim = NodeClaim(js, "node-a", Registry("applier"), instance="pod-a/7/aaaaaa")
    assert await claim.take(asyncio.Event()) and claim.held
    kv = await js.key_value(topology.APPLIER_CLAIMS_BUCKET)
    await kv.put(topology.node_key("node-a"), b"\x00" * 900)
    assert await claim.still_held() and claim.held and not claim.lost
    assert (await kv.get(topology.node_key("node-a"))).value.startswith(b"{")


async def test_when_the_applier_that_took_the_node_stops_the_idle_one_takes_it_back(nats_url: str, sim,
                                                                                   tmp_path: Path) -> None:
    """The newer applier stopped (a by-hand second applier ended, a pod deleted): the node stayed unapplied
    behind the idle one, whose /healthz stayed 200 (found by a hostile review). A stopping holder releases
    the node's claim, and the idle applier takes the node back. While idle it does not answer
    ``kipvs ipvs --node`` (that showed the idle applier's stale table at random)."""
    stack = await start_stack(nats_url, sim, tmp_path)
    second_stop = asyncio.Event()
    try:
        await stack.sim.apply(kube.node("node-a", "192.0.2.10"))
        await stack.sim.apply(kube.service("web"))
        await stack.until(lambda s: s.value("kipvs_applier_plan_seq") == 2, "web on node-a")
        _, second = await _second_applier(stack, nats_url, second_stop)
        await until(lambda: stack.ready("second"), "the second applier ready")
        await until(lambda: _not(stack.ready("applier")), "the first applier not ready (superseded)")
        await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.1.1")]))
        planner_seq = lambda: stack.scrape("planner")  # noqa: E731
        # delta 3: the endpoint slice (web on node-a was delta 2)
        await until(lambda: _at(stack, "second", planner_seq, 3), "the second applier at the planner's delta")
        nc = await nats.connect(nats_url)
        answered = {msgspec.msgpack.decode((await nc.request(topology.inspect_subject("node-a"), b"", timeout=5)).data,
                                           type=events.IpvsInspectReply).plan_seq for _ in range(8)}
        await nc.close()
        assert answered == {(await stack.scrape("second")).value("kipvs_applier_plan_seq")}, answered
        second_stop.set()
        await asyncio.wait_for(second, 30)
        await until(lambda: stack.ready("applier"), "the first applier ready again", within=60)
        assert _held(await stack.scrape("applier")) == 1
        await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.1.2")]))
        await until(lambda: _true(_reals(stack.kernel) == {"10.244.1.2"}), "the first applier applying again")
        assert _held(await stack.scrape("applier")) == 1
    finally:
        second_stop.set()
        await stack.close()


async def _at(stack: Stack, applier: str, planner, at_least: int = 0) -> bool:
    """The applier at the planner's delta, and that delta at least ``at_least`` (a change just made may not be
    planned yet: then the applier is "at" the delta before it and the next one arrives while the test reads)."""
    seq = (await planner()).value("kipvs_planner_delta_seq")
    return seq >= at_least and (await stack.scrape(applier)).value("kipvs_applier_plan_seq") == seq


async def test_a_claim_value_of_another_node_or_an_older_applier_does_not_idle_the_holder(nc) -> None:
    """A well-formed value written on the claim key that names another node, or an applier started before
    the holder, idled the holder for good (found by a re-check); only a newer applier of the node wins."""
    js = nc.jetstream(timeout=5)
    await topology.ensure_claims_bucket(js)
    kv = await js.key_value(topology.APPLIER_CLAIMS_BUCKET)
    key = topology.node_key("node-a")
    claim = NodeClaim(js, "node-a", Registry("applier"), instance="pod-a/7/aaaaaa", started_ns=5_000)
    assert await claim.take(asyncio.Event())
    for forged in (node_claims.Claim(node="node-b", instance="x/1/1", since_ns=1, started_ns=9_000),
                   node_claims.Claim(node="node-a", instance="x/1/1", since_ns=1, started_ns=1)):
        await kv.put(key, node_claims.encode(forged))
        assert await claim.still_held() and claim.held, forged
        assert node_claims.decode_claim((await kv.get(key)).value).instance == claim.instance
    newer = node_claims.Claim(node="node-a", instance="pod-b/9/bbbbbb", since_ns=1, started_ns=9_000)
    await kv.put(key, node_claims.encode(newer))
    assert not await claim.still_held() and claim.lost and claim.holder == "pod-b/9/bbbbbb"


async def test_before_a_batch_the_claim_is_read_only_after_a_write_to_its_key(nc, nats_url: str) -> None:
    """Issue 27: the claim read before a batch (at most once a second) was a request per node and change
    under churn. The applier watches its key's subject instead: no read while nobody else writes the key,
    and a takeover is seen at the next batch, not a second (or a check period) later."""
    js = nc.jetstream(timeout=5)
    await topology.ensure_claims_bucket(js)
    claim = NodeClaim(js, "node-a", Registry("applier"), instance="pod-a/7/aaaaaa", started_ns=5_000, nc=nc)
    assert await claim.take(asyncio.Event()) and claim.held
    assert await claim.held_lately(within=0.0)
    reads = claim.reads
    for _ in range(20):  # 20 batches, however close: the key is not read again
        assert await claim.held_lately(within=0.0)
    assert claim.reads == reads
    # a reconnect (as nats-py counts it) may have hidden a write: the key is read once, then not again
    nc.stats["reconnects"] += 1
    assert await claim.held_lately(within=0.0) and await claim.held_lately(within=0.0)
    assert claim.reads == reads + 1
    other = await nats.connect(nats_url)
    try:
        newer = NodeClaim(other.jetstream(timeout=5), "node-a", Registry("applier"), instance="pod-b/9/bbbbbb",
                          started_ns=9_000)
        assert await newer.take(asyncio.Event()) and newer.held
        # within=3600: a poll would not read again for an hour; the write on the key's subject is what tells
        await until(lambda: _not(claim.held_lately(within=3600.0)), "the takeover seen before the next batch",
                    within=5)
        assert claim.lost and claim.holder == "pod-b/9/bbbbbb"
    finally:
        await claim.close()
        await other.close()


async def test_an_idle_holder_reads_its_claim_once_a_quiet_period_and_wakes_on_a_takeover(
        nc, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: an idle applier read its claim every 5 s (1,000 reads a second at 5,000 nodes). Once its
    subscription has settled it reads it once per quiet period, and a takeover's put on the key's subject
    wakes it at once (not a period later)."""
    monkeypatch.setattr(node_claim, "QUIET_CHECK_S", 3600.0)
    js = nc.jetstream(timeout=5)
    await topology.ensure_claims_bucket(js)
    claim = NodeClaim(js, "node-a", Registry("applier"), instance="pod-a/7/aaaaaa", started_ns=5_000, nc=nc,
                      check_every=0.05)
    stop = asyncio.Event()
    assert await claim.take(stop) and claim.held
    watching = asyncio.create_task(claim.watch(stop))
    other = await nats.connect(nats_url)
    try:
        await until(lambda: _true(claim.reads >= node_claim.SETTLING_CHECKS), "the settling checks read the key",
                    within=10)
        reads = claim.reads
        await asyncio.sleep(1.0)  # 20 check periods of 0.05 s
        assert claim.reads == reads and not watching.done(), "no read while nobody else writes the key"
        newer = NodeClaim(other.jetstream(timeout=5), "node-a", Registry("applier"), instance="pod-b/9/bbbbbb",
                          started_ns=9_000)
        assert await newer.take(asyncio.Event()) and newer.held
        await asyncio.wait_for(watching, 10)  # returns: the claim lost, seen from the write
        assert claim.lost and claim.holder == "pod-b/9/bbbbbb" and claim.reads == reads + 1
    finally:
        stop.set()
        await claim.close()
        await other.close()
