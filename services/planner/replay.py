"""``kipvs plan``: replay Kubernetes events through the planner's core and print a node's state.

Input: a file of JSON lines in the Kubernetes watch wire format ``{"type": "ADDED"|"MODIFIED"|"DELETED",
"object": {...}}`` (what ``kipvs watcher --record`` writes), applied in order; or, without ``--events``,
the live log (KIPVS_KUBE). The same core as the service, not a copy: each line becomes the KubeEvent
record the watcher would have logged.

``--at`` gives the desired state at a past moment: a KIPVS_KUBE stream sequence or a time (ISO 8601, or an
age such as 10m) against the log; with ``--events FILE``, a number of lines.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO

from kipvs.shared import events, topology
from kipvs.shared.plan.resolve import resolve_node

from .core import Planner, PlannerConfig
from .render import ipvsadm, json_text, node_warnings, warning_line

KINDS = set(events.KUBE_KINDS)


class ReplayError(Exception):
    pass


def read_events(lines: Iterable[str | bytes], source: str = "-",
                report: Callable[[str], None] | None = None) -> Iterator[events.Envelope]:
    """Watch-format lines (text, or bytes decoded here as UTF-8) as envelopes. Unreadable lines raise
    ReplayError naming the line. Skipped: objects of kinds kipvs does not watch (they cannot matter to the
    plan), BOOKMARK events (a position in the watch, no object), and ERROR events (a 410 Expired or another
    Status the API server sent instead of an object), each of the latter reported through ``report``."""
    for number, raw in enumerate(lines, 1):
        where = f"{source}:{number}"
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        else:
            line = raw
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{where}: not JSON: {exc}") from None
        kind_of_event = doc.get("type") if isinstance(doc, dict) else None
        if kind_of_event == "BOOKMARK":
            continue
        if kind_of_event == "ERROR":
            status = doc.get("object") if isinstance(doc.get("object"), dict) else {}
            if report is not None:
                report(f"{where}: ERROR event skipped (code {status.get('code', '?')}, "
                       f"{status.get('reason') or 'no reason'}: {status.get('message') or 'no message'})")
            continue
        if not isinstance(doc, dict) or kind_of_event not in ("ADDED", "MODIFIED", "DELETED") \
                or not isinstance(doc.get("object"), dict):
            raise ReplayError(f'{where}: not a watch event ({{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|'
                              '"ERROR", "object": ...}})')
        obj = doc["object"]
        kind = obj.get("kind")
        if kind not in KINDS:
            continue
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name, namespace = meta.get("name"), meta.get("namespace") or ""
        if not isinstance(name, str) or not name:
            raise ReplayError(f"{where}: {kind} without metadata.name")
        record = events.KubeEvent(kind=kind, action=doc["type"], namespace=namespace, name=name,
                                  resource_version=str(meta.get("resourceVersion") or number), object=obj)
        yield events.Envelope(id=f"{source}#{number}", time_ns=number, producer="replay", record=record)


def plan_events(envelopes: Iterable[events.Envelope], config: PlannerConfig) -> Planner:
    planner = Planner(config)
    for seq, env in enumerate(envelopes, 1):
        planner.handle(env, seq)
    return planner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kipvs.shared.log_client import add_nats_arguments

    parser.add_argument("--events", default="", metavar="FILE",
                        help="watch-format JSON lines; - for stdin; default: the live log over NATS")
    parser.add_argument("--node", required=True, help="the node whose state to print")
    parser.add_argument("--format", choices=("ipvsadm", "json"), default="ipvsadm")
    parser.add_argument("--scheduler", default="rr", help="cluster default IPVS scheduler")
    parser.add_argument("--at", default="", metavar="TIME|SEQ",
                        help="the state at a past moment: a KIPVS_KUBE sequence, an ISO time or an age (10m); "
                             "with --events, a number of lines")
    add_nats_arguments(parser)


def _from_file(args: argparse.Namespace, config: PlannerConfig) -> Planner:
    if args.at and not args.at.isdigit():
        raise ReplayError("--at with --events takes a number of lines (a file has no times); use the log for times")
    try:
        stream: IO[bytes] = sys.stdin.buffer if args.events == "-" else open(args.events, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ReplayError(str(exc)) from None
    try:
        lines = itertools.islice(stream, int(args.at)) if args.at else stream
        return plan_events(read_events(lines, args.events, report=_note), config)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _note(message: str) -> None:
    print(f"kipvs plan: {message}", file=sys.stderr)


async def _from_log(args: argparse.Namespace, config: PlannerConfig) -> Planner:
    from kipvs.shared.log_client import ToolError, clock, ns_of, open_log, parse_point, read_all

    point = parse_point(args.at) if args.at else None
    async with open_log(args) as js:
        log = await read_all(js, topology.KUBE_STREAM, upto=point if isinstance(point, int) else 0)
    # a moment covers its last digit: a time copied from the tools' output (milliseconds, log_client.clock)
    # includes the records of that millisecond, the first one among them
    limit = None
    if point is not None and not isinstance(point, int):
        limit = ns_of(point) + (999_999 if point.microsecond % 1000 == 0 else 999)
    planner = Planner(config)
    last = None
    for entry in log:
        if entry.envelope is None:
            planner.source_seq = entry.seq
            continue
        if limit is not None and entry.envelope.time_ns > limit:
            break
        planner.handle(entry.envelope, entry.seq)
        last = entry
    if last is None and limit is not None and any(e.envelope is not None for e in log):
        first = next(e for e in log if e.envelope is not None)
        raise ToolError(f"--at {args.at} is before the log's first record (KUBE #{first.seq}, "
                        f"{clock(first.envelope.time_ns)}): nothing was planned yet")
    where = f"KUBE #{last.seq}" if last else "the empty log"
    print(f"kipvs plan: the desired state of {args.node} as of {where}", file=sys.stderr)
    return planner


def run(args: argparse.Namespace) -> int:
    from kipvs.shared.log_client import ToolError

    try:
        config = PlannerConfig(default_scheduler=args.scheduler)
        planner = _from_file(args, config) if args.events else asyncio.run(_from_log(args, config))
    except (ValueError, ReplayError, ToolError) as exc:
        print(f"kipvs plan: {exc}", file=sys.stderr)
        return 2
    state = resolve_node(planner.plans.values(), planner.nodes.get(args.node))
    if args.node not in planner.nodes:
        print(f"kipvs plan: note: no Node {args.node!r} in the events; node-specific state (NodePorts, Local "
              "policies, topology) is resolved as for an unknown node", file=sys.stderr)
    if args.format == "ipvsadm":
        out = ipvsadm(state)
        # stdout stays `ipvsadm -R` input: what kipvs could not honour goes to stderr, a line each
        for warning in node_warnings(planner.warnings.values(), planner.node_calico(args.node)):
            print(f"kipvs plan: warning: {warning_line(warning)}", file=sys.stderr)
    else:
        out = json_text(state, planner.warnings.values(), args.node, planner.node_calico(args.node))
    sys.stdout.write(out)
    return 0
