"""Calico's endpoint marks in kipvs's nftables table, for nodes where no Felix writes them (``enforce``).

Why (docs/calico.md): a packet to an IPVS VIP or a node port is delivered to the node (filter INPUT), IPVS
rewrites it and sends it out (filter OUTPUT), so it never crosses FORWARD and OUTPUT cannot see the
interface it came in on. Felix therefore marks it on INPUT with its source endpoint's mark (bits within
the endpoint mask) and reads that mark on OUTPUT to apply the endpoint's egress policy. kipvs writes the
same marks with the same meaning:

- INPUT (priority filter - 1, before any policy): a new connection to a VIP on kube-ipvs0, or tcp/udp to a
  local address on a port in ``kubeNodePortRanges``, has its endpoint-mask bits cleared, then gets the
  mark of its workload interface (``cali...``) or, from any other interface, the non-Calico mark. A
  workload interface without a mark (positions exhausted, or not planned yet) is counted, not marked;
- OUTPUT (priority filter + 10, after policies at the standard priority have read it): the endpoint-mask
  bits are cleared, so the mark never leaves the node.

The interface -> mark lookup is one verdict map (``endpoint_dispatch``) whose elements ``goto`` one chain
per mark value (``em_<mark>``), the nftables form of Felix's ``cali-set-endpoint-mark`` dispatch: O(1)
per packet, and a pod change is a few element and chain changes in one transaction.

Pure: text in, text out. :class:`~services.applier.kernel.rules.NftRules` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.contract.events import SetNodeCalico

TABLE = "kipvs"
WORKLOAD_PREFIX = "cali"  # Calico's CNI names host-side workload interfaces cali + 11 hex characters

Mode = Literal["enforce", "observe", "off"]


@dataclass(frozen=True)
class EndpointMarks:
    """What the rules need from the node's Calico state."""

    endpoint_mask: int
    non_calico: int
    nodeport_ranges: tuple[tuple[int, int], ...]
    marks: dict[str, int] = field(default_factory=dict)  # interface -> mark

    @classmethod
    def from_plan(cls, state: SetNodeCalico) -> EndpointMarks:
        return cls(endpoint_mask=state.layout.endpoint_mask, non_calico=state.layout.non_calico,
                   nodeport_ranges=tuple(state.nodeport_ranges),
                   marks={iface: mark for iface, mark in state.endpoint_marks.items() if mark})

    def same_frame(self, other: EndpointMarks | None) -> bool:
        """Whether only the endpoints differ (so element changes suffice, no table rewrite)."""
        return other is not None and (self.endpoint_mask, self.non_calico, self.nodeport_ranges) == (
            other.endpoint_mask, other.non_calico, other.nodeport_ranges)


def resolve_mode(flag: Literal["auto", "observe", "enforce"], state: SetNodeCalico | None,
                 rules_enabled: bool) -> tuple[Mode, str]:
    """The endpoint-mark mode in effect on this node, and why."""
    if state is None:
        return "off", "the planner has published no Calico state for this node yet"
    if state.bpf_enabled:
        return "off", "Calico's eBPF dataplane is on for this node (bpfEnabled): it has no IPVS support"
    if not rules_enabled:
        return "observe", "--rules none: kipvs writes no packet rules on this node"
    if flag == "enforce":
        return "enforce", "--endpoint-marks enforce"
    if flag == "observe":
        return "observe", "--endpoint-marks observe"
    if state.calico_node:
        return "observe", "auto: a calico-node pod runs on this node, so Felix writes the marking rules"
    return "enforce", "auto: no calico-node pod runs on this node, so kipvs writes the marking rules"


def _clear(mask: int) -> str:
    return f"{~mask & 0xFFFFFFFF:#010x}"


MARK_CHAIN_PREFIX = "em_"  # one chain per mark value: em_<mark in hex>


def _mark_chain(mark: int) -> str:
    return f"{MARK_CHAIN_PREFIX}{mark:08x}"


def _mark_chain_body(marks: EndpointMarks, mark: int) -> str:
    return f"meta mark set meta mark & {_clear(marks.endpoint_mask)} | {mark:#010x}"


def _element(iface: str, mark: int) -> str:
    return f'"{iface}" : goto {_mark_chain(mark)}'


def definitions(marks: EndpointMarks, ipvs_ips: tuple[str, str]) -> list[str]:
    """The endpoint-mark part of the table (inside ``table inet kipvs { ... }``). ``ipvs_ips`` names the
    nft sets of the addresses on kube-ipvs0 (IPv4, IPv6)."""
    ranges = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in marks.nodeport_ranges)
    lines = [f"  set nodeport_ranges {{ type inet_service; flags interval;"
             f"{f' elements = {{ {ranges} }};' if ranges else ''} }}"]
    for mark in sorted(set(marks.marks.values())):
        lines.append(f"  chain {_mark_chain(mark)} {{ {_mark_chain_body(marks, mark)}; }}")
    elements = ", ".join(_element(i, m) for i, m in sorted(marks.marks.items()))
    body = f" elements = {{ {elements} }};" if elements else ""
    lines.append(f"  map endpoint_dispatch {{ type ifname : verdict;{body} }}")
    lines += [
        "  counter unmarked_workload_packets {}",
        "  chain set_endpoint_mark {",
        f"    meta mark set meta mark & {_clear(marks.endpoint_mask)}",
        "    iifname vmap @endpoint_dispatch",
        f'    iifname "{WORKLOAD_PREFIX}*" counter name unmarked_workload_packets return',
        f"    meta mark set meta mark & {_clear(marks.endpoint_mask)} | {marks.non_calico:#010x}",
        "  }",
        "  chain endpoint_mark_input {",
        "    type filter hook input priority filter - 1; policy accept;",
        "    ct state established,related return",
        f"    ip daddr @{ipvs_ips[0]} goto set_endpoint_mark",
        f"    ip6 daddr @{ipvs_ips[1]} goto set_endpoint_mark",
        "    meta l4proto { tcp, udp } th dport @nodeport_ranges fib daddr type local goto set_endpoint_mark",
        "  }",
        "  chain endpoint_mark_output {",
        "    type filter hook output priority filter + 10; policy accept;",
        f"    meta mark & {marks.endpoint_mask:#010x} != 0 meta mark set meta mark & {_clear(marks.endpoint_mask)}",
        "  }",
    ]
    return lines


def changes(before: EndpointMarks, after: EndpointMarks) -> str:
    """One transaction taking the endpoints of ``before`` to those of ``after`` (same frame)."""
    assert after.same_frame(before)
    gone = sorted(i for i, m in before.marks.items() if after.marks.get(i) != m)
    new = sorted(i for i, m in after.marks.items() if before.marks.get(i) != m)
    old_chains, new_chains = set(before.marks.values()), set(after.marks.values())
    lines = [f'delete element inet {TABLE} endpoint_dispatch {{ "{i}" }}' for i in gone]
    lines += [f"delete chain inet {TABLE} {_mark_chain(m)}" for m in sorted(old_chains - new_chains)]
    for mark in sorted(new_chains - old_chains):
        lines.append(f"add chain inet {TABLE} {_mark_chain(mark)}")
        lines.append(f"add rule inet {TABLE} {_mark_chain(mark)} {_mark_chain_body(after, mark)}")
    lines += [f"add element inet {TABLE} endpoint_dispatch {{ {_element(i, after.marks[i])} }}" for i in new]
    return "\n".join(lines) + ("\n" if lines else "")


def parse_dispatch(doc: dict) -> dict[str, int] | None:
    """The interface -> mark pairs of ``nft -j list table inet kipvs``; None when the map is absent."""
    found = None
    for item in doc.get("nftables", []):
        nft_map = item.get("map")
        if not nft_map or nft_map.get("name") != "endpoint_dispatch":
            continue
        found = {}
        for key, verdict in nft_map.get("elem", []):
            target = verdict.get("goto", {}).get("target", "") if isinstance(verdict, dict) else ""
            if target.startswith("em_"):
                found[key] = int(target.removeprefix("em_"), 16)
    return found
