"""The planner's metrics beyond its counters: how long a Kubernetes change takes to become a published
delta, and the warnings its plan holds (by code), read from the planner's state at each scrape."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.contract import events
from shared.service.metrics import DEFAULT_BUCKETS, Registry

from .core import Planner

# Every code the planner (core.py, calico.py) warns with, so each has a series (0) from the start.
WARNING_CODES = ("invalid-service", "invalid-scheduler", "invalid-endpointslice", "invalid-node", "address-conflict",
                 "service-address-is-node-address", "nodeport-outside-ranges", "invalid-felix-configuration",
                 "calico-bpf-dataplane", "endpoint-marks-exhausted", "legacy-address",
                 "stale-load-balancer-status", "invalid-address")
STAGE_BUCKETS = (*DEFAULT_BUCKETS, 30.0, 60.0, 120.0, 300.0)


def warning_counts(planner: Planner) -> Counter[str]:
    """Current warnings by code: the shared plan's and every node's (as last published)."""
    counts: Counter[str] = Counter({code: 0 for code in WARNING_CODES})
    counts.update(w.code for w in planner.warnings.values())
    counts.update(w.code for state in planner.node_published.values() for w in state.warnings)
    return counts


class _Warnings(Collector):
    def __init__(self, planner: Callable[[], Planner]) -> None:
        self.planner = planner

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("kipvs_planner_warnings",
                                 "warnings the plan holds now, by code (docs/plan-format.md); a node's count once "
                                 "per node", labels=["code"])

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for code, count in sorted(warning_counts(self.planner()).items()):
            family.add_metric([code], count)
        return [family]


class PlannerMetrics:
    """Declared once the planner is rebuilt; ``started_ns``: changes recorded before the process started
    are not measured (kube-proxy ignores trigger times before its start likewise)."""

    def __init__(self, m: Registry, planner: Callable[[], Planner]) -> None:
        self.started_ns = time.time_ns()
        self.change_to_delta = m.histogram(
            "kipvs_planner_change_to_delta_seconds",
            "from a Kubernetes change's record time in the log to its plan delta's publication, per delta",
            STAGE_BUCKETS)
        m.collector("kipvs_planner_warnings", _Warnings(planner))

    def published(self, deltas: Iterable[events.Envelope]) -> None:
        now = time.time_ns()
        for envelope in deltas:
            if envelope.time_ns >= self.started_ns:
                self.change_to_delta.observe(max(now - envelope.time_ns, 0) / 1e9)
