"""Topology against a real nats-server: idempotent creation, refused and dropped config, version check."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from shared.contract import topology
from shared.messaging import bus


async def test_setup_creates_every_stream_and_is_idempotent(nats_url: str) -> None:
    nc = await bus.connect(nats_url, "test")
    try:
        specs = [topology.planner_consumer(), topology.applier_consumer("node-a.example")]
        js = await bus.setup(nc, consumers=specs)
        names = sorted(s.config.name for s in await js.streams_info())
        assert names == sorted([topology.KUBE_STREAM, topology.PLAN_STREAM, topology.STATUS_STREAM,
                                topology.PARKED_STREAM, topology.PLAN_AUDIT_STREAM,
                                f"OBJ_{topology.SNAPSHOT_BUCKET}", f"KV_{topology.PLANNER_LEASE_BUCKET}",
                                f"KV_{topology.APPLIER_CLAIMS_BUCKET}"])
        # A second service starting against the same server changes nothing and raises nothing.
        await bus.setup(nc, consumers=specs)
        info = await js.consumer_info(topology.PLAN_STREAM, "applier-node-a_example")  # "." -> "_": one-to-one
        assert sorted(info.config.filter_subjects) == ["kipvs.plan.all", "kipvs.plan.node.node-a_example"]
        kube = await js.stream_info(topology.KUBE_STREAM)
        assert kube.config.duplicate_window == pytest.approx(topology.DUPLICATE_WINDOW_S)
    finally:
        await nc.close()


async def test_stream_with_unchangeable_settings_is_refused_clearly(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=topology.KUBE_STREAM, subjects=["kipvs.kube.>"],
                                         storage=StorageType.MEMORY))
        with pytest.raises(topology.TopologyError, match="stream KIPVS_KUBE: the server refused"):
            await topology.ensure_streams(js)
    finally:
        await nc.close()


async def test_consumer_with_conflicting_config_is_refused_clearly(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = await bus.setup(nc)
        await js.add_consumer(topology.KUBE_STREAM, ConsumerConfig(
            durable_name=topology.PLANNER_CONSUMER, filter_subject="kipvs.kube.>", deliver_policy=DeliverPolicy.NEW))
        with pytest.raises(topology.TopologyError, match="consumer planner on KIPVS_KUBE"):
            await topology.ensure_consumer(js, topology.planner_consumer())
    finally:
        await nc.close()


def test_echo_check_catches_a_server_that_drops_filter_subjects() -> None:
    # What nats-server 2.9 echoes for a consumer asked for two filter subjects: no filter at all.
    spec = topology.applier_consumer("n1")
    echoed = ConsumerConfig(durable_name=spec.config.durable_name, ack_policy=spec.config.ack_policy,
                            deliver_policy=spec.config.deliver_policy, max_deliver=-1, ack_wait=60.0,
                            max_ack_pending=10_000, num_replicas=1, mem_storage=True)
    diffs = topology._differences(spec.config, echoed, spec.checked_fields)
    assert diffs == ["filter_subjects: asked for ['kipvs.plan.all', 'kipvs.plan.node.n1'], server has []"]


def test_old_server_version_is_refused_with_the_reason() -> None:
    with pytest.raises(topology.TopologyError, match=r"2\.9\.10; kipvs needs >= 2\.10\.0"):
        topology.check_server_version((2, 9, 10))
    topology.check_server_version((2, 10, 0))


@pytest.mark.parametrize(("name", "tok"), [("web", "web"), ("node.example.com", "node_example_com")])
def test_names_become_reversible_subject_tokens(name: str, tok: str) -> None:
    assert topology.token(name) == tok
    assert topology.untoken(tok) == name


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "a*", "a>", "-x", "a_b"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid Kubernetes name"):
        topology.token(bad)


async def test_a_fleet_above_a_thousand_nodes_gets_its_consumers(nats_url: str) -> None:
    """nats-server 2.15 caps a stream at 1,000 consumers unless the stream sets a limit: the plan stream (a
    durable per node) and the snapshot bucket (read by every bootstrapping node) set kipvs's own, also on
    streams an older kipvs declared without it."""
    nc = await bus.connect(nats_url, "test")
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name=topology.PLAN_STREAM, subjects=["kipvs.plan.>"]))  # an older kipvs's
        await bus.setup(nc)
        snapshots = f"OBJ_{topology.SNAPSHOT_BUCKET}"
        for stream in (topology.PLAN_STREAM, snapshots):
            assert (await js.stream_info(stream)).config.max_consumers == topology.FLEET_MAX_CONSUMERS
        for node in range(1_050):
            await js.add_consumer(topology.PLAN_STREAM, ConsumerConfig(
                durable_name=f"applier-n{node}", filter_subject="kipvs.plan.all", mem_storage=True))
        assert (await js.stream_info(topology.PLAN_STREAM)).state.consumer_count == 1_050
    finally:
        await nc.close()


async def test_a_store_too_small_to_reserve_the_status_limit_keeps_the_other_bounds(tmp_path) -> None:
    """nats-server reserves a stream's max_bytes in its store up front; a store smaller than that gets the
    status stream without it (a warning), still bounded per subject and per message."""
    from tests.test_full_store import CappedNats

    server = CappedNats(tmp_path / "store")
    server.start("100MB")
    try:
        nc = await bus.connect(server.url, "test")
        js = await bus.setup(nc)
        status = (await js.stream_info(topology.STATUS_STREAM)).config
        assert status.max_bytes in (None, -1)
        assert status.max_msgs_per_subject == topology.STATUS_PER_SUBJECT
        assert status.max_msg_size == topology.STATUS_MAX_MSG
        await bus.setup(nc)  # and again: idempotent
        await nc.close()
    finally:
        server.stop()
