"""The effective Calico FelixConfiguration of a node. Pure.

Field by field: built-in defaults, then the object ``default``, then ``node.<nodename>``. A value that is
invalid (a mark mask with fewer than 2 bits, a malformed node-port range, more than 7 ranges, a wrong
type) is reported and the last valid value for that field is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .endpoint_marks import DEFAULT_MASK, InvalidMask, layout

MAX_RANGES = 7
_RANGE = re.compile(r"^(\d+)(?::(\d+))?$")


@dataclass(frozen=True)
class FelixSettings:
    iptables_mark_mask: int = DEFAULT_MASK
    kube_node_port_ranges: tuple[tuple[int, int], ...] = ((30000, 32767),)
    wireguard_enabled: bool = False
    wireguard_enabled_v6: bool = False
    bpf_enabled: bool = False


def _ranges(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise ValueError(f"kubeNodePortRanges must be a list, not {type(value).__name__}")
    if len(value) > MAX_RANGES:
        raise ValueError(f"kubeNodePortRanges has {len(value)} entries; at most {MAX_RANGES}")
    out = []
    for item in value:
        match = _RANGE.match(str(item).strip()) if isinstance(item, int | str) and not isinstance(item, bool) else None
        if not match:
            raise ValueError(f"kubeNodePortRanges entry {item!r} is not a port or 'lo:hi'")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"kubeNodePortRanges entry {item!r} is not within 1-65535 with lo <= hi")
        out.append((low, high))
    return tuple(out)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, not {value!r}")
    return value


def overlay(base: FelixSettings, spec: dict[str, Any]) -> tuple[FelixSettings, list[str]]:
    """``spec``'s valid fields over ``base``; the problems with the others (which keep base's value)."""
    problems: list[str] = []
    out = base
    for key, field, parse in (("wireguardEnabled", "wireguard_enabled", lambda v: _bool(v, "wireguardEnabled")),
                              ("wireguardEnabledV6", "wireguard_enabled_v6", lambda v: _bool(v, "wireguardEnabledV6")),
                              ("bpfEnabled", "bpf_enabled", lambda v: _bool(v, "bpfEnabled")),
                              ("kubeNodePortRanges", "kube_node_port_ranges", _ranges)):
        if key in spec:
            try:
                out = replace(out, **{field: parse(spec[key])})
            except ValueError as exc:
                problems.append(str(exc))
    if "iptablesMarkMask" in spec:
        mask = spec["iptablesMarkMask"]
        try:
            if isinstance(mask, bool) or not isinstance(mask, int):
                raise InvalidMask(f"iptablesMarkMask must be an integer, not {mask!r}")
            layout(mask, out.wireguard_enabled)
            out = replace(out, iptables_mark_mask=mask)
        except InvalidMask as exc:
            problems.append(str(exc))
    return out, problems


def effective(configs: dict[str, dict[str, Any]], node: str,
              last_valid: FelixSettings | None = None) -> tuple[FelixSettings, list[str]]:
    """A node's settings from the FelixConfiguration specs by object name; invalid fields keep
    ``last_valid``'s value (the built-in defaults the first time)."""
    settings = last_valid or FelixSettings()
    problems: list[str] = []
    merged = FelixSettings()
    for name in ("default", f"node.{node}"):
        if name in configs:
            merged, found = overlay(merged, configs[name])
            problems += [f"FelixConfiguration {name}: {p}" for p in found]
    if problems:  # fall back field by field to the last valid value for the fields that failed
        for field in ("iptables_mark_mask", "kube_node_port_ranges", "wireguard_enabled", "wireguard_enabled_v6",
                      "bpf_enabled"):
            names = {"iptables_mark_mask": "iptablesMarkMask", "kube_node_port_ranges": "kubeNodePortRanges",
                     "wireguard_enabled": "wireguardEnabled", "wireguard_enabled_v6": "wireguardEnabledV6",
                     "bpf_enabled": "bpfEnabled"}
            if any(names[field] in p for p in problems):
                merged = replace(merged, **{field: getattr(settings, field)})
    return merged, problems
