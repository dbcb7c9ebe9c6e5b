"""A node's state for people and tools: ``ipvsadm -S -n`` syntax, or JSON (the documented schema)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.contract.events import PlanWarning, SetNodeCalico
from shared.plan.ipvs_flags import sched_flag_names, service_flags
from shared.plan.node_state import NodeState, VirtualService, sort_key_ip

_PROTOCOL_FLAG = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _vs_order(vs: VirtualService) -> tuple[Any, ...]:
    return (vs.protocol, sort_key_ip(vs.ip), vs.port)


def _reals(vs: VirtualService) -> list[tuple[tuple[str, int], int]]:
    return sorted(vs.reals.items(), key=lambda r: (sort_key_ip(r[0][0]), r[0][1]))


def ipvsadm(state: NodeState) -> str:
    """The IPVS table as ``ipvsadm -S -n`` writes it, sorted: services by protocol, address, port; each
    followed by its real servers by address and port. Masquerade forwarding (-m) throughout; the scheduler
    flags the applier programs (``-b mh-port``), so ``ipvsadm -R`` of it reproduces the kernel."""
    lines = []
    for vs in sorted(state.ipvs.values(), key=_vs_order):
        flag = _PROTOCOL_FLAG[vs.protocol]
        head = f"-A {flag} {_hostport(vs.ip, vs.port)} -s {vs.scheduler}"
        if vs.persistence_timeout:
            head += f" -p {vs.persistence_timeout}"
        sched_flags = sched_flag_names(vs.scheduler, service_flags(vs.scheduler, vs.persistence_timeout))
        if sched_flags:  # as the applier programs them (ipvsadm -Sn prints -b after -p)
            head += " -b " + ",".join(sched_flags)
        lines.append(head)
        for (ip, port), weight in _reals(vs):
            lines.append(f"-a {flag} {_hostport(vs.ip, vs.port)} -r {_hostport(ip, port)} -m -w {weight}")
    return "\n".join(lines) + ("\n" if lines else "")


def node_warnings(warnings: Iterable[PlanWarning], calico: SetNodeCalico | None = None) -> list[PlanWarning]:
    """The warnings that concern a node: the shared plan's and the node's own Calico ones, sorted by id."""
    return sorted([*warnings, *(calico.warnings if calico is not None else ())], key=lambda w: w.id)


def warning_line(w: PlanWarning) -> str:
    """One warning as one line: ``endpoint-marks-exhausted Node node-a: 2 pods on node-a have no ...``. A
    message that already starts with the object (``Service default/web skipped: ...``) is not prefixed
    with it again."""
    named = f"{w.kind} {w.object}"
    if w.message.startswith((f"{named}:", f"{named} ")):
        return f"{w.code} {w.message}".replace("\n", " ")
    return f"{w.code} {named}: {w.message}".replace("\n", " ")


def as_json(state: NodeState, warnings: Iterable[PlanWarning], node: str,
            calico: SetNodeCalico | None = None) -> dict[str, Any]:
    """The documented JSON form (docs/plan-format.md)."""
    warnings = node_warnings(warnings, calico)
    doc = {
        "node": node,
        "ipvs": [{
            "protocol": vs.protocol, "address": vs.ip, "port": vs.port, "scheduler": vs.scheduler,
            "persistence_timeout": vs.persistence_timeout, "service": vs.service,
            "real_servers": [{"address": ip, "port": port, "weight": w, "forward": "masq"}
                             for (ip, port), w in _reals(vs)],
        } for vs in sorted(state.ipvs.values(), key=_vs_order)],
        "addresses": sorted(state.addresses, key=sort_key_ip),
        "ipsets": {name: sorted(entries) for name, entries in sorted(state.ipsets.items())},
        "warnings": [{"kind": w.kind, "object": w.object, "code": w.code, "message": w.message}
                     for w in warnings],
    }
    if calico is not None:
        lay = calico.layout
        doc["endpoint_marks"] = dict(sorted(calico.endpoint_marks.items()))
        doc["mark_layout"] = {"accept": lay.accept, "pass": lay.pass_, "drop": lay.drop, "scratch0": lay.scratch0,
                              "scratch1": lay.scratch1, "wireguard": lay.wireguard,
                              "endpoint_mask": lay.endpoint_mask, "non_calico": lay.non_calico}
        doc["nodeport_ranges"] = [list(r) for r in calico.nodeport_ranges]
        doc["calico_node"] = calico.calico_node
        doc["bpf_enabled"] = calico.bpf_enabled
    return doc


def json_text(state: NodeState, warnings: Iterable[PlanWarning], node: str,
              calico: SetNodeCalico | None = None) -> str:
    return json.dumps(as_json(state, warnings, node, calico), indent=2) + "\n"
