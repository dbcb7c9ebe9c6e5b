"""Go's duration syntax (``time.ParseDuration``), as kube-proxy's flags and ``KubeProxyConfiguration``
(``metav1.Duration``) take it: ``300ms``, ``30s``, ``15m``, ``1h2m3s``, ``1.5h``, ``-2s``, and a bare ``0``.

Followed: Go's src/time/format.go ``ParseDuration``: an optional sign, then one or more decimal numbers
each with a unit (``ns``, ``us``, ``µs``, ``μs``, ``ms``, ``s``, ``m``, ``h``); no spaces, no unit-less
number other than 0, no empty string.
"""

from __future__ import annotations

import re

UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                "h": 3600.0}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
# Go refuses a duration over about 290 years (int64 nanoseconds); no setting here wants anything near it.
MAX_SECONDS = (2 ** 63 - 1) / 1e9


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string. ValueError with a one-line reason when it is not one.

    ``parse_duration("1h2m3s") == 3723.0``; ``parse_duration("0") == 0.0``; ``parse_duration("15")`` raises
    (Go requires a unit on every number but 0)."""
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text[:1] == "-" else 1.0
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"{text!r} is not a duration (Go syntax: 300ms, 30s, 15m, 1h2m3s)")
    total, at = 0.0, 0
    while at < len(body):
        match = _PART.match(body, at)
        if match is None:
            unit_less = re.fullmatch(r"\d+\.?\d*", body[at:]) is not None
            why = "a number without a unit" if unit_less else f"cannot read {body[at:]!r}"
            raise ValueError(f"{text!r} is not a duration ({why}; Go syntax: 300ms, 30s, 15m, 1h2m3s)")
        total += float(match.group(1)) * UNIT_SECONDS[match.group(2)]
        at = match.end()
    if total > MAX_SECONDS:
        raise ValueError(f"{text!r} is too long a duration (Go's limit is about 290 years)")
    return sign * total
