"""``kipvs why --node NODE VIP:PORT[/PROTO]``: why a node forwards a virtual service, and to whom.

It replays the shared plan deltas, resolving the node after each one (the applier's own function), and
records when the virtual service appeared and when each of its real servers did; each of those deltas
names the Kubernetes event it was computed from (its causation), and the node's apply reports say when
the node had it in its kernel.

    kipvs why --node node-a 10.96.0.10:80
    kipvs why --node node-b 192.0.2.12:30080/TCP       # a NodePort on that node's address
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from shared.contract import events, topology
from shared.messaging import bus
from shared.plan.node_state import RealKey, VirtualService, VSKey
from shared.plan.plan_state import SharedPlan
from shared.plan.resolve import resolve_service
from shared.tools import records
from shared.tools.log_client import Entry, ToolError, add_nats_arguments, open_log, plan_source, read_all, run_tool

PROTOCOLS = ("TCP", "UDP", "SCTP")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_nats_arguments(parser)
    parser.add_argument("--node", required=True, help="the node")
    parser.add_argument("vip", metavar="VIP:PORT[/PROTO]", help="e.g. 10.96.0.10:80, [fd00::a]:53/UDP")
    parser.add_argument("--json", action="store_true", help="one JSON document")


def parse_target(text: str) -> VSKey:
    address, _, protocol = text.partition("/")
    protocol = (protocol or "TCP").upper()
    if protocol not in PROTOCOLS:
        raise ToolError(f"{text!r}: protocol must be one of {', '.join(PROTOCOLS)}")
    try:
        ip, port = records.split_vip(address)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    if not port:
        raise ToolError(f"{text!r}: give the port (VIP:PORT)")
    return (protocol, ip, port)


@dataclass
class Step:
    """One plan delta that changed the virtual service on the node."""

    delta: Entry
    what: list[str]


@dataclass
class Story:
    key: VSKey
    node: str
    current: VirtualService | None = None
    service: str = ""
    since: Entry | None = None  # the delta that (last) created the virtual service
    real_since: dict[RealKey, Entry] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)


def provenance(plan: list[Entry], node: str, key: VSKey) -> Story:
    """Replay the shared deltas and follow ``key`` on ``node``. Pure."""
    shared = SharedPlan()
    story = Story(key, node)
    for entry in plan:
        env = entry.envelope
        if env is None or not isinstance(env.record, events.PlanDelta) or env.record.scope != "all":
            continue
        delta = env.record
        facts_before = shared.nodes.get(node)
        if not shared.apply(delta):
            continue
        touched = {op.service.key if isinstance(op, events.SetService) else op.key
                   for op in delta.ops if isinstance(op, events.SetService | events.RemoveService)}
        if shared.nodes.get(node) != facts_before:
            touched = set(shared.services) | ({story.service} if story.service else set())
        if not touched:
            continue
        found, holder = _find(shared, touched, node, key, story.service)
        before = story.current
        _record(story, entry, before, found)
        story.current, story.service = found, holder if found else ""
    return story


def _find(shared: SharedPlan, touched: set[str], node: str, key: VSKey, holder: str
          ) -> tuple[VirtualService | None, str]:
    """The virtual service ``key`` after a delta: the current holder keeps it unless it let it go."""
    candidates = sorted(touched | ({holder} if holder else set()), key=lambda k: (k != holder, k))
    facts = shared.nodes.get(node)
    for service_key in candidates:
        plan = shared.services.get(service_key)
        if plan is None:
            continue
        for vs in resolve_service(plan, facts).virtual_services:
            if vs.key == key:
                return vs, service_key
    return None, ""


def _record(story: Story, entry: Entry, before: VirtualService | None, after: VirtualService | None) -> None:
    what: list[str] = []
    if before is None and after is not None:
        story.since = entry
        story.real_since = {}
        what.append(f"virtual service added ({after.service}, scheduler {after.scheduler})")
    elif before is not None and after is None:
        what.append("virtual service removed")
        story.since, story.real_since = None, {}
    elif before is not None and after is not None and (before.scheduler, before.persistence_timeout) != (
            after.scheduler, after.persistence_timeout):
        what.append(f"scheduler {before.scheduler} -> {after.scheduler}, persistence "
                    f"{before.persistence_timeout}s -> {after.persistence_timeout}s")
    old = before.reals if before else {}
    new = after.reals if after else {}
    for real in sorted(set(new) - set(old)):
        story.real_since[real] = entry
        what.append(f"real server {_addr(real)} added (weight {new[real]})")
    for real in sorted(set(old) - set(new)):
        story.real_since.pop(real, None)
        what.append(f"real server {_addr(real)} removed")
    for real in sorted(set(old) & set(new)):
        if old[real] != new[real]:
            what.append(f"real server {_addr(real)} weight {old[real]} -> {new[real]}")
    if what:
        story.steps.append(Step(entry, what))


def _addr(real: RealKey) -> str:
    ip, port = real
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def applied_at(reports: list[Entry], delta_seq: int) -> Entry | None:
    """The node's first apply report that covers shared delta ``delta_seq``."""
    for entry in reports:
        record = entry.envelope.record if entry.envelope else None
        if isinstance(record, events.ApplyReport) and record.plan_seq >= delta_seq:
            return entry
    return None


class Explainer:
    def __init__(self, kube: list[Entry], reports: list[Entry]) -> None:
        self.by_id = {e.envelope.id: e for e in kube if e.envelope is not None}
        self.reports = reports

    def cause(self, delta: Entry) -> Entry | None:
        assert delta.envelope is not None
        return next((self.by_id[c] for c in delta.envelope.causation if c in self.by_id), None)

    def explain(self, delta: Entry) -> dict:
        assert delta.envelope is not None and isinstance(delta.envelope.record, events.PlanDelta)
        cause = self.cause(delta)
        applied = applied_at(self.reports, delta.envelope.record.seq)
        out = {"delta": records.one_line(delta), "cause": records.one_line(cause) if cause else None,
               "applied": records.one_line(applied) if applied else None, "latency_ms": None,
               "at_node_start": False}
        if cause is not None and applied is not None and cause.envelope and applied.envelope:
            after_ms = round((applied.envelope.time_ns - cause.envelope.time_ns) / 1e6, 1)
            # A starting applier programs the whole plan at once: its report's time after the change is how
            # long the node was not running, not how long programming took (kube-proxy likewise leaves
            # changes older than its start out of network programming latency: pkg/proxy/
            # endpointschangetracker.go, EndpointSliceUpdate, trigger times before trackerStartTime).
            record = applied.envelope.record
            if isinstance(record, events.ApplyReport) and record.bootstrap:
                out["at_node_start"], out["after_ms"] = True, after_ms
            else:
                out["latency_ms"] = after_ms
        return out


def render(story: Story, explainer: Explainer) -> dict:
    protocol, ip, port = story.key
    target = f"{protocol} {_addr((ip, port))}"
    doc: dict = {"node": story.node, "virtual_service": target, "present": story.current is not None}
    if story.current is not None:
        vs = story.current
        doc.update(service=story.service, scheduler=vs.scheduler, persistence_timeout=vs.persistence_timeout)
        doc["since"] = explainer.explain(story.since) if story.since else None
        doc["real_servers"] = [{"address": _addr(real), "weight": weight,
                                "since": explainer.explain(story.real_since[real]) if real in story.real_since
                                else None} for real, weight in sorted(vs.reals.items())]
    doc["history"] = [{"what": step.what, **explainer.explain(step.delta)} for step in story.steps]
    return doc


def print_text(doc: dict, out) -> None:
    def cite(item: dict | None, indent: str) -> None:
        if item is None:
            return
        print(f"{indent}by    {item['delta']}", file=out)
        if item["cause"]:
            print(f"{indent}from  {item['cause']}", file=out)
        if item["applied"]:
            latency = "" if item["latency_ms"] is None else f" ({item['latency_ms']} ms after the Kubernetes change)"
            if item.get("at_node_start"):
                latency = (f" (when the node's applier started, {item['after_ms']} ms after the Kubernetes change: "
                           "start-up wait, not programming latency)")
            print(f"{indent}applied {item['applied']}{latency}", file=out)
        else:
            print(f"{indent}applied: no apply report from {doc['node']} covers it yet", file=out)

    if not doc["present"]:
        print(f"{doc['node']} does not forward {doc['virtual_service']} (according to the plan log)", file=out)
    else:
        persistence = f", persistence {doc['persistence_timeout']}s" if doc["persistence_timeout"] else ""
        print(f"{doc['node']} forwards {doc['virtual_service']} for Service {doc['service']} "
              f"(scheduler {doc['scheduler']}{persistence})", file=out)
        cite(doc["since"], "  ")
        print(f"  real servers ({len(doc['real_servers'])}):", file=out)
        for real in doc["real_servers"]:
            print(f"    {real['address']} weight {real['weight']}", file=out)
            cite(real["since"], "      ")
    if doc["history"]:
        print("  history of this virtual service on the node:", file=out)
        for step in doc["history"]:
            print(f"    {'; '.join(step['what'])}", file=out)
            cite(step, "      ")


def node_in_log(node: str, kube: list[Entry], plan: list[Entry]) -> bool:
    """Whether the log has ``node``'s Node object (even a deleted one) or the plan's facts of it."""
    for entry in kube:
        r = entry.envelope.record if entry.envelope else None
        if isinstance(r, events.KubeEvent) and r.kind == "Node" and r.name == node:
            return True
    for entry in plan:
        r = entry.envelope.record if entry.envelope else None
        if isinstance(r, events.PlanDelta) and any(isinstance(op, events.SetNode) and op.node.name == node
                                                   for op in r.ops):
            return True
        if isinstance(r, events.PlanSnapshot) and node in {n.name for n in r.nodes}:
            return True
    return False


async def why(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    key = parse_target(args.vip)
    try:
        applied = topology.status_subject(args.node, "applied")
    except ValueError as exc:
        raise ToolError(f"--node: {exc}") from None
    kube_log, status_log = bus.LogReader(topology.KUBE_STREAM), bus.LogReader(topology.STATUS_STREAM)
    async with open_log(args) as js:
        plan = await read_all(js, plan_source(args), topology.PLAN_ALL_SUBJECT)
        kube = await read_all(js, kube_log)
        reports = await read_all(js, status_log, applied)
        # a node the log does not know: no Node object, no plan facts, no report of any kind from it
        known = bool(reports) or node_in_log(args.node, kube, plan) or bool(
            await read_all(js, status_log, topology.status_subject(args.node, ">")))
    if not known:
        message = f"unknown node {args.node!r}: no Node object in the log and no reports from it"
        if args.json:
            print(json.dumps({"node": args.node, "known_node": False, "present": False, "error": message},
                             indent=2), file=out)
        else:
            print(f"kipvs why: {message}", file=out)
        return 1
    story = provenance(plan, args.node, key)
    doc = render(story, Explainer(kube, reports))
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        print_text(doc, out)
    return 0 if story.current is not None else 1


def run(args: argparse.Namespace) -> int:
    return run_tool("why", lambda: why(args))

