"""Calico's side of IPVS mode, per node: which local workload endpoints exist, their marks, the node's
effective FelixConfiguration. Pure; part of the planner's replayable state, so marks are the same after any
restart and replay (Felix keeps them in memory only).

Local workload endpoints are Pods scheduled on the node that are not host-network and not finished.
Marks are allocated in the order endpoints first appear in the log (Felix's collision order); a change of
the mark layout (the mask in use, WireGuard, eBPF: see felix_config.py) re-allocates every live endpoint of
the node in that same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.contract.events import MarkLayoutRecord, PlanWarning, SetNodeCalico

from .endpoint_marks import MarkAllocator, interface_name
from .felix_config import FelixSettings, effective


@dataclass
class CalicoState:
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod key -> (node, interface)
    arrival: dict[str, list[str]] = field(default_factory=dict)  # node -> interfaces, first-seen order
    felix: dict[str, dict[str, Any]] = field(default_factory=dict)  # FelixConfiguration name -> spec
    settings: dict[str, FelixSettings] = field(default_factory=dict)  # node -> last valid settings
    config_problems: dict[str, list[str]] = field(default_factory=dict)
    allocators: dict[str, MarkAllocator] = field(default_factory=dict)
    calico_nodes: dict[str, str] = field(default_factory=dict)  # calico-node pod key -> its node
    _groups: dict[tuple[tuple[int, int], ...], list[str]] | None = None  # cache: node-port ranges -> nodes

    def nodes(self) -> set[str]:
        return set(self.arrival) | set(self.settings)

    # --- inputs -----------------------------------------------------------------------------------

    def on_pod(self, key: str, obj: dict[str, Any] | None) -> set[str]:
        """A Pod changed (None: deleted). Returns the nodes whose state may have changed."""
        before = self.endpoints.pop(key, None)
        after = _workload(key, obj) if obj is not None else None
        dirty = set()
        felix_before = self.calico_nodes.pop(key, None)
        felix_after = _calico_node(obj) if obj is not None else None
        if felix_after is not None:
            self.calico_nodes[key] = felix_after
        if felix_before != felix_after:
            dirty |= {n for n in (felix_before, felix_after) if n is not None}
            for node in dirty:
                self._allocator(node)  # a node known only by its calico-node pod still gets a state
        if before is not None and before != after:
            node, iface = before
            self._allocator(node).release(iface)
            if iface in self.arrival.get(node, []):
                self.arrival[node].remove(iface)
            dirty.add(node)
        if after is not None:
            self.endpoints[key] = after
            node, iface = after
            if iface not in self.arrival.setdefault(node, []):
                self.arrival[node].append(iface)
                self._allocator(node).mark(iface)
                dirty.add(node)
        return dirty

    def on_felix(self, name: str, spec: dict[str, Any] | None) -> set[str]:
        if spec is None:
            self.felix.pop(name, None)
        else:
            self.felix[name] = spec
        if name.startswith("node."):
            return {name.removeprefix("node.")}
        return self.nodes() if name == "default" else set()

    def ensure_node(self, node: str) -> None:
        self._allocator(node)

    # --- per node ---------------------------------------------------------------------------------

    def _allocator(self, node: str) -> MarkAllocator:
        settings, problems = effective(self.felix, node, self.settings.get(node))
        self.config_problems[node] = problems
        current = self.allocators.get(node)
        previous = self.settings.get(node)
        if previous is None or previous.kube_node_port_ranges != settings.kube_node_port_ranges:
            self._groups = None
        self.settings[node] = settings
        lay = settings.layout()  # valid: effective() keeps the last valid mark settings otherwise
        if current is None or current.layout != lay:
            current = MarkAllocator(lay)
            for iface in self.arrival.get(node, []):  # re-allocate deterministically, in arrival order
                current.mark(iface)
            self.allocators[node] = current
        return current

    def range_groups(self) -> dict[tuple[tuple[int, int], ...], list[str]]:
        """Nodes grouped by their effective node-port ranges (usually one group), cached."""
        if self._groups is None:
            groups: dict[tuple[tuple[int, int], ...], list[str]] = {}
            for node in sorted(self.settings):
                groups.setdefault(self.settings[node].kube_node_port_ranges, []).append(node)
            self._groups = groups
        return self._groups

    def state(self, node: str) -> SetNodeCalico:
        """The node's whole Calico state."""
        alloc = self._allocator(node)
        settings = self.settings[node]
        lay = alloc.layout
        warnings = [PlanWarning(id=f"Node/{node}/felix-config", code="invalid-felix-configuration", kind="Node",
                                object=node, message="; ".join(self.config_problems.get(node, [])))
                    ] if self.config_problems.get(node) else []
        if settings.bpf_enabled:
            warnings.append(PlanWarning(
                id=f"Node/{node}/calico-bpf", code="calico-bpf-dataplane", kind="Node", object=node,
                message=f"bpfEnabled is true for {node}: Calico's eBPF dataplane replaces kube-proxy and has no "
                        "IPVS support; kipvs writes no endpoint-mark rules there (do not run kipvs on it)"))
        if alloc.unmarked and not settings.bpf_enabled:  # in eBPF mode no endpoint is marked, by Felix or kipvs
            pods = sorted(k for k, (n, i) in self.endpoints.items() if n == node and i in alloc.unmarked)
            warnings.append(PlanWarning(
                id=f"Node/{node}/endpoint-marks-exhausted", code="endpoint-marks-exhausted", kind="Node", object=node,
                message=f"{len(pods)} pods on {node} have no endpoint mark (capacity {lay.capacity}): "
                        + ", ".join(pods)))
        ranges = settings.kube_node_port_ranges
        return SetNodeCalico(
            node=node,
            layout=MarkLayoutRecord(accept=lay.accept, pass_=lay.pass_, drop=lay.drop, scratch0=lay.scratch0,
                                    scratch1=lay.scratch1, wireguard=lay.wireguard, endpoint_mask=lay.endpoint_mask,
                                    non_calico=lay.non_calico),
            nodeport_ranges=ranges, endpoint_marks=alloc.marks(), unmarked=tuple(alloc.unmarked),
            warnings=tuple(warnings), calico_node=node in self.calico_nodes.values(),
            bpf_enabled=settings.bpf_enabled)


def nodeport_problem(service: str, ports: tuple[int, ...],
                     groups: dict[tuple[tuple[int, int], ...], list[str]]) -> str:
    """Why a Service's node ports are not all covered by Calico's kubeNodePortRanges on some nodes; ""
    when they are. Nodes usually share one range set, so this is a check per distinct set, not per node."""
    problems = []
    for ranges, nodes in groups.items():
        outside = [p for p in ports if not any(low <= p <= high for low, high in ranges)]
        if outside:
            where = "every node" if len(groups) == 1 else "nodes " + ", ".join(sorted(nodes))
            problems.append(f"nodePort {', '.join(map(str, outside))} is outside kubeNodePortRanges "
                            f"{', '.join(f'{lo}:{hi}' for lo, hi in ranges)} on {where}")
    if not problems:
        return ""
    return f"{service}: " + "; ".join(problems) + ": Calico policy does not cover it on the IPVS path"


def _calico_node(obj: dict[str, Any]) -> str | None:
    """The node a calico-node pod (label k8s-app=calico-node) runs on; None for any other pod or a finished one."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    labels = metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    if labels.get("k8s-app") != "calico-node" or not spec.get("nodeName"):
        return None
    return None if status.get("phase") in ("Succeeded", "Failed") else str(spec["nodeName"])


def _workload(key: str, obj: dict[str, Any]) -> tuple[str, str] | None:
    """(node, interface) if the Pod is a local workload endpoint somewhere, else None."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    node = spec.get("nodeName")
    if not node or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    namespace, _, name = key.partition("/")
    return str(node), interface_name(namespace, name)
