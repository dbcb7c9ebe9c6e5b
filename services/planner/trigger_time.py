"""The EndpointSlice's ``endpoints.kubernetes.io/last-change-trigger-time``: when the change that made the
endpoints controller write the slice happened (a pod became ready, a Service selector changed). It is
the start of Kubernetes' in-cluster network programming SLI; kube-proxy reads it in
pkg/proxy/endpointschangetracker.go (getLastChangeTriggerTime) and ignores a value it cannot parse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def trigger_time_ns(obj: dict[str, Any]) -> int:
    """The annotation of an EndpointSlice object as Unix nanoseconds (RFC 3339, as the endpoints
    controller writes it, e.g. ``2026-11-30T19:00:00.123456789Z``); 0 when absent or unparsable, as
    kube-proxy skips it then. Sub-microsecond digits are dropped (Python's datetime stops at microseconds)."""
    metadata = obj.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    value = annotations.get(TRIGGER_TIME_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(value, str) or not value:
        return 0
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return 0
    if when.tzinfo is None:  # RFC 3339 requires an offset: a value without one is not the controller's
        return 0
    seconds = int(when.timestamp())
    return seconds * 1_000_000_000 + when.microsecond * 1000

