"""Log records for people: one readable line per record, and the filters the tools share. Pure."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from shared.contract import events, topology
from shared.tools.log_client import Entry, clock

_KINDS = {k.lower() for k in events.KUBE_KINDS}
STREAM_LABEL = {topology.KUBE_STREAM: "KUBE", topology.PLAN_STREAM: "PLAN", topology.STATUS_STREAM: "STATUS",
                topology.PARKED_STREAM: "PARKED"}


def describe_op(op: events.PlanOp) -> str:
    if isinstance(op, events.SetService):
        s = op.service
        vips = [*s.cluster_ips, *s.external_ips, *s.load_balancer_ips]
        ports = ", ".join(f"{p.protocol.lower()}/{p.port}" + (f" nodePort {p.node_port}" if p.node_port else "")
                          + f" -> {len(p.endpoints)} endpoints" for p in s.ports)
        return f"set-service {s.key} [{' '.join(vips)}] {ports or 'no ports'}"
    if isinstance(op, events.RemoveService):
        return f"remove-service {op.key}"
    if isinstance(op, events.SetNode):
        return f"set-node {op.node.name} [{' '.join(op.node.addresses)}]"
    if isinstance(op, events.RemoveNode):
        return f"remove-node {op.name}"
    if isinstance(op, events.SetWarning):
        return f"set-warning {op.warning.code} {op.warning.object}: {op.warning.message}"
    if isinstance(op, events.ClearWarning):
        return f"clear-warning {op.id}"
    marked = sum(1 for m in op.endpoint_marks.values() if m)
    unmarked = f" ({len(op.unmarked)} endpoints without a mark)" if op.unmarked else ""
    ranges = ",".join(f"{lo}-{hi}" for lo, hi in op.nodeport_ranges)
    extra = (" calico-node" if op.calico_node else "") + (" bpf-dataplane" if op.bpf_enabled else "")
    warnings = "".join(f", WARNING {w.code} {w.object}: {w.message}" for w in sorted(op.warnings, key=lambda w: w.id))
    return f"set-node-calico {op.node}: {marked} endpoint marks{unmarked}, node ports {ranges}{extra}{warnings}"


@dataclass(frozen=True)
class Stored(Entry):
    """An entry with the time the server stored it (JetStream metadata): the only time a message has that is
    not a kipvs envelope (parked bytes, an undecodable record)."""

    stored_ns: int = 0


RAW_SHOWN = 1000  # bytes of a parked payload on its one line (--json has them all)


def escaped(raw: bytes, limit: int = RAW_SHOWN) -> str:
    """Bytes as Python writes them (``b'{"id": \\xff...'``): every byte faithfully, printable on one line."""
    if len(raw) <= limit:
        return repr(raw)
    return f"{raw[:limit]!r}... ({len(raw)} bytes, the first {limit} shown; --json has them all)"


def _unenveloped(label: str, entry: Entry) -> str:
    """``PARKED #3 2026-11-24T18:00:01.123Z kipvs.parked.planner: reason (KIPVS_KUBE #12 ..., parked by
    planner): b'...'``"""
    headers = entry.headers or {}
    stored = getattr(entry, "stored_ns", 0)
    when = clock(stored) if stored else "(time not recorded)"
    reason = headers.get(topology.PARK_REASON) or "not a kipvs envelope"
    origin = []
    if headers.get(topology.PARK_STREAM):
        origin.append(f"{headers[topology.PARK_STREAM]} #{headers.get(topology.PARK_SEQUENCE, '?')} "
                      f"{headers.get(topology.PARK_SUBJECT, '')}".rstrip())
    if headers.get(topology.PARK_SERVICE):
        origin.append(f"parked by {headers[topology.PARK_SERVICE]}")
    where = f" ({', '.join(origin)})" if origin else ""
    return f"{label} {when} {entry.subject}: {reason}{where}: {escaped(entry.raw)}"


def one_line(entry: Entry) -> str:
    """``KUBE #12 2026-11-24T18:00:01.123Z watch MODIFIED EndpointSlice default/web-abc rv=123``"""
    label = f"{STREAM_LABEL.get(entry.stream, entry.stream)} #{entry.seq}"
    env = entry.envelope
    if env is None:
        return _unenveloped(label, entry)
    r = env.record
    head = f"{label} {clock(env.time_ns)}"
    if isinstance(r, events.KubeEvent):
        return f"{head} {r.origin} {r.action} {r.kind} {events.object_key(r.namespace, r.name)} rv={r.resource_version}"
    if isinstance(r, (events.KubeResync, events.KubeResyncRange)):
        part = f" keys [{r.key_from!r}, {r.key_to!r})" if isinstance(r, events.KubeResyncRange) else ""
        restored = " (after a restored API server)" if r.restored else ""
        return f"{head} resync {r.kind} rv={r.resource_version}{part}: {len(r.live)} live{restored}"
    if isinstance(r, events.PlanDelta):
        where = "all nodes" if r.scope == "all" else f"node {r.scope}"
        ops = "; ".join(describe_op(op) for op in r.ops)
        return f"{head} delta {where} seq={r.seq} (from KUBE #{r.source_seq}): {ops}"
    if isinstance(r, events.PlanDeltaChunk):
        where = "all nodes" if r.scope == "all" else f"node {r.scope}"
        return (f"{head} delta {where} seq={r.seq} part {r.part} of {r.parts} ({len(r.data)} bytes), not put "
                "together: the delta's other parts are missing, out of order, or not in the log yet")
    if isinstance(r, events.PlanSnapshot):
        return f"{head} snapshot {r.scope} seq={r.seq}: {len(r.services)} services, {len(r.nodes)} nodes"
    if isinstance(r, events.ApplyReport):
        errors = f", errors: {'; '.join(r.errors)}" if r.errors else ""
        if r.bootstrap:  # the whole plan programmed at the applier's start: no batch, no duration
            return f"{head} {r.node} started at plan seq={r.plan_seq}: {r.operations} kernel ops to reach it{errors}"
        return f"{head} {r.node} applied plan seq={r.plan_seq}: {r.operations} kernel ops in {r.duration_ms} ms{errors}"
    if isinstance(r, events.DriftReport):
        found = "; ".join(r.found) if r.found else "nothing"
        return f"{head} {r.node} drift check at plan seq={r.plan_seq}: found {found}"
    if isinstance(r, events.ShadowReport):
        found = "; ".join(r.divergences) if r.divergences else "none"
        return (f"{head} {r.node} shadow comparison at plan seq={r.plan_seq} ({r.virtual_servers} virtual "
                f"servers in the kernel): {r.divergences_total} divergences: {found}")
    conflicts = f", CONFLICTS: {'; '.join(r.conflicts)}" if r.conflicts else ""
    return (f"{head} {r.node} facts: IPVS {'yes' if r.ipvs_available else 'NO'}, kube-ipvs0 {r.kube_ipvs0}, "
            f"endpoint marks {r.endpoint_marks} ({r.endpoint_marks_reason}){conflicts}")


def as_json(entry: Entry) -> str:
    """The JSON-lines form: stream, seq, subject and the envelope; or, for a message that is not an envelope
    (parked), the time the server stored it, its reason and headers, and its bytes: ``data_base64`` always
    (exact), ``data`` as well when they are UTF-8 text (then exact too: never a lossy decoding)."""
    doc: dict[str, Any] = {"stream": entry.stream, "seq": entry.seq, "subject": entry.subject}
    if entry.envelope is not None:
        doc["envelope"] = json.loads(events.to_json(entry.envelope))
    else:
        stored = getattr(entry, "stored_ns", 0)
        if stored:
            doc["time"] = clock(stored)
        doc["reason"] = (entry.headers or {}).get(topology.PARK_REASON, "")
        if entry.headers:
            doc["headers"] = dict(sorted(entry.headers.items()))
        with contextlib.suppress(UnicodeDecodeError):
            doc["data"] = entry.raw.decode("utf-8")
        doc["data_base64"] = base64.b64encode(entry.raw).decode("ascii")
    return json.dumps(doc, separators=(",", ":"))


def _ip_in(ip: str, values: list[Any]) -> bool:
    return any(isinstance(v, str) and v == ip for v in values)


def _service_vips(obj: dict[str, Any]) -> list[str]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    ingress = ((status.get("loadBalancer") or {}).get("ingress") or []) if isinstance(status, dict) else []
    return [*(spec.get("clusterIPs") or []), spec.get("clusterIP"), *(spec.get("externalIPs") or []),
            *(i.get("ip") for i in ingress if isinstance(i, dict))]


def _names_node(r: events.KubeEvent, node: str) -> bool:
    if r.kind == "Node":
        return r.name == node
    if r.kind == "Pod":
        return (r.object.get("spec") or {}).get("nodeName") == node
    if r.kind == "EndpointSlice":
        return any(isinstance(e, dict) and e.get("nodeName") == node for e in r.object.get("endpoints") or [])
    if r.kind == "FelixConfiguration":
        return r.name in ("default", f"node.{node}")
    return False


@dataclass
class Filter:
    """What ``kipvs tap`` keeps. Stateful only for VIPs: a Service seen with the VIP is followed to its removal."""

    node: str = ""
    object: str = ""  # KIND/NAMESPACE/NAME, NAMESPACE/NAME, or KIND/NAME for cluster-scoped kinds
    vip: str = ""  # IP or IP:PORT ([v6]:PORT)
    _vip_services: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.vip:
            ip, port = split_vip(self.vip)
            self._ip, self._port = ip, port

    def keep(self, entry: Entry) -> bool:
        env = entry.envelope
        if env is None:
            return not (self.node or self.object or self.vip)
        r = env.record
        return all(check(entry, r) for check, wanted in ((self._node, self.node), (self._object, self.object),
                                                          (self._vip, self.vip)) if wanted)

    def _node(self, entry: Entry, r: events.Record) -> bool:
        if isinstance(r, events.KubeEvent):
            return _names_node(r, self.node)
        if isinstance(r, events.PlanDelta | events.PlanDeltaChunk | events.PlanSnapshot):
            return r.scope in ("all", self.node)
        if isinstance(r, events.ApplyReport | events.DriftReport | events.NodeFactsReport | events.ShadowReport):
            return r.node == self.node
        return False

    def _object(self, entry: Entry, r: events.Record) -> bool:
        parts = self.object.split("/")
        if isinstance(r, events.KubeEvent):
            key = events.object_key(r.namespace, r.name)
            if len(parts) == 3:
                return parts[0].lower() == r.kind.lower() and "/".join(parts[1:]) == key
            if len(parts) == 2 and parts[0].lower() == r.kind.lower() and not r.namespace:
                return parts[1] == r.name
            return self.object == key
        if isinstance(r, events.PlanDelta):
            kind_given = len(parts) == 3 or (len(parts) == 2 and parts[0].lower() in _KINDS)
            key = "/".join(parts[1:]) if kind_given else self.object
            return any(_op_key(op) == key for op in r.ops)
        return False

    def _vip(self, entry: Entry, r: events.Record) -> bool:
        if isinstance(r, events.KubeEvent):
            return r.kind == "Service" and _ip_in(self._ip, _service_vips(r.object))
        if isinstance(r, events.PlanDelta):
            hit = False
            for op in r.ops:
                if isinstance(op, events.SetService):
                    s = op.service
                    has = self._ip in (*s.cluster_ips, *s.external_ips, *s.load_balancer_ips) and (
                        not self._port or any(p.port == self._port or p.node_port == self._port for p in s.ports))
                    if has:
                        self._vip_services.add(s.key)
                    elif s.key in self._vip_services:
                        self._vip_services.discard(s.key)
                        has = True  # the VIP left this Service: part of its story
                    hit |= has
                elif isinstance(op, events.RemoveService) and op.key in self._vip_services:
                    self._vip_services.discard(op.key)
                    hit = True
            return hit
        return False


def _op_key(op: events.PlanOp) -> str:
    if isinstance(op, events.SetService):
        return op.service.key
    if isinstance(op, events.RemoveService):
        return op.key
    if isinstance(op, events.SetWarning):
        return op.warning.object
    if isinstance(op, events.SetNode):
        return op.node.name
    if isinstance(op, events.RemoveNode):
        return op.name
    return ""


def split_vip(text: str) -> tuple[str, int]:
    """``10.96.0.10``, ``10.96.0.10:80``, ``[fd00::a]:80``, ``fd00::a`` -> (ip, port or 0)."""
    text = text.strip()
    if text.startswith("["):
        ip, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        ip, port = text.split(":")
    else:
        ip, port = text, ""
    try:
        ipaddress.ip_address(ip)
        return ip, int(port) if port else 0
    except ValueError:
        raise ValueError(f"{text!r} is not IP, IP:PORT or [IPv6]:PORT") from None
