"""Opening the log for a tool: the NATS URL from --nats-url, NATS_URL, or the embedded server running for
the state directory; reading streams whole; the time and sequence syntax the tools accept."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
from nats.js import JetStreamContext

from . import bus, events, topology
from .embedded_nats import EmbeddedNats, default_state_dir

STREAMS = {"kube": topology.KUBE_STREAM, "plan": topology.PLAN_STREAM, "status": topology.STATUS_STREAM,
           "parked": topology.PARKED_STREAM}


class ToolError(Exception):
    """A precise message for the user; the tool exits 2."""


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default="", help="NATS URL (default: $NATS_URL, else the embedded server "
                                                       "running for --state-dir)")
    parser.add_argument("--state-dir", default="", help="the embedded server's state dir (default: "
                                                        "$KIPVS_STATE_DIR or ~/.local/state/kipvs)")


def nats_url(args: argparse.Namespace) -> str:
    if args.nats_url:
        return args.nats_url
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    where = Path(args.state_dir) if args.state_dir else default_state_dir()
    running = EmbeddedNats.running_in(where)
    if running is None:
        raise ToolError(f"no NATS to read: give --nats-url (or NATS_URL), or start kipvs (no embedded server "
                        f"runs for {where})")
    return running.url


@contextlib.asynccontextmanager
async def open_log(args: argparse.Namespace) -> AsyncIterator[JetStreamContext]:
    url = nats_url(args)
    try:
        nc = await nats.connect(url, name="kipvs-tool", connect_timeout=3, max_reconnect_attempts=0)
    except (OSError, nats.errors.NoServersError) as exc:
        raise ToolError(f"cannot reach NATS at {url}: {exc}") from None
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@dataclass(frozen=True)
class Entry:
    """One message of the log, decoded (``envelope`` is None when it is not a kipvs envelope: parked)."""

    stream: str
    seq: int
    subject: str
    envelope: events.Envelope | None
    raw: bytes = b""
    headers: dict[str, str] | None = None


def decode_entry(stream: str, msg: nats.aio.msg.Msg) -> Entry:
    try:
        envelope = events.decode(msg.data) if stream != topology.PARKED_STREAM else None
    except events.ContractError:
        envelope = None
    return Entry(stream, msg.metadata.sequence.stream, msg.subject, envelope, msg.data, dict(msg.headers or {}))


async def read_all(js: JetStreamContext, stream: str, subject: str = ">", upto: int = 0) -> list[Entry]:
    """Every message of a stream (optionally up to a stream sequence); [] when the stream is empty or absent."""
    try:
        return [decode_entry(stream, m) async for m in bus.read_stream(js, stream, subject, upto=upto)]
    except nats.js.errors.NotFoundError:
        return []


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_point(text: str) -> int | datetime:
    """A stream sequence (digits) or a time: ISO 8601 (``2026-11-24T18:00:00Z``) or an age (``10m``, ``2h``)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = _RELATIVE.match(text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ToolError(f"{text!r} is neither a stream sequence (digits), an ISO time (2026-11-24T18:00:00Z) nor "
                        "an age (30s, 10m, 2h, 1d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def ns_of(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


def clock(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
