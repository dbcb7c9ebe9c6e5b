"""One service instance's Prometheus metrics, through ``prometheus_client``.

Each service instance owns a :class:`Registry` (tests run several services in one process, so nothing
goes to prometheus_client's global registry). It holds the process and platform collectors, a
``kipvs_build_info{version,python_version,service}`` gauge (always 1, as ``kubernetes_build_info``) and
the service's own metrics, declared through the helpers below.

Every metric has samples from the moment it is declared: a labelled metric is declared with the label
values it can take (``labels={"kind": KUBE_KINDS}``), each combination starting at 0, so a dashboard or
an alert never sees "no data" for a healthy service. Names follow Prometheus practice
(``kipvs_<service>_<what>_<unit>``, ``_total`` for counters) or kube-proxy's where the meaning is the
same (docs/metrics.md lists them side by side).
"""

from __future__ import annotations

import itertools
import platform
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

# ``*_created`` series double every counter and histogram for no use in kipvs's dashboards or alerts.
disable_created_metrics()

Labels = Mapping[str, Iterable[str]]

# kube-proxy's buckets (kubernetes pkg/proxy/metrics/metrics.go), so its users' dashboards and SLO
# queries read kipvs's histograms the same way.
NETWORK_PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.0, 0.25, 0.5,                                 # merge() starts with a 0 bucket, then 0.25s, 0.5s
    *(float(s) for s in range(1, 60)),              # 1s .. 59s
    *(float(s) for s in range(60, 120, 5)),         # 60s .. 115s
    *(float(s) for s in range(120, 301, 30)),       # 2min .. 5min
)
# ExponentialBuckets(0.001, 2, 15): 1ms .. 16.384s
SYNC_PROXY_RULES_BUCKETS: tuple[float, ...] = tuple(0.001 * 2 ** i for i in range(15))
DEFAULT_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1, 2.5, 5, 10)


M = TypeVar("M", Counter, Gauge, Histogram)


def version() -> str:
    """kipvs's installed version ("unknown" when run from a tree that was never installed)."""
    try:
        return metadata.version("kipvs")
    except metadata.PackageNotFoundError:
        return "unknown"


class Registry:
    """The metrics of one service instance (``service``: watcher, planner, applier, or a test's name).

    The helpers return prometheus_client's own metric objects (``.inc()``, ``.set()``, ``.observe()``,
    ``.labels(...)``). Declaring a name again returns the metric already declared (a service's main
    coroutine runs again after a bus failure: its counters go on counting); a gauge's ``read`` and a
    collector are rebound to the new call's. ValueError when the name was declared with another type."""

    def __init__(self, service: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.service = service
        self._declared: dict[str, Counter | Gauge | Histogram] = {}
        self._collectors: dict[str, Collector] = {}
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Gauge("kipvs_build_info", "1, labelled with kipvs's version, the Python version and the service",
              ["version", "python_version", "service"], registry=self.registry,
              ).labels(version(), platform.python_version(), service).set(1)

    def counter(self, name: str, help: str, labels: Labels | None = None) -> Counter:
        """A counter; with ``labels`` (name -> every value it takes), every combination starts at 0."""
        return self._declare(Counter, name, lambda: Counter(name, help, list(labels or {}), registry=self.registry),
                             labels)

    def gauge(self, name: str, help: str, read: Callable[[], float] | None = None,
              labels: Labels | None = None) -> Gauge:
        """A gauge; ``read`` (unlabelled only) is called at each scrape for its value."""
        if read is not None and labels:
            raise ValueError(f"{name}: a read function needs an unlabelled gauge")
        gauge = self._declare(Gauge, name, lambda: Gauge(name, help, list(labels or {}), registry=self.registry),
                              labels)
        if read is not None:
            gauge.set_function(read)
        return gauge

    def histogram(self, name: str, help: str, buckets: Iterable[float] = DEFAULT_BUCKETS,
                  labels: Labels | None = None) -> Histogram:
        """A histogram with the given upper bounds (seconds for ``*_seconds``; +Inf is added)."""
        return self._declare(Histogram, name, lambda: Histogram(name, help, list(labels or {}), registry=self.registry,
                                                                buckets=tuple(buckets)), labels)

    def counter_reading(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A counter whose value a service already keeps (``read`` is called at each scrape; it must
        never decrease within the process)."""
        self.collector(name, _ReadCounter(name, help, read))

    def collector(self, name: str, collector: Collector) -> None:
        """A custom collector (metrics computed at scrape time from a service's state), replacing the one
        declared before under ``name``."""
        previous = self._collectors.pop(name, None)
        if previous is not None:
            self.registry.unregister(previous)
        self.registry.register(collector)
        self._collectors[name] = collector

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, Content-Type) for a scrape whose Accept header is ``accept``: negotiated as
        prometheus_client's own HTTP handler does (``choose_encoder``), the text format 0.0.4 unless the
        scraper asks for OpenMetrics or text 1.0.0."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value (``name`` as exposed, e.g. ``x_total``, ``x_count``); None if absent."""
        return self.registry.get_sample_value(name, dict(labels or {}))

    def _declare(self, kind: type[M], name: str, make: Callable[[], M], labels: Labels | None) -> M:
        existing = self._declared.get(name)
        if existing is not None:
            if not isinstance(existing, kind):
                raise ValueError(f"metric {name} declared as a {type(existing).__name__.lower()} already")
            return existing
        metric = make()
        self._declared[name] = metric
        return _initialised(metric, labels)


class _ReadCounter(Collector):
    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name.removesuffix("_total"), help, read

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.help)]

    def collect(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.help, value=float(self.read()))]


def _initialised(metric: M, labels: Labels | None) -> M:
    if labels:
        for values in itertools.product(*(tuple(v) for v in labels.values())):
            metric.labels(*values)
    return metric
