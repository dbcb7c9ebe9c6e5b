"""Exponential backoff with jitter, for every retry loop (NATS connect, Kubernetes watches)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._current = self.initial if self._current == 0 else min(self._current * self.factor, self.maximum)
        return self._current * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0
