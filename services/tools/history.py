"""``kipvs history KIND/NAMESPACE/NAME``: every recorded change of one object (what changed in it) and the
plan deltas each change caused (those whose causation names it).

    kipvs history Service/default/web
    kipvs history EndpointSlice/default/web-abc12
    kipvs history Node/node-a                   # cluster-scoped: KIND/NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shared.contract import events, topology
from shared.messaging import bus
from shared.tools import records
from shared.tools.log_client import Entry, ToolError, add_nats_arguments, open_log, plan_source, read_all, run_tool

IGNORED = ("metadata.resourceVersion", "metadata.managedFields", "metadata.generation")
KINDS = {k.lower(): k for k in events.KUBE_KINDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_nats_arguments(parser)
    parser.add_argument("object", metavar="KIND/NAMESPACE/NAME", help="e.g. Service/default/web, Node/node-a")
    parser.add_argument("--json", action="store_true", help="JSON lines: each change, then the deltas it caused")


def parse_object(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    kind = KINDS.get(parts[0].lower()) if parts else None
    if kind is None or len(parts) not in (2, 3) or not all(parts):
        raise ToolError(f"{text!r}: expected KIND/NAMESPACE/NAME (or KIND/NAME for Node and FelixConfiguration); "
                        f"kinds: {', '.join(events.KUBE_KINDS)}")
    return (kind, "", parts[1]) if len(parts) == 2 else (kind, parts[1], parts[2])


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """What changed between two versions of an object, one line per field. Pure."""
    old = flatten(before or {})
    new = flatten(after or {})
    lines = []
    for path in sorted(set(old) | set(new)):
        if path.startswith(IGNORED):
            continue
        if path not in new:
            lines.append(f"- {path}: {json.dumps(old[path])}")
        elif path not in old:
            lines.append(f"+ {path}: {json.dumps(new[path])}")
        elif old[path] != new[path]:
            lines.append(f"~ {path}: {json.dumps(old[path])} -> {json.dumps(new[path])}")
    return lines


async def history(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    kind, namespace, name = parse_object(args.object)
    subject = topology.kube_object_subject(kind, namespace, name)
    async with open_log(args) as js:
        changes_seen = await read_all(js, bus.LogReader(topology.KUBE_STREAM), subject)
        caused = caused_by(await read_all(js, plan_source(args))) if changes_seen else {}
    label = f"{kind} {events.object_key(namespace, name)}"
    if not changes_seen:
        print(f"{label}: no recorded change (subject {subject})", file=out)
        return 1
    if not args.json:
        print(f"{label}: {len(changes_seen)} recorded changes", file=out)
    previous: dict[str, Any] | None = None
    for entry in changes_seen:
        record = entry.envelope.record if entry.envelope is not None else None
        if not isinstance(record, events.KubeEvent):
            # garbage or another record type on an object subject: shown, never a crash
            what = type(record).__name__ if record is not None else "not a kipvs envelope"
            print(f"KUBE #{entry.seq} unreadable record skipped ({what})", file=out)
            continue
        after = None if record.action == "DELETED" else record.object
        deltas = caused.get(entry.envelope.id, [])
        if args.json:
            print(records.as_json(entry), file=out)
            for delta in deltas:
                print(records.as_json(delta), file=out)
        else:
            print(records.one_line(entry), file=out)
            for line in changes(previous, after):
                print(f"      {line}", file=out)
            for delta in deltas:
                print(f"   -> {records.one_line(delta)}", file=out)
            if not deltas:
                print("   -> no plan change", file=out)
        previous = after
    return 0


def caused_by(plan: list[Entry]) -> dict[str, list[Entry]]:
    """Kube event id -> the plan deltas computed from it."""
    index: dict[str, list[Entry]] = {}
    for entry in plan:
        if entry.envelope is not None and isinstance(entry.envelope.record, events.PlanDelta):
            for cause in entry.envelope.causation:
                index.setdefault(cause, []).append(entry)
    return index


def run(args: argparse.Namespace) -> int:
    return run_tool("history", lambda: history(args))
