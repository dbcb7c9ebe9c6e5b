"""The services' metrics, scraped from their real /metrics endpoints (watcher, planner and applier over a
real nats-server, the Kubernetes API simulator as the source): the network-programming SLI through both
of its starts, the no-local-endpoints gauge, and every declared series present from the start."""

from __future__ import annotations

import asyncio
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import msgspec
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from services.applier.programming_metrics import ProgrammingMetrics, change_kinds, no_local_endpoints
from services.harness.simulator.server import Simulator
from services.planner.core import Planner
from services.planner.trigger_time import TRIGGER_TIME_ANNOTATION, trigger_time_ns
from shared.contract import events
from shared.service.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_PROXY_RULES_BUCKETS, Registry, version
from tests import kube
from tests.stack import Scrape, Stack, start_stack

SLI = "kipvs_network_programming_duration_seconds"


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sli(scrape: Scrape) -> tuple[float, float]:
    return scrape.value(SLI + "_count"), scrape.value(SLI + "_sum")


async def web_on_node_b(stack: Stack) -> Scrape:
    """Two nodes and one Service whose only endpoint is on node-b; node-a has programmed it. One change at
    a time, each one delta: the kinds are watched apart, so changes made together may be logged in any
    order (a slice before its Service folds into the Service's delta)."""
    for node, ip in (("node-a", "192.0.2.10"), ("node-b", "192.0.2.11")):
        await stack.sim.apply(kube.node(node, ip))
    await stack.until(lambda s: s.value("kipvs_applier_plan_seq") == 2, "both nodes on node-a")
    await stack.sim.apply(kube.service("web"))
    await stack.until(lambda s: s.value("kipvs_applier_plan_seq") == 3, "web on node-a")
    await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.2.5", "node-b")]))
    return await stack.until(lambda s: s.value("kipvs_applier_plan_seq") == 4
                             and s.value("kipvs_applier_real_servers") == 1, "web's endpoint on node-a")


async def next_delta(stack: Stack, before: Scrape) -> Scrape:
    """node-a's scrape once it applied one more delta than in ``before``."""
    want = before.value("kipvs_applier_plan_seq") + 1
    for _ in range(600):
        scrape = await stack.settled()
        if scrape.value("kipvs_applier_plan_seq") >= want:
            assert scrape.value("kipvs_applier_plan_seq") == want, "more than the one change was planned"
            return scrape
        await asyncio.sleep(0.1)
    raise AssertionError("node-a never applied the change")


async def test_network_programming_starts_at_the_slices_trigger_time(nats_url: str, sim: Simulator,
                                                                     tmp_path: Path) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        before = await web_on_node_b(stack)
        triggered = time.time()
        await asyncio.sleep(1.5)  # the change reaches the API (and the log) 1.5s after its trigger
        slice_ = kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.2.5", "node-b"),
                                                        kube.endpoint("10.244.2.6", "node-b")])
        slice_["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: rfc3339(triggered)}
        await stack.sim.apply(slice_)
        after = await next_delta(stack, before)
        done = time.time()
        (count0, sum0), (count1, sum1) = sli(before), sli(after)
        assert count1 - count0 == 1
        # measured from the trigger time, not from when the change was logged (at least 1.5s later)
        assert 1.5 <= sum1 - sum0 <= done - triggered + 0.001, (sum1 - sum0, done - triggered)
        assert after.value(SLI + "_bucket", le="1.0") == before.value(SLI + "_bucket", le="1.0")
        assert {real for vs in stack.kernel.ipvs.values() for real in vs.reals} == {("10.244.2.5", 8080),
                                                                                   ("10.244.2.6", 8080)}
    finally:
        await stack.close()


async def test_network_programming_falls_back_to_the_record_time(nats_url: str, sim: Simulator,
                                                                 tmp_path: Path) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        before = await web_on_node_b(stack)
        sync_count = before.value("kipvs_sync_proxy_rules_duration_seconds_count")
        last_sync = before.value("kipvs_sync_proxy_rules_last_timestamp_seconds")
        changed = time.time()
        await asyncio.sleep(1.5)  # a trigger time would make the sample at least this long: there is none
        await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.2.7", "node-b")]))
        after = await next_delta(stack, before)
        done = time.time()
        (count0, sum0), (count1, sum1) = sli(before), sli(after)
        assert count1 - count0 == 1
        # from the watcher's record time: after the API took the change, before node-a applied it
        assert 0 <= sum1 - sum0 <= done - (changed + 1.5), (sum1 - sum0, done - changed)
        assert after.value("kipvs_sync_proxy_rules_duration_seconds_count") > sync_count
        assert changed < after.value("kipvs_sync_proxy_rules_last_timestamp_seconds") <= done
        assert last_sync > 0, "the bootstrap is a sync too"
    finally:
        await stack.close()


async def test_no_local_endpoints_counts_local_policies_without_a_local_endpoint(nats_url: str, sim: Simulator,
                                                                                 tmp_path: Path) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        scrape = await web_on_node_b(stack)
        name = "kipvs_sync_proxy_rules_no_local_endpoints_total"
        assert scrape.value(name, traffic_policy="internal") == scrape.value(name, traffic_policy="external") == 0
        ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
                 {"name": "admin", "port": 81, "protocol": "TCP", "targetPort": 8081, "nodePort": 30081}]
        await stack.sim.apply(kube.service("local", cluster_ip="10.96.0.20", ports=ports, type="NodePort",
                                           internalTrafficPolicy="Local", externalTrafficPolicy="Local"))
        slice_ports = [{"name": "http", "port": 8080, "protocol": "TCP"},
                       {"name": "admin", "port": 8081, "protocol": "TCP"}]
        await stack.sim.apply(kube.endpoint_slice("local-abc", "local", [kube.endpoint("10.244.2.9", "node-b")],
                                                  ports=slice_ports))
        await stack.sim.apply(kube.service("only-internal", cluster_ip="10.96.0.21", internalTrafficPolicy="Local"))
        # both ports of "local", each policy; "only-internal" has no endpoint at all: it counts too
        await stack.until(lambda s: s.value(name, traffic_policy="internal") == 3
                          and s.value(name, traffic_policy="external") == 2, "3 internal and 2 external")
        await stack.sim.apply(kube.endpoint_slice("local-abc", "local", [kube.endpoint("10.244.2.9", "node-b"),
                                                                         kube.endpoint("10.244.1.9", "node-a")],
                                                  ports=slice_ports))
        await stack.sim.delete("Service", "default", "only-internal")
        await stack.until(lambda s: s.value(name, traffic_policy="internal") == 0
                          and s.value(name, traffic_policy="external") == 0, "a local endpoint on node-a for both")
    finally:
        await stack.close()


async def test_every_declared_metric_has_samples_from_the_start(nats_url: str, sim: Simulator,
                                                                 tmp_path: Path) -> None:
    """A healthy service that has seen nothing yet: every family it declares has a series, the process
    collector's and build info's included, and the histograms have kube-proxy's buckets."""
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        for service in ("watcher", "planner", "applier"):
            scrape = await stack.scrape(service)
            empty = [name for name in scrape.families if not any(
                s.startswith(name) for s in scrape.samples)]
            assert not empty, f"{service} declares {empty} without samples"
            assert scrape.value("kipvs_build_info", service=service) == 1
            assert scrape.value("process_resident_memory_bytes") > 0
        watcher = await stack.scrape("watcher")
        for kind in events.KUBE_KINDS:
            assert watcher.value("kipvs_watcher_relists_total", kind=kind, reason="list") >= 1
            assert watcher.value("kipvs_watcher_relists_total", kind=kind, reason="gone") == 0
            assert watcher.value("kipvs_watcher_events_published_total", kind=kind, action="DELETED") == 0
            assert watcher.value("kipvs_watcher_parked_total", kind=kind) == 0
        applier = await stack.scrape("applier")
        assert [float(le) for le, _ in _buckets(applier, SLI)] == [*NETWORK_PROGRAMMING_BUCKETS, float("inf")]
        assert [float(le) for le, _ in _buckets(applier, "kipvs_sync_proxy_rules_duration_seconds")] == [
            *SYNC_PROXY_RULES_BUCKETS, float("inf")]
        planner = await stack.scrape("planner")
        assert planner.value("kipvs_planner_warnings", code="nodeport-outside-ranges") == 0
        # a scraper that asks for OpenMetrics (Prometheus does by default) gets it, and it parses
        content_type, text = await stack.get_metrics(
            "applier", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        assert content_type.startswith("application/openmetrics-text; version=1.0.0"), content_type
        families = {f.name: f for f in openmetrics_families(text)}
        assert families[SLI].type == "histogram" and text.endswith("# EOF\n")
    finally:
        await stack.close()


def _buckets(scrape: Scrape, name: str) -> list[tuple[str, float]]:
    return [(labels["le"], value) for labels, value in scrape.samples[name + "_bucket"]]


def test_trigger_time_annotation_parsing() -> None:
    """RFC 3339 as the endpoints controller writes it (nanoseconds, Z); anything else is no trigger time,
    as kube-proxy skips a value it cannot parse."""
    def slice_with(value: object) -> dict:
        return {"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: value}}}

    assert trigger_time_ns(slice_with("2026-11-30T19:00:00.123456789Z")) == 1796065200_123456000
    assert trigger_time_ns(slice_with("2026-11-30T20:00:00+01:00")) == 1796065200_000000000
    for bad in ("", "yesterday", "2026-11-30T19:00:00", 17):
        assert trigger_time_ns(slice_with(bad)) == 0
    assert trigger_time_ns({}) == trigger_time_ns({"metadata": None}) == 0


def test_no_local_endpoints_follows_kube_proxys_local_endpoint_choice() -> None:
    """Per Service port; a local endpoint is a ready one, or else a serving and terminating one."""
    def plan(*endpoints: events.Endpoint, internal: bool = True, external: bool = False) -> events.ServicePlan:
        ports = tuple(events.PortPlan(name=n, port=p, endpoints=endpoints) for n, p in (("a", 80), ("b", 81)))
        return events.ServicePlan(key="default/s", internal_policy_local=internal, external_policy_local=external,
                                  ports=ports)

    elsewhere = events.Endpoint(ip="10.0.0.1", port=80, node="node-b")
    assert no_local_endpoints(plan(elsewhere), "node-a") == (2, 0)
    assert no_local_endpoints(plan(elsewhere, internal=False, external=True), "node-a") == (0, 2)
    assert no_local_endpoints(plan(elsewhere, internal=False), "node-a") == (0, 0)
    not_ready = events.Endpoint(ip="10.0.0.2", port=80, node="node-a", ready=False, serving=False)
    assert no_local_endpoints(plan(not_ready), "node-a") == (2, 0)
    terminating = events.Endpoint(ip="10.0.0.2", port=80, node="node-a", ready=False, serving=True, terminating=True)
    assert no_local_endpoints(plan(terminating, external=True), "node-a") == (0, 0)


def test_the_no_local_endpoints_gauge_is_kept_per_change() -> None:
    """The gauge is a running total moved by each touched Service (a batch no longer sums every Service
    that has no local endpoint): after any sequence of changes it equals the recount from scratch."""
    registry = Registry("applier")
    metrics = ProgrammingMetrics(registry, "node-a", lambda: (0, 0), lambda: None, lambda: 0)
    elsewhere = events.Endpoint(ip="10.0.0.1", port=80, node="node-b")
    here = events.Endpoint(ip="10.0.0.2", port=80, node="node-a")

    def plan(key: str, endpoint: events.Endpoint, external: bool) -> events.ServicePlan:
        return events.ServicePlan(key=key, internal_policy_local=True, external_policy_local=external,
                                  ports=(events.PortPlan(name="a", port=80, endpoints=(endpoint,)),))

    services: dict[str, events.ServicePlan] = {}
    steps = [("s1", elsewhere, False), ("s2", elsewhere, True), ("s1", here, False), ("s3", elsewhere, True),
             ("s2", None, False), ("s1", elsewhere, True), ("s3", here, True)]
    for key, endpoint, external in steps:
        if endpoint is None:
            services.pop(key)
        else:
            services[key] = plan(key, endpoint, external)
        metrics.services_changed(services, {key})
        want = [sum(no_local_endpoints(p, "node-a")[i] for p in services.values()) for i in (0, 1)]
        assert [registry.sample("kipvs_sync_proxy_rules_no_local_endpoints_total", {"traffic_policy": policy})
                for policy in ("internal", "external")] == want


def test_the_planner_carries_the_slices_trigger_time_on_its_delta() -> None:
    """Set from an EndpointSlice event's annotation, 0 (and absent on the wire) for anything else."""
    planner = Planner()

    def handle(obj: dict, seq: int) -> events.PlanDelta:
        record = events.KubeEvent(kind=obj["kind"], action="ADDED", namespace="default", name=obj["metadata"]["name"],
                                  resource_version=str(seq), object={**obj, "metadata": {
                                      **obj["metadata"], "namespace": "default", "resourceVersion": str(seq)}})
        (envelope,) = planner.handle(events.Envelope(id=f"e{seq}", time_ns=seq, producer="t", record=record), seq)
        assert isinstance(envelope.record, events.PlanDelta)
        return envelope.record

    assert handle(kube.service("web"), 1).trigger_time_ns == 0
    slice_ = kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.1.5")])
    slice_["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: "2026-11-30T19:00:00.5Z"}
    delta = handle(slice_, 2)
    assert delta.trigger_time_ns == 1796065200_500000000
    assert b"trigger_time_ns" not in events.encode(events.Envelope(
        id="x", time_ns=1, producer="t", record=events.PlanDelta(scope="all", seq=1, source_seq=1, ops=())))


def test_a_metric_declared_again_is_the_same_one() -> None:
    """A service's main coroutine runs again after a bus failure: its metrics go on, read functions and
    collectors follow the new state, and a name cannot change type."""
    registry = Registry("applier")
    first = registry.counter("kipvs_x_total", "x", labels={"kind": ("A", "B")})
    first.labels("A").inc(2)
    assert registry.counter("kipvs_x_total", "x", labels={"kind": ("A", "B")}) is first
    registry.gauge("kipvs_y", "y", read=lambda: 1)
    registry.gauge("kipvs_y", "y", read=lambda: 2)
    registry.counter_reading("kipvs_z_total", "z", lambda: 3)
    registry.counter_reading("kipvs_z_total", "z", lambda: 4)
    assert registry.sample("kipvs_x_total", {"kind": "A"}) == 2 and registry.sample("kipvs_x_total", {"kind": "B"}) == 0
    assert registry.sample("kipvs_y") == 2 and registry.sample("kipvs_z_total") == 4
    with pytest.raises(ValueError, match="declared as a counter"):
        registry.gauge("kipvs_x_total", "x")
    assert registry.sample("kipvs_build_info", {"service": "applier", "version": version(),
                                                 "python_version": platform.python_version()}) == 1


async def test_watcher_counts_events_410s_restarts_and_parked_lines_per_kind(nats_url: str, sim: Simulator,
                                                                             tmp_path: Path) -> None:
    stack = await start_stack(nats_url, sim, tmp_path)

    async def watcher_shows(name: str, labels: dict[str, str], at_least: float) -> Scrape:
        """The watcher's scrape once the sample reaches ``at_least``."""
        for _ in range(600):
            scrape = await stack.scrape("watcher")
            if scrape.value(name, **labels) >= at_least:
                return scrape
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name}{labels} never reached {at_least}:\n{scrape.text}")

    try:
        await stack.sim.apply(kube.service("web"))
        await watcher_shows("kipvs_watcher_events_published_total", {"kind": "Service", "action": "ADDED"}, 1)
        await stack.sim.inject_watch_line("Node", "this is not JSON")
        scrape = await watcher_shows("kipvs_watcher_parked_total", {"kind": "Node"}, 1)
        assert scrape.value("kipvs_watcher_parked_total", kind="Service") == 0
        stack.sim.drop_watches()
        await stack.sim.apply(kube.service("api", cluster_ip="10.96.0.11"))  # while no watch is open
        stack.sim.compact()  # the watches cannot resume from their version: 410, relist
        await watcher_shows("kipvs_watcher_relists_total", {"kind": "Service", "reason": "gone"}, 1)
        # counted once the list after the 410 is logged: the initial one and that one
        scrape = await watcher_shows("kipvs_watcher_relists_total", {"kind": "Service", "reason": "list"}, 2)
        assert scrape.value("kipvs_watcher_watch_restarts_total", kind="Service", reason="connection") >= 1
        scrape = await watcher_shows("kipvs_watcher_events_published_total", {"kind": "Service", "action": "ADDED"}, 2)
        assert scrape.value("kipvs_watcher_events_published_total", kind="EndpointSlice", action="ADDED") == 0
    finally:
        await stack.close()


def test_programming_samples_start_at_the_trigger_time_and_skip_changes_from_before_the_start() -> None:
    """As kube-proxy's tracker: a change older than the process is not a programming latency (a restart
    re-reads old changes); the trigger time wins over the record time when the delta has one."""
    from services.applier.programming_metrics import ProgrammingMetrics

    registry = Registry("applier")
    metrics = ProgrammingMetrics(registry, "node-a", lambda: (0, 0), lambda: None, lambda: 0)
    start = metrics.started_ns

    def delta(record_ns: int, trigger_ns: int = 0) -> events.Envelope:
        return events.Envelope(id="d", time_ns=record_ns, producer="planner", record=events.PlanDelta(
            scope="all", seq=1, source_seq=1, ops=(), trigger_time_ns=trigger_ns))

    metrics.programmed([delta(start - 10**9), delta(start + 10**9, trigger_ns=start - 1)])
    assert registry.sample(SLI + "_count") == 0
    metrics.started_ns -= 60 * 10**9  # the process has run for a minute
    now = time.time_ns()
    metrics.programmed([delta(now, trigger_ns=now - 3 * 10**9)])
    assert registry.sample(SLI + "_count") == 1 and registry.sample(SLI + "_bucket", {"le": "2.0"}) == 0
    assert 3 <= registry.sample(SLI + "_sum") < 4


async def test_kube_proxy_change_counters_last_queued_and_proxy_mode(nats_url: str, sim: Simulator,
                                                                      tmp_path: Path) -> None:
    """kube-proxy's sync_proxy_rules_{service,endpoint}_changes_total, ..._last_queued_timestamp_seconds
    and /proxyMode (the applier's only) as kipvs serves them."""
    started = time.time()
    stack = await start_stack(nats_url, sim, tmp_path)
    try:
        svc, eps = "kipvs_sync_proxy_rules_service_changes_total", "kipvs_sync_proxy_rules_endpoint_changes_total"
        before = await web_on_node_b(stack)  # web added (a Service change), then its slice (an endpoints change)
        assert (before.value(svc), before.value(eps)) == (1, 1)
        queued = before.value("kipvs_sync_proxy_rules_last_queued_timestamp_seconds")
        assert started < queued <= before.value("kipvs_sync_proxy_rules_last_timestamp_seconds")
        await stack.sim.apply(kube.endpoint_slice("web-abc", "web", [kube.endpoint("10.244.2.6", "node-b")]))
        after = await next_delta(stack, before)
        assert (after.value(svc), after.value(eps)) == (1, 2)
        assert after.value("kipvs_sync_proxy_rules_last_queued_timestamp_seconds") > queued
        await stack.sim.apply(kube.service("web", ports=[{"name": "http", "port": 81, "protocol": "TCP",
                                                          "targetPort": 8080}]))
        moved = await next_delta(stack, after)
        assert moved.value(svc) == 2  # the port moved; whether the endpoints did is the planner's matching
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{stack.ports['applier']}/proxyMode") as r:
                assert (r.status, await r.text(), r.content_type) == (200, "ipvs", "text/plain")
            async with http.get(f"http://127.0.0.1:{stack.ports['planner']}/proxyMode") as r:
                assert r.status == 404  # the planner is no proxy
    finally:
        await stack.close()


@pytest.mark.parametrize(("change", "kinds"), [
    ({}, (False, False)),
    ({"scheduler": "lc"}, (True, False)),
    ({"endpoints": ()}, (False, True)),
])
def test_change_kinds(change: dict, kinds: tuple[bool, bool]) -> None:
    port = events.PortPlan(port=80, endpoints=(events.Endpoint(ip="10.0.0.1", port=8080),))
    plan = events.ServicePlan(key="default/web", ports=(port,))
    endpoints = change.pop("endpoints", port.endpoints)
    after = msgspec.structs.replace(plan, ports=(msgspec.structs.replace(port, endpoints=endpoints),), **change)
    assert change_kinds(plan, after) == kinds
    assert change_kinds(None, plan) == (True, True) and change_kinds(plan, None) == (True, True)
