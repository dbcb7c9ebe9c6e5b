"""The effective Calico FelixConfiguration of a node. Pure.

Field by field: built-in defaults, then the object ``default``, then ``node.<nodename>``. kipvs reads the
fields that decide the node-port path and every field that decides Felix's mark layout (``driver.go``'s
``StartDataplaneDriver``, see :mod:`.endpoint_marks`): ``iptablesMarkMask``, ``nftablesMarkMask`` and
``nftablesMode`` (which of the two masks Felix uses), ``wireguardEnabled`` and ``wireguardEnabledV6`` (one
WireGuard bit if either is on) and ``bpfEnabled`` (the eBPF dataplane's fixed bits).

Invalid values are reported (the ``invalid-felix-configuration`` warning) and handled as Felix handles them
(``UpdateFrom`` in ``felix/config/config_params.go``, then ``StartDataplaneDriver`` in
``felix/dataplane/driver.go``):

- both masks are ``die-on-fail`` parameters: a value that is not a 32-bit integer with at least 2 bits
  (``MarkBitmaskParam``, ``felix/config/param_types.go``) fails Felix's config load, whichever mask is in
  use and even when ``node.<name>`` overrides a bad ``default``; Felix then retries the load and never
  starts its dataplane. ``driver.go`` panics on masks with too few bits for the single bits, the WireGuard
  bit or (IPVS mode) an endpoint mark, and in eBPF mode on a mask without eBPF's bits. In all these cases
  the node keeps the layout Felix last ran with, so kipvs keeps the last valid value of every mark setting
  (the built-in defaults the first time);
- a boolean or ``nftablesMode`` that does not parse is not fatal to Felix: it logs "Replacing invalid value
  with default" and uses its built-in default (false, ``Auto``) at that object's priority. kipvs does the
  same;
- a malformed node-port range or more than 7 ranges keeps the last valid ranges (kipvs's choice; Felix
  would use its default, 30000:32767).

A mask Felix accepts is always used as given, however few endpoint bits it leaves: with one endpoint bit
Felix runs with no position for any workload, and so does kipvs (pods unmarked, the exhaustion warning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .endpoint_marks import DEFAULT_MASK, InvalidMask, MarkLayout, layout

MAX_RANGES = 7
_RANGE = re.compile(r"^(\d+)(?::(\d+))?$")
NFTABLES_MODES = ("Enabled", "Disabled", "Auto")  # Felix's oneof(Enabled,Disabled,Auto), matched case-insensitively

# spec field -> FelixSettings attribute
FIELDS = {"iptablesMarkMask": "iptables_mark_mask", "nftablesMarkMask": "nftables_mark_mask",
          "nftablesMode": "nftables_mode", "wireguardEnabled": "wireguard_enabled",
          "wireguardEnabledV6": "wireguard_enabled_v6", "bpfEnabled": "bpf_enabled",
          "kubeNodePortRanges": "kube_node_port_ranges"}
MARK_FIELDS = ("iptablesMarkMask", "nftablesMarkMask", "nftablesMode", "wireguardEnabled", "wireguardEnabledV6",
               "bpfEnabled")  # every field the mark layout depends on


@dataclass(frozen=True)
class FelixSettings:
    iptables_mark_mask: int = DEFAULT_MASK
    kube_node_port_ranges: tuple[tuple[int, int], ...] = ((30000, 32767),)
    wireguard_enabled: bool = False
    wireguard_enabled_v6: bool = False
    bpf_enabled: bool = False
    nftables_mark_mask: int = DEFAULT_MASK
    nftables_mode: str = "Auto"

    @property
    def nftables(self) -> bool:
        """Whether Felix runs its nftables dataplane here. ``Auto`` follows kube-proxy: Felix picks nftables
        only when kube-proxy's own nftables table has chains (``nftables.Enabled``, felix/nftables/utils.go);
        on a kipvs node there is no kube-proxy, so ``Auto`` means iptables (unless an nftables-mode kube-proxy
        left its table behind: remove it, as for any leftover kube-proxy state)."""
        return self.nftables_mode == "Enabled"

    @property
    def mark_mask_field(self) -> str:
        """The mask Felix allocates its marks from (``Config.MarkMask()``)."""
        return "nftablesMarkMask" if self.nftables else "iptablesMarkMask"

    @property
    def mark_mask(self) -> int:
        return self.nftables_mark_mask if self.nftables else self.iptables_mark_mask

    @property
    def wireguard(self) -> bool:
        """driver.go allocates one WireGuard bit when WireGuard is on for IPv4 or IPv6."""
        return self.wireguard_enabled or self.wireguard_enabled_v6

    def layout(self) -> MarkLayout:
        """The node's mark layout; :class:`InvalidMask` when Felix would not start with these settings."""
        return layout(self.mark_mask, self.wireguard, self.bpf_enabled, setting=self.mark_mask_field)


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


def _mask(value: Any, key: str) -> int:
    """Felix's ``mark-bitmask`` parameter (felix/config/param_types.go): a 32-bit integer with at least 2 bits.
    Anything else is refused (``die-on-fail``: Felix does not start)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMask(f"{key} must be an integer, not {value!r}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise InvalidMask(f"{key} {value:#x} is not a 32-bit mask")
    if value.bit_count() < 2:
        raise InvalidMask(f"{key} {value:#x} has fewer than 2 bits, Felix's minimum")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}; Felix uses its default, false")
    return value


def _mode(value: Any, key: str) -> str:
    for mode in NFTABLES_MODES:
        if isinstance(value, str) and value.lower() == mode.lower():
            return mode
    raise ValueError(f"{key} must be one of {', '.join(NFTABLES_MODES)}, not {value!r}; Felix uses its default, Auto")


# spec field -> (parser, keep the last valid value on a bad one (else Felix's built-in default applies))
_PARSERS: dict[str, tuple[Any, bool]] = {
    "iptablesMarkMask": (_mask, True), "nftablesMarkMask": (_mask, True), "nftablesMode": (_mode, False),
    "wireguardEnabled": (_bool, False), "wireguardEnabledV6": (_bool, False), "bpfEnabled": (_bool, False),
    "kubeNodePortRanges": (lambda v, _key: _ranges(v), True),
}


def _overlay(base: FelixSettings, spec: dict[str, Any]) -> tuple[FelixSettings, list[tuple[str, str]], set[str]]:
    """``spec``'s fields over ``base``: the settings, the problems as (field, message), and the fields whose
    bad value must not apply (they keep ``base``'s value here; the caller restores the last valid one)."""
    problems: list[tuple[str, str]] = []
    refused: set[str] = set()
    out = base
    for key, (parse, keep_last) in _PARSERS.items():
        if key not in spec:
            continue
        try:
            out = replace(out, **{FIELDS[key]: parse(spec[key], key)})
        except ValueError as exc:  # InvalidMask is a ValueError
            problems.append((key, str(exc)))
            if keep_last:
                refused.add(key)
            else:  # Felix replaces the value with its built-in default, over any lower-priority object's value
                out = replace(out, **{FIELDS[key]: getattr(FelixSettings(), FIELDS[key])})
    return out, problems, refused


def overlay(base: FelixSettings, spec: dict[str, Any]) -> tuple[FelixSettings, list[str]]:
    """``spec``'s valid fields over ``base``; the problems with the others."""
    out, problems, _ = _overlay(base, spec)
    return out, [message for _, message in problems]


def effective(configs: dict[str, dict[str, Any]], node: str,
              last_valid: FelixSettings | None = None) -> tuple[FelixSettings, list[str]]:
    """A node's settings from the FelixConfiguration specs by object name, and the problems found. Values
    Felix refuses keep ``last_valid``'s (the built-in defaults the first time), which must be a combination
    Felix starts with (as every result of this function is)."""
    last = last_valid or FelixSettings()
    problems: list[str] = []
    refused: set[str] = set()
    merged = FelixSettings()
    for name in ("default", f"node.{node}"):
        if name in configs:
            merged, found, bad = _overlay(merged, configs[name])
            problems += [f"FelixConfiguration {name}: {message}" for _, message in found]
            refused |= bad
    if refused & set(MARK_FIELDS):  # Felix does not start: the whole mark layout it last ran with stays
        merged = replace(merged, **{FIELDS[key]: getattr(last, FIELDS[key]) for key in MARK_FIELDS})
    for key in refused - set(MARK_FIELDS):
        merged = replace(merged, **{FIELDS[key]: getattr(last, FIELDS[key])})
    try:
        merged.layout()
    except InvalidMask as exc:  # driver.go would panic: likewise, the last valid mark settings stay
        involved = [merged.mark_mask_field] + [key for key in ("wireguardEnabled", "wireguardEnabledV6", "bpfEnabled")
                                               if getattr(merged, FIELDS[key])]
        problems.append(f"FelixConfiguration for {node} ({', '.join(involved)}): {exc}")
        merged = replace(merged, **{FIELDS[key]: getattr(last, FIELDS[key]) for key in MARK_FIELDS})
    return merged, problems
