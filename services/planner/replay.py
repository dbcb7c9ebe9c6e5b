"""``kipvs plan``: replay Kubernetes watch events through the planner's core and print a node's state.

Input: JSON lines in the Kubernetes watch wire format ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object":
{...}}`` (what ``kipvs watcher --record`` writes), applied in order. The same core as the service, not a
copy: each line becomes the KubeEvent record the watcher would have logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO

from kipvs.shared import events

from .core import Planner, PlannerConfig
from .render import ipvsadm, json_text
from .resolve import resolve_node

KINDS = set(events.KUBE_KINDS)


class ReplayError(Exception):
    pass


def read_events(lines: Iterable[str], source: str = "-") -> Iterator[events.Envelope]:
    """Watch-format lines as envelopes. Unreadable lines raise ReplayError naming the line; objects of kinds
    kipvs does not watch are skipped (they cannot matter to the plan)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{where}: not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("type") not in ("ADDED", "MODIFIED", "DELETED") \
                or not isinstance(doc.get("object"), dict):
            raise ReplayError(f'{where}: not a watch event ({{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}})')
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
    parser.add_argument("--events", required=True, metavar="FILE", help="watch-format JSON lines; - for stdin")
    parser.add_argument("--node", required=True, help="the node whose state to print")
    parser.add_argument("--format", choices=("ipvsadm", "json"), default="ipvsadm")
    parser.add_argument("--scheduler", default="rr", help="cluster default IPVS scheduler")


def run(args: argparse.Namespace) -> int:
    try:
        config = PlannerConfig(default_scheduler=args.scheduler)
        stream: IO[str] = sys.stdin if args.events == "-" else open(args.events, encoding="utf-8")  # noqa: SIM115
    except (ValueError, OSError) as exc:
        print(f"kipvs plan: {exc}", file=sys.stderr)
        return 2
    try:
        planner = plan_events(read_events(stream, args.events), config)
    except ReplayError as exc:
        print(f"kipvs plan: {exc}", file=sys.stderr)
        return 2
    finally:
        if stream is not sys.stdin:
            stream.close()
    state = resolve_node(planner.plans.values(), planner.nodes.get(args.node))
    if args.node not in planner.nodes:
        print(f"kipvs plan: note: no Node {args.node!r} in the events; node-specific state (NodePorts, Local "
              "policies, topology) is resolved as for an unknown node", file=sys.stderr)
    if args.format == "ipvsadm":
        out = ipvsadm(state)
    else:
        out = json_text(state, planner.warnings.values(), args.node, planner.node_calico(args.node))
    sys.stdout.write(out)
    return 0
