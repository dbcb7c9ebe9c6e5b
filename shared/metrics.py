"""A small Prometheus registry: counters, gauges and histograms rendered in the text exposition format.

Kept in-house because it is ~100 lines and the service set is small; names follow Prometheus practice
(``kipvs_<service>_<what>_<unit>``, ``_total`` for counters).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in items)
    return "{" + body + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, labels: dict[str, str] | None = None) -> float:
        return self.values.get(_labels(labels), 0.0)

    def _samples(self) -> list[str]:
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self.read = read

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        self.values[_labels(labels)] = value

    def _samples(self) -> list[str]:
        if self.read is not None:
            self.values[()] = float(self.read())
        return super()._samples()


DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help)
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def _samples(self) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            out.append(f"{self.name}_bucket{_fmt_labels((), (('le', _fmt_value(bound)),))} {running}")
        out.append(f"{self.name}_sum {_fmt_value(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str) -> Counter:
        return self._add(Counter(name, help))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, read: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, read))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
