"""Opening the log for a tool: the NATS URL from --nats-url, NATS_URL, or the embedded server running for
the state directory; reading streams whole; the time and sequence syntax the tools accept."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats

from shared.contract import delta_chunks, events, topology
from shared.messaging import bus
from shared.messaging.embedded_nats import EmbeddedNats, default_state_dir
from shared.security.nats_credentials import AUTH_DIR, ClientAuth, CredentialsError, for_service

STREAMS = {"kube": topology.KUBE_STREAM, "plan": topology.PLAN_STREAM, "status": topology.STATUS_STREAM,
           "parked": topology.PARKED_STREAM}


class ToolError(Exception):
    """A precise message for the user; the tool exits 2."""


def add_nats_arguments(parser: argparse.ArgumentParser, recorded_log: bool = True) -> None:
    """The tools' bus flags: where NATS is and the read-only tools identity (``recorded_log``: also
    ``--log FILE``, a recorded log instead of NATS)."""
    parser.add_argument("--nats-url", default="", help="NATS URL (default: $NATS_URL, else the embedded server "
                                                       "running for --state-dir)")
    parser.add_argument("--state-dir", default="", help="the embedded server's state dir (default: "
                                                        "$KIPVS_STATE_DIR or ~/.local/state/kipvs)")
    parser.add_argument("--nats-nkey-file", default=os.environ.get("KIPVS_NATS_NKEY_FILE", ""), metavar="FILE",
                        help="the tools identity's NKEY seed (env KIPVS_NATS_NKEY_FILE; default: the embedded "
                             "server's, when it has credentials)")
    parser.add_argument("--nats-ca-file", default=os.environ.get("KIPVS_NATS_CA_FILE", ""), metavar="FILE",
                        help="CA the server's certificate must chain to (env KIPVS_NATS_CA_FILE)")
    if recorded_log:
        parser.add_argument("--log", default="", metavar="FILE",
                            help="read a recorded log ('kipvs tap --json' lines, e.g. the demo's) instead of NATS")


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
    return running.client_url


def tools_identity(args: argparse.Namespace) -> ClientAuth | None:
    """The read-only tools identity: the files given, else the embedded server's (when no URL is given)."""
    nkey, ca = getattr(args, "nats_nkey_file", ""), getattr(args, "nats_ca_file", "")
    embedded = None
    if not (args.nats_url or os.environ.get("NATS_URL")):
        embedded = (Path(args.state_dir) if args.state_dir else default_state_dir()) / AUTH_DIR
    auth = for_service("tools", "tools", nkey_file=nkey, ca_file=ca, embedded_dir=embedded)
    if auth is not None:
        try:
            auth.check()
        except CredentialsError as exc:
            raise ToolError(str(exc)) from None
    return auth


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace, reconnect: str = "") -> AsyncIterator[nats.NATS]:
    """One connection to the live bus as the tools identity (:func:`tools_identity`); ToolError, one
    sentence, when it cannot be made. With an identity of its own, plan history is read through the
    plan's mirror (:func:`plan_source`), which is checked here.

    A tool's answer ends with a lost connection (ToolError). A tool that follows the log live (``reconnect``:
    its name, e.g. "tap") keeps its connection instead: once made, nats-py reconnects for as long as the
    tool runs, and the loss and the return are each said in one line on stderr (not the tool's own close)."""
    url = nats_url(args)
    auth = tools_identity(args)
    errors: list[BaseException] = []

    async def quiet(exc: Exception) -> None:
        errors.append(exc)  # the failure is raised below, once, as a sentence

    try:
        # max_reconnect_attempts=0 makes nats-py retry forever (found here): one attempt, then a sentence
        nc = await nats.connect(bus.servers(url), name="kipvs-tool", connect_timeout=3, allow_reconnect=False,
                                max_reconnect_attempts=1, error_cb=quiet,
                                **(auth.connect_options() if auth else {}))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        cause = errors[0] if errors else exc
        raise ToolError(f"cannot reach NATS at {url}: {bus.describe_refusal(cause, auth)}") from None
    refusals = [str(e) for e in errors if "permissions violation" in str(e).lower()]

    async def refused(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refusals.append(str(exc))

    nc._error_cb = refused  # after the connection: what the server refuses this identity, for the sentence below
    if reconnect:
        _keep_reconnecting(nc, f"kipvs {reconnect}", url)
    try:
        if auth is not None and auth.nkey_file:
            await _check_audit_mirror(nc)
        yield nc
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        if refusals:  # the server refused a request of this identity: the request then only times out
            who = auth.nkey_file if auth is not None and auth.nkey_file else "no identity"
            raise ToolError(f"NATS refused this identity ({who}) what the tool needs: {refusals[-1]}; the "
                            "tools need the read-only tools identity (tools.nk)") from None
        raise ToolError(f"NATS at {url} did not answer in time ({type(exc).__name__})") from None
    except bus.IncompleteRead as exc:  # the read was retried from where it stopped, and still stopped
        raise ToolError(f"cannot read the whole log from NATS at {url}: {exc}") from None
    except nats.errors.Error as exc:  # the connection closed under the tool (it does not reconnect), ...
        raise ToolError(f"NATS at {url} failed: {type(exc).__name__}: {exc or 'no detail'}") from None
    finally:
        await nc.close()


def _keep_reconnecting(nc: nats.NATS, tool: str, url: str) -> None:
    """Let nats-py reconnect ``nc`` forever from now on (the first connection was one attempt, so that a
    wrong URL is one sentence, not a hang), saying so in one line each way. nats-py reads these options and
    callbacks when the connection is lost (``Client._process_op_err``, ``_attempt_reconnect``); a negative
    max_reconnect_attempts never gives up (``Client._select_next_server``)."""
    nc.options["allow_reconnect"], nc.options["max_reconnect_attempts"] = True, -1

    async def lost() -> None:
        if not nc.is_closed:  # the tool's own close calls this too: nothing was lost
            print(f"{tool}: the connection to NATS at {url} was lost; reconnecting, then following on after "
                  "the last record shown", file=sys.stderr, flush=True)

    async def back() -> None:
        print(f"{tool}: connected to NATS at {url} again; following on", file=sys.stderr, flush=True)

    nc._disconnected_cb, nc._reconnected_cb = lost, back


async def _check_audit_mirror(nc: nats.NATS) -> None:
    """ToolError when the plan's mirror (which the tools read the plan through) is of an older KIPVS_PLAN:
    what it holds is not the plan the nodes follow, and every answer read from it would be wrong (false lag,
    false drift, deltas missing), or is missing while KIPVS_PLAN exists (every plan read would find nothing:
    "does not forward", "no plan change"). A missing KIPVS_PLAN is left to the tool, which names it."""
    js = nc.jetstream(timeout=10)
    found = await topology.audit_mirror_staleness(js)
    if found is None and await topology.stream_identity(js, topology.PLAN_STREAM) is not None:
        found = (None, f"the audit mirror {topology.PLAN_AUDIT_STREAM} of {topology.PLAN_STREAM} does not exist")
    if found is not None and found[1]:
        raise ToolError(f"{found[1]}: run 'kipvs topology apply' (it declares the mirror again)")


def plan_source(args: argparse.Namespace) -> bus.LogReader:
    """How this tool reads the plan's history: with an identity of its own (the tools identity, which may not
    create consumers on KIPVS_PLAN), through the plan's audit mirror (``topology.PLAN_AUDIT_STREAM``); with
    none (an open bus) or from a recorded log (``--log``), KIPVS_PLAN itself. ToolError for unusable
    identity files."""
    if getattr(args, "log", ""):
        return bus.LogReader(topology.PLAN_STREAM)
    auth = tools_identity(args)
    if auth is not None and auth.nkey_file:
        return bus.LogReader(topology.PLAN_STREAM, via=topology.PLAN_AUDIT_STREAM)
    return bus.LogReader(topology.PLAN_STREAM)


@contextlib.asynccontextmanager
async def open_log(args: argparse.Namespace, reconnect: str = "") -> AsyncIterator[Any]:
    """The live log (a JetStream context) or, with ``--log FILE``, a :class:`RecordedLog`. ``reconnect``:
    see :func:`connect`."""
    if getattr(args, "log", ""):
        yield RecordedLog.load(Path(args.log))
        return
    async with connect(args, reconnect) as nc:
        yield nc.jetstream()


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


class RecordedLog:
    """A log recorded as ``kipvs tap --json`` lines (all streams), read like the live one: tools can audit an
    archived incident, or a demo whose NATS has gone, without a server."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = sorted(entries, key=lambda e: (e.stream, e.seq))

    @classmethod
    def load(cls, path: Path) -> RecordedLog:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ToolError(f"{path}: {exc.strerror}") from None
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                envelope = events.from_json(json.dumps(doc["envelope"])) if "envelope" in doc else None
                headers = {topology.PARK_REASON: doc.get("reason", "")} if envelope is None else None
                entries.append(Entry(doc["stream"], int(doc["seq"]), doc.get("subject", ""), envelope,
                                     doc.get("data", "").encode(), headers))
            except (ValueError, KeyError, TypeError, events.ContractError) as exc:
                raise ToolError(f"{path}:{number}: not a 'kipvs tap --json' line: {exc}") from None
        return cls(entries)

    def read(self, stream: str, subject: str = ">", upto: int = 0) -> list[Entry]:
        return [e for e in self.entries
                if e.stream == stream and subject_matches(subject, e.subject) and (not upto or e.seq <= upto)]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class EntryAssembler:
    """Plan entries as the tools show them: a chunked delta (``shared/contract/delta_chunks.py``) as one entry, at its
    last part's stream sequence, holding the whole delta; parts that make no whole delta (one is missing or
    garbled, or the rest is not published yet) as they are, so nothing of the log is hidden."""

    def __init__(self) -> None:
        self._chunks = delta_chunks.Assembler()
        self._held: dict[str, list[Entry]] = {}

    def feed(self, entry: Entry) -> list[Entry]:
        """The entries ``entry`` lets out, in log order: itself, nothing (a part held), or what it completes."""
        chunk = entry.envelope.record if entry.envelope is not None else None
        if isinstance(chunk, events.PlanDelta):  # the same delta whole: parts held of it never complete
            self._chunks.settled(chunk.scope, chunk.seq)
            return [*self._held.pop(chunk.scope, []), entry]
        if not isinstance(chunk, events.PlanDeltaChunk):
            return [entry]
        held = self._held.setdefault(chunk.scope, [])
        before = self._chunks.pending(chunk.scope)
        try:
            whole = self._chunks.feed(entry.envelope)  # type: ignore[arg-type]
        except delta_chunks.ChunkGap:
            del self._held[chunk.scope]
            return [*held, entry]
        if whole is not None:
            del self._held[chunk.scope]
            return [dataclasses.replace(entry, envelope=whole, raw=events.encode(whole))]
        after = self._chunks.pending(chunk.scope)
        if after == before + 1:
            held.append(entry)
            return []
        if after == 1:  # part 1 again: the delta was published afresh; what was held never completed
            self._held[chunk.scope] = [entry]
            return held
        return [entry]

    def rest(self) -> list[Entry]:
        """The parts still held (a delta whose last part is not in the log yet), in log order."""
        out = sorted((e for held in self._held.values() for e in held), key=lambda e: e.seq)
        self._held.clear()
        return out


def assembled(entries: list[Entry]) -> list[Entry]:
    """``entries`` (one stream, in order) with every chunked delta put back together (:class:`EntryAssembler`)."""
    assembler = EntryAssembler()
    out = [e for entry in entries for e in assembler.feed(entry)]
    rest = assembler.rest()
    return sorted(out + rest, key=lambda e: e.seq) if rest else out


async def read_all(js: Any, source: bus.LogReader, subject: str = ">", upto: int = 0) -> list[Entry]:
    """Every message of ``source``'s stream (optionally up to a stream sequence), chunked plan deltas put back
    together (:func:`assembled`); [] when the stream is empty or absent. ``js``: the live log or a
    :class:`RecordedLog` (which has one copy of each stream: ``source.stream``)."""
    stream = source.stream
    if isinstance(js, RecordedLog):
        return assembled(js.read(stream, subject, upto))
    try:
        return assembled([decode_entry(stream, m) async for m in bus.read_stream(js, source, subject, upto=upto)])
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


def run_tool(name: str, main: Callable[[], Awaitable[int]]) -> int:
    """Run a tool's coroutine: a ToolError is a precise message and exit 2; Ctrl-C ends it quietly."""
    try:
        return asyncio.run(main())
    except ToolError as exc:
        print(f"kipvs {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
