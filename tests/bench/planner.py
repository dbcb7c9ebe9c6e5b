"""Planner benchmark: 10,000 Services x 10 endpoints over 1,000 nodes.

Reports events/s for the initial build, per-change latency p50/p99 (core + encoding of the deltas),
messages published per endpoint change for each Service type, peak RSS; and, as the named baseline,
kube-proxy's way of doing it: a full recompute of a node's state on every change (its sync loop).
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from typing import Any

from services.planner.core import Planner, tune_gc
from shared.contract import events
from shared.plan.resolve import resolve_node

TARGETS = {"build_events_per_s": 50_000, "p99_ms": 1.0, "messages_per_change": 1, "rss_mib": 1024}


def _node(i: int) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": f"node-{i}", "labels": {"topology.kubernetes.io/zone": f"z{i % 3}"},
                                         "resourceVersion": "1"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"10.0.{i // 250}.{i % 250 + 1}"}]}}


SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "LoadBalancer-Local")


def _service(i: int) -> dict[str, Any]:
    kind = SERVICE_TYPES[i % 4]
    spec: dict[str, Any] = {"type": kind.split("-")[0], "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    obj = {"kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "bench", "resourceVersion": "1"},
           "spec": spec}
    if kind != "ClusterIP":
        spec["ports"][0]["nodePort"] = 30000 + i % 2000
    if kind.startswith("LoadBalancer"):
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.18.{i // 250}.{i % 250 + 1}"}]}}
    if kind.endswith("Local"):
        spec["externalTrafficPolicy"] = "Local"
    return obj


def _slice(i: int, rng: random.Random, version: int = 0) -> dict[str, Any]:
    endpoints = [{"addresses": [f"10.{64 + i // 6000}.{(i // 25) % 240}.{(i % 25) * 10 + e + 1}"],
                  "nodeName": f"node-{rng.randrange(1000)}", "zone": f"z{e % 3}",
                  "conditions": {"ready": True, "serving": True, "terminating": False}} for e in range(10)]
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"svc-{i}-a", "namespace": "bench", "resourceVersion": str(version),
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints}


def _envelope(n: int, obj: dict[str, Any], action: str = "ADDED") -> events.Envelope:
    meta = obj["metadata"]
    return events.Envelope(id=f"e{n}", time_ns=n, producer="bench", record=events.KubeEvent(
        kind=obj["kind"], action=action, namespace=meta.get("namespace", ""), name=meta["name"],
        resource_version=str(n), object=obj))


def run(services: int = 10_000, nodes: int = 1_000, changes: int = 1_000) -> dict[str, float]:
    rng = random.Random(7)
    inputs = [_envelope(0, _node(i)) for i in range(nodes)]
    for i in range(services):
        inputs.append(_envelope(0, _service(i)))
        inputs.append(_envelope(0, _slice(i, rng)))
    planner = Planner()
    tune_gc()  # as the planner service does
    started = time.perf_counter()
    for seq, env in enumerate(inputs, 1):
        for delta in planner.handle(env, seq):
            events.encode(delta)
    build_s = time.perf_counter() - started

    latencies, messages = [], {t: [] for t in SERVICE_TYPES}
    seq = len(inputs)
    for c in range(changes):
        i = rng.randrange(services)
        obj = _slice(i, random.Random(i), version=c + 2)
        obj["endpoints"][rng.randrange(10)]["conditions"]["ready"] = bool(c % 2)  # one endpoint flips
        seq += 1
        env = _envelope(seq, obj, "MODIFIED")
        t0 = time.perf_counter()
        out = [events.encode(d) for d in planner.handle(env, seq)]
        latencies.append(time.perf_counter() - t0)
        messages[SERVICE_TYPES[i % 4]].append(len(out))

    # Baseline: what a kube-proxy-style full sync costs per change: recompute one node's whole state.
    full = []
    for n in range(5):
        t0 = time.perf_counter()
        resolve_node(planner.plans.values(), planner.nodes.get(f"node-{n}"))
        full.append(time.perf_counter() - t0)
    latencies.sort()
    return {
        "build_events": len(inputs),
        "build_events_per_s": len(inputs) / build_s,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        **{f"messages_per_change[{t}]": statistics.mean(v) for t, v in messages.items() if v},
        "full_recompute_ms": statistics.median(full) * 1000,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(figures: dict[str, float]) -> None:
    print("== planner: 10,000 Services x 10 endpoints over 1,000 nodes ==")
    rate, target = figures["build_events_per_s"], TARGETS["build_events_per_s"]
    print(f"initial build       {figures['build_events']:,.0f} events at {rate:,.0f} events/s"
          f"  (target {target:,}: x{rate / target:.2f})")
    print(f"per endpoint change p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms"
          f"  (target p99 {TARGETS['p99_ms']} ms: x{TARGETS['p99_ms'] / figures['p99_ms']:.2f} headroom)")
    for t in SERVICE_TYPES:
        key = f"messages_per_change[{t}]"
        if key in figures:
            print(f"messages per change {t:<20} {figures[key]:.2f}  (target 1, whatever the number of nodes)")
    print(f"baseline: kube-proxy-style full recompute of one node per change {figures['full_recompute_ms']:.1f} ms;"
          f" kipvs incremental p50 is x{figures['full_recompute_ms'] / figures['p50_ms']:.0f} cheaper")
    print(f"peak RSS            {figures['rss_mib']:.0f} MiB  (target <= {TARGETS['rss_mib']} MiB)")
