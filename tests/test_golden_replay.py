"""A recorded log replays to the same deltas, byte for byte (tests/golden)."""

from __future__ import annotations

from tests.golden.regenerate import DELTAS, EVENTS, deltas_for


def test_recorded_log_replays_to_the_same_deltas_byte_for_byte() -> None:
    lines = EVENTS.read_text().splitlines()
    expected = DELTAS.read_bytes().splitlines()
    got = deltas_for(lines)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a == b, f"delta {i + 1} differs from the golden file"
