"""``kipvs status``: is every node where the planner is? One line per node, from the status stream.

For each node (every Node in the published plan, and every node that ever reported): the shared plan
delta it last applied, how many deltas it is behind the planner's newest, how long ago it last reported,
what its last drift check repaired, and the conflicts its facts report name (another IPVS proxy on the
node). A node whose newest report is a shadow-mode comparison (``kipvs applier --shadow``) shows its count
of divergences from kipvs's plan in the SHADOW column, each listed below it (APPLIED is then the shared
delta it compared with); any divergence fails the
check, and kube-proxy's presence is then expected, not a conflict.

Before the nodes, the planner (``pipeline.py``): its position in the Kubernetes log against the log's
head, by how long the oldest unplanned record has waited. A node is behind when it lacks a shared delta
that was published more than ``--max-lag`` seconds ago (a delta in flight is not a lag), and wrong when it
reports a delta the plan stream does not hold (the stream was replaced and the node has not bootstrapped
from the new one). A report's age is the time the server stored it, not the reporter's clock. A node where
an applier superseded by a newer one of the same node still runs, idle, fails the check too
(:func:`second_appliers`, from the claims bucket; docs/architecture.md "One applier per node").

Exit status 1 when the planner or a node is behind for longer than ``--max-lag`` (by more than
``--max-behind`` deltas, for a node), a node has not reported for ``--max-age`` seconds, never reported, or
has a second applier: usable as a check in scripts and CI. Exit 2 when the log cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from shared.contract import events, node_claims, topology
from shared.messaging import bus, plan_log
from shared.tools.log_client import (
    RecordedLog,
    ToolError,
    add_nats_arguments,
    open_log,
    plan_source,
    read_all,
    run_tool,
)

from . import pipeline


@dataclass
class NodeStatus:
    node: str
    applied_seq: int | None = None  # None: never reported
    behind: int | None = None
    report_age_s: float | None = None
    drift_repaired: int = 0
    drift_found: list[str] = field(default_factory=list)
    endpoint_marks: str = ""
    conflicts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    gone: bool = False  # it reported once but has no Node object any more
    shadow: int | None = None  # in shadow mode (its newest report is a shadow one): divergences from the plan
    shadow_found: list[str] = field(default_factory=list)
    taken_over: str = ""  # when kipvs took the node over from kube-proxy in place
    refused: str = ""  # what the kernel refused at the node's newest apply or drift report ("" nothing)

    @property
    def ok(self) -> bool:
        return not self.problems


def _at_least_zero(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-behind", type=_at_least_zero(int), default=0, metavar="DELTAS",
                        help="a node more than this many shared deltas behind the planner fails the check (default 0)")
    parser.add_argument("--max-age", type=_at_least_zero(float), default=300.0, metavar="SECONDS",
                        help="a node whose last report is older fails the check (default 300; 0: no limit)")
    parser.add_argument("--max-lag", type=_at_least_zero(float), default=30.0, metavar="SECONDS",
                        help="the planner or a node may lag for this long (a change in flight) before it fails the "
                             "check (default 30)")
    parser.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per node (first one for the planner's stage, without --node)")
    add_nats_arguments(parser)


async def _last_records(js: Any, plan_log_reader: bus.LogReader) -> tuple[dict[str, events.Envelope], int, set[str]]:
    """(status subject -> its last envelope, the planner's newest shared delta seq, nodes of the plan); the
    plan is read with ``plan_log_reader`` (``log_client.plan_source``)."""
    status_log = bus.LogReader(topology.STATUS_STREAM)
    last: dict[str, events.Envelope] = {}
    newest = 0
    nodes: set[str] = set()
    if isinstance(js, RecordedLog):
        entries = await read_all(js, status_log) + await read_all(js, plan_log_reader)
        for entry in entries:
            if entry.envelope is None:
                continue
            if entry.stream == topology.STATUS_STREAM:
                last[entry.subject] = entry.envelope
            elif isinstance(entry.envelope.record, events.PlanDelta) and entry.envelope.record.scope == "all":
                newest = max(newest, entry.envelope.record.seq)
                nodes |= _plan_nodes(entry.envelope.record)
        return last, newest, nodes
    async for msg in bus.read_stream(js, status_log, "kipvs.status.>", DeliverPolicy.LAST_PER_SUBJECT):
        try:
            envelope = events.decode(msg.data or b"")
        except events.ContractError:
            continue
        # When the server stored it, not the reporter's clock (a node's clock an hour off is not an hour stale).
        stored = msg.metadata.timestamp
        last[msg.subject] = envelope if stored is None else msgspec.structs.replace(
            envelope, time_ns=int(stored.timestamp() * 1e9))
    plan = await plan_log.published_plan(js, plan_log_reader)
    return last, plan.seq, set(plan.nodes)


def _plan_nodes(delta: events.PlanDelta) -> set[str]:
    return {op.node.name for op in delta.ops if isinstance(op, events.SetNode)}


def collect(last: dict[str, events.Envelope], newest: int, plan_nodes: set[str], now_ns: int,
            max_behind: int, max_age: float, delta_times: dict[int, int] | None = None,
            max_lag: float = 0.0) -> list[NodeStatus]:
    """Pure: the per-node verdicts from the last status records. ``delta_times`` (shared delta seq -> ns the
    server stored it, for the deltas of the last ``max_lag`` seconds) lets a node lag while the first delta
    it lacks is younger than ``max_lag``; None: any lag beyond ``max_behind`` fails (a recorded log)."""
    by_node: dict[str, NodeStatus] = {name: NodeStatus(name) for name in plan_nodes}
    newest_report: dict[str, int] = {}
    shadow: dict[str, tuple[int, events.ShadowReport]] = {}
    for subject, envelope in last.items():
        parts = subject.split(".")
        if len(parts) != 4:
            continue
        node, what = parts[2], parts[3]
        status = by_node.setdefault(node, NodeStatus(node))
        record = envelope.record
        if what in ("applied", "drift") and isinstance(record, events.ApplyReport | events.DriftReport):
            if envelope.time_ns >= newest_report.get(node, 0):
                newest_report[node] = envelope.time_ns
                status.applied_seq = record.plan_seq
                status.refused = _refused(record)
            if isinstance(record, events.DriftReport):
                status.drift_found = list(record.found)
                status.drift_repaired = len(record.found)
        elif what == "facts" and isinstance(record, events.NodeFactsReport):
            status.conflicts = list(record.conflicts)
            status.endpoint_marks = record.endpoint_marks
            status.taken_over = record.taken_over
        elif what == "shadow" and isinstance(record, events.ShadowReport):
            shadow[node] = (envelope.time_ns, record)
    for node, (time_ns, record) in shadow.items():
        if time_ns >= newest_report.get(node, 0):  # a shadow report newer than any apply: the node is in shadow
            newest_report[node] = time_ns
            by_node[node].applied_seq = record.plan_seq  # the plan the kernel was compared with
            by_node[node].shadow = record.divergences_total
            by_node[node].shadow_found = list(record.divergences)
    for node, status in by_node.items():
        if plan_nodes and node not in plan_nodes:  # reports of a node that left the cluster: not a lag
            status.problems = []
            status.gone = True
            continue
        if status.applied_seq is None:
            status.problems.append("never reported")
            continue
        status.behind = max(newest - status.applied_seq, 0)
        status.report_age_s = round(max(now_ns - newest_report[node], 0) / 1e9, 1)
        if status.applied_seq > newest:
            status.problems.append(f"applied delta {status.applied_seq} but the plan stream's newest is {newest}: "
                                   "the plan stream was replaced and the node has not bootstrapped from it")
        lagging = _lagging(status.behind, status.applied_seq, now_ns, max_behind, delta_times, max_lag)
        if lagging:
            status.problems.append(lagging)
        if max_age and status.report_age_s > max_age:
            status.problems.append(f"last report {status.report_age_s:.0f}s ago (limit {max_age:.0f}s)")
        if status.conflicts and status.shadow is None:  # in shadow mode kube-proxy is expected on the node
            status.problems.append(f"{len(status.conflicts)} conflicts")
        if status.shadow:
            status.problems.append(f"shadow: {status.shadow} divergences from kipvs's plan")
        status.problems += [status.refused[:300]] if status.refused else []  # the kernel refused part of the plan
    return [by_node[name] for name in sorted(by_node)]


def _refused(record: events.ApplyReport | events.DriftReport) -> str:
    """What the kernel refused according to a report (the netlink writer's ``Refused``: "the kernel
    refused N operation(s): ..."), "" when nothing: the node follows the log but cannot program all of it."""
    lines = record.errors if isinstance(record, events.ApplyReport) else record.found
    return next((line for line in lines if line.startswith("the kernel refused")), "")


def _lagging(behind: int, applied: int, now_ns: int, max_behind: int, delta_times: dict[int, int] | None,
             max_lag: float) -> str:
    """The problem of a node ``behind`` deltas behind, "" when it is none (within the limits)."""
    if behind <= max_behind:
        return ""
    if delta_times is None:
        return f"{behind} deltas behind the planner (limit {max_behind})"
    first_missing = delta_times.get(applied + 1)
    if first_missing is None:  # published before the window: older than the limit
        return f"{behind} deltas behind the planner for over {max_lag:.0f}s"
    waited = max(now_ns - first_missing, 0) / 1e9
    if waited <= max_lag:
        return ""  # in flight
    return f"{behind} deltas behind the planner for {waited:.0f}s (limit {max_lag:.0f}s)"


def _ok(status: NodeStatus) -> str:
    """A node within its limits; one behind by its last report says it is within them: reports are paced
    (one a --report-interval, a --busy-report-interval under churn), so the newest deltas show late."""
    return "ok (behind by its last report, within the limits)" if status.behind else "ok"


def render(statuses: list[NodeStatus], newest: int, stage: pipeline.Stage | None = None) -> str:
    where = f"; {pipeline.render_stage(stage)}" if stage is not None else ""
    lines = [f"planner: shared plan delta {newest}{where}",
             f"{'NODE':<24} {'APPLIED':>8} {'BEHIND':>7} {'REPORTED':>10} {'DRIFT':>6} {'SHADOW':>6}  MARKS     STATE"]
    for s in statuses:
        applied = "-" if s.applied_seq is None else str(s.applied_seq)
        behind = "-" if s.behind is None else str(s.behind)
        age = "never" if s.report_age_s is None else f"{s.report_age_s:.0f}s ago"
        shadow = "-" if s.shadow is None else str(s.shadow)
        lines.append(f"{s.node:<24} {applied:>8} {behind:>7} {age:>10} {s.drift_repaired:>6} {shadow:>6}  "
                     f"{s.endpoint_marks or '-':<9} "
                     f"{'not in the cluster (old reports)' if s.gone else _ok(s) if s.ok else '; '.join(s.problems)}")
        lines += [f"{'':<24} conflict: {c}" for c in s.conflicts]
        lines += [f"{'':<24} taken over from kube-proxy in place at {s.taken_over}"] if s.taken_over else []
        lines += [f"{'':<24} shadow: {d}" for d in s.shadow_found]
    return "\n".join(lines) + "\n"


async def second_appliers(js: Any, nodes: list[str], now_ns: int) -> dict[str, str]:
    """node -> a problem, for each node where an applier that lost the node's claim to a newer one still
    runs, idle (shared/contract/node_claims.py: its record renewed within SUPERSEDED_FRESH_S). Nothing from a
    recorded log or a server without the claims bucket (an older kipvs's topology)."""
    if isinstance(js, RecordedLog):
        return {}
    try:
        kv = await js.key_value(node_claims.BUCKET)
    except BucketNotFoundError:
        return {}
    found: dict[str, str] = {}
    for node in nodes:
        try:
            record = node_claims.decode_superseded((await kv.get(node_claims.superseded_key(node))).value)
        except (KeyNotFoundError, ValueError):  # ValueError: a name that is no node's (never reported)
            continue
        if record is not None and now_ns - record.at_ns <= node_claims.SUPERSEDED_FRESH_S * 1e9:
            found[node] = f"a second applier ({record.instance}) runs idle: {record.by} took the node over"
    return found


async def status(args: argparse.Namespace) -> int:
    stage: pipeline.Stage | None = None
    times: dict[int, int] | None = None
    plan_reader = plan_source(args)
    async with open_log(args) as js:
        now_ns = time.time_ns()
        try:
            if not isinstance(js, RecordedLog):  # a recording has no consumer positions nor server times
                stage = await pipeline.read_planner_stage(js, now_ns, args.max_lag)
                times = await pipeline.delta_times(js, plan_reader, now_ns - int(args.max_lag * 1e9))
            last, newest, plan_nodes = await _last_records(js, plan_reader)
        except NotFoundError as exc:
            raise ToolError(f"a stream kipvs needs does not exist ({exc.description}): a new or wiped NATS store "
                            "that nobody declared again yet (the services do at start, or 'kipvs topology apply')"
                            ) from None
        reporting = {subject.split(".")[2] for subject in last if subject.count(".") == 3}
        seconds = await second_appliers(js, sorted(plan_nodes | reporting), now_ns)
    if stage is not None:
        pipeline.check_programmed(stage, plan_nodes, bool(last))
    statuses = collect(last, newest, plan_nodes, time.time_ns(), args.max_behind, args.max_age, times, args.max_lag)
    for s in statuses:
        if s.node in seconds:
            s.problems.append(seconds[s.node])
    if args.node:
        unknown = sorted(set(args.node) - {s.node for s in statuses})
        statuses = [s for s in statuses if s.node in args.node]
        statuses += [NodeStatus(n, problems=["unknown node: no Node object and no report"]) for n in unknown]
    if args.json:
        if stage is not None and not args.node:
            print(json.dumps({**asdict(stage), "ok": stage.ok}))
        for s in statuses:
            print(json.dumps({**asdict(s), "ok": s.ok}))
    else:
        sys.stdout.write(render(statuses, newest, stage))
    return 0 if all(s.ok for s in statuses) and (stage is None or stage.ok) else 1


def run(args: argparse.Namespace) -> int:
    return run_tool("status", lambda: status(args))
