"""Small helpers for tests that wait on real processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds; fail the test (never hang) when it does not within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
