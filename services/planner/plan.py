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
import sys
from typing import IO

from shared.contract import topology
from shared.messaging import bus
from shared.plan.resolve import resolve_node
from shared.tools.log_client import ToolError, add_nats_arguments, clock, ns_of, open_log, parse_point, read_all

from .core import Planner, PlannerConfig
from .log_replay import ReplayError, plan_events, read_events, replay
from .render import ipvsadm, json_text, node_warnings, warning_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    point = parse_point(args.at) if args.at else None
    async with open_log(args) as log:
        upto = point if isinstance(point, int) else 0
        entries = await read_all(log, bus.LogReader(topology.KUBE_STREAM), upto=upto)
    if point is not None and not isinstance(point, int):
        # a moment covers its last digit: a time copied from the tools' output (milliseconds,
        # log_client.clock) includes the records of that millisecond, the first one among them
        limit = ns_of(point) + (999_999 if point.microsecond % 1000 == 0 else 999)
        timed = [e for e in entries if e.envelope is not None]
        if timed and timed[0].envelope.time_ns > limit:
            raise ToolError(f"--at {args.at} is before the log's first record (KUBE #{timed[0].seq}, "
                            f"{clock(timed[0].envelope.time_ns)}): nothing was planned yet")
        # parked records (no envelope, no time) are skipped, whatever their time
        entries = list(itertools.takewhile(lambda e: e.envelope is None or e.envelope.time_ns <= limit, entries))
    planner = Planner(config)
    last = 0
    for seq, _ in replay(planner, ((entry.seq, entry.envelope) for entry in entries)):
        last = seq
    where = f"KUBE #{last}" if last else "the empty log"
    print(f"kipvs plan: the desired state of {args.node} as of {where}", file=sys.stderr)
    return planner


def run(args: argparse.Namespace) -> int:
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
