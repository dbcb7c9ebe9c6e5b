"""Calico's endpoint marks for IPVS mode, as Felix computes them. Pure.

The mark layout follows Felix's allocation in ``felix/dataplane/driver.go`` (``StartDataplaneDriver``), which
hands the configured mark mask to a ``MarkBitsManager`` (``felix/markbits/mark_bits.go``):

- the mask is ``nftablesMarkMask`` when the node runs Felix's nftables dataplane, else ``iptablesMarkMask``
  (``Config.MarkMask()``, ``felix/config/config_params.go``); :mod:`.felix_config` picks it;
- with ``bpfEnabled`` the eBPF programs' fixed bits (``MarksMask`` 0x1ff00000, ``felix/bpf/tc/defs/defs.go``)
  must all be in the mask, and are taken out of it first;
- ``NextSingleBitMark`` then hands out single bits, lowest set bit first: accept, pass, drop, scratch0,
  scratch1, and wireguard when ``wireguardEnabled`` or ``wireguardEnabledV6`` is on (the drop bit is
  Calico v3.30's; Felix v3.29 and older took four single bits, so their endpoint mask is one bit wider);
- ``NextBlockBitsMark(AvailableMarkBitCount())`` gives every remaining bit to the endpoint mask, and in
  IPVS mode the non-Calico mark is the endpoint mask's lowest bit.

Felix refuses a mask with fewer than 2 bits when it loads its configuration, and its dataplane driver panics
when the mask runs out before scratch1 or the wireguard bit, or, in IPVS mode, when no bit is left for the
endpoint mask; :func:`layout` raises :class:`InvalidMask` in exactly those cases, and in no other. One
endpoint bit is enough for Felix to run: its only non-zero position is the non-Calico one, so no workload
can be marked (capacity 0). kipvs then plans every pod unmarked and says so; it never swaps in a mask the
operator did not set.

Each local workload endpoint gets a *position* in 1 .. 2^n - 1 (0 means "no mark"; the non-Calico
pseudo-endpoint holds position 1), found by FNV-1 hashing its interface name and probing linearly
(``felix/rules/epmark.go``); the mark is the position's bits deposited into the endpoint mask
(``MapNumberToMark``).

Unlike Felix, whose table lives in memory (marks can change after a restart) and which silently leaves an
endpoint unmarked when positions run out, this allocator is part of the planner's replayable state (the
same log gives the same marks) and reports exhaustion by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

DEFAULT_MASK = 0xFFFF0000  # Felix's default for iptablesMarkMask and nftablesMarkMask (config_params.go)
MIN_MASK_BITS = 2  # Felix's MinIptablesMarkBits (felix/config/param_types.go): fewer and the config is refused
BPF_MARKS = 0x1FF00000  # MarksMask in felix/bpf/tc/defs/defs.go: bits the eBPF programs use unconditionally
SINGLE_BITS = ("accept", "pass", "drop", "scratch0", "scratch1")  # driver.go's NextSingleBitMark order
NON_CALICO = "__non_calico__"  # the pseudo-endpoint for traffic from non-workload interfaces
FNV_OFFSET, FNV_PRIME = 2166136261, 16777619


class InvalidMask(ValueError):
    pass


def fnv1_32(data: bytes) -> int:
    """FNV-1, 32 bit (multiply, then XOR: not FNV-1a), as Go's hash/fnv New32."""
    h = FNV_OFFSET
    for byte in data:
        h = (h * FNV_PRIME) & 0xFFFFFFFF
        h ^= byte
    return h


def interface_name(namespace: str, pod: str) -> str:
    """The host-side interface Calico's CNI plugin gives a pod: cali + 11 hex digits of sha1("ns.pod")."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(32) if mask >> i & 1]


@dataclass(frozen=True)
class MarkLayout:
    accept: int
    pass_: int
    drop: int
    scratch0: int
    scratch1: int
    wireguard: int  # 0 when WireGuard is off
    endpoint_mask: int

    @property
    def non_calico(self) -> int:
        return self.endpoint_mask & -self.endpoint_mask  # its lowest set bit (0 with no endpoint mask)

    @property
    def positions(self) -> int:
        """Positions 0 .. 2^n - 1 (Felix's CurrentFreeNumberOfMark: 0 when no endpoint bit is left)."""
        return 1 << bin(self.endpoint_mask).count("1") if self.endpoint_mask else 0

    @property
    def capacity(self) -> int:
        """Workload endpoints that can be marked: every position but 0 ("no mark") and the non-Calico one."""
        return max(self.positions - 2, 0)

    def as_json(self) -> dict[str, int]:
        return {"accept": self.accept, "pass": self.pass_, "drop": self.drop, "scratch0": self.scratch0,
                "scratch1": self.scratch1, "wireguard": self.wireguard, "endpoint_mask": self.endpoint_mask,
                "non_calico": self.non_calico}


def layout(mask: int, wireguard: bool = False, bpf: bool = False, *, setting: str = "iptablesMarkMask") -> MarkLayout:
    """Split ``mask`` as Felix's ``StartDataplaneDriver`` does (driver.go, with markbits.go's allocator).

    ``wireguard``: WireGuard is on for IPv4 or IPv6 (one bit either way). ``bpf``: the eBPF dataplane, whose
    fixed bits leave the mask first and where Felix's IPVS support is off, so no endpoint bit is required.
    :class:`InvalidMask` (naming ``setting``) exactly when Felix would refuse the mask or refuse to start with it.
    """
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask <= 0xFFFFFFFF:
        raise InvalidMask(f"{setting} {mask!r} is not a 32-bit mask")
    if len(_bits(mask)) < MIN_MASK_BITS:
        raise InvalidMask(f"{setting} {mask:#x} has fewer than {MIN_MASK_BITS} bits, Felix's minimum")
    usable, after = mask, ""
    if bpf:
        if mask & BPF_MARKS != BPF_MARKS:
            raise InvalidMask(f"{setting} {mask:#x} does not cover {BPF_MARKS:#x}, the bits Felix's eBPF dataplane "
                              "uses (bpfEnabled); Felix does not start")
        usable, after = mask & ~BPF_MARKS, f" besides eBPF's {BPF_MARKS:#x}"
    bits = _bits(usable)
    names = [*SINGLE_BITS, "wireguard"] if wireguard else list(SINGLE_BITS)
    endpoint_bits = 0 if bpf else 1  # IPVS mode needs an endpoint mark (it is off in eBPF mode)
    if len(bits) < len(names) + endpoint_bits:
        need = f"{len(names)} single bits ({', '.join(names)})"
        if endpoint_bits:
            need += " and at least 1 for endpoint marks in IPVS mode"
        raise InvalidMask(f"{setting} {mask:#x} has {len(bits)} bits{after}; Felix needs {need} and does not start")
    single = dict(zip(names, bits, strict=False))
    endpoint_mask = 0
    for bit in bits[len(names):]:
        endpoint_mask |= bit
    return MarkLayout(accept=single["accept"], pass_=single["pass"], drop=single["drop"],
                      scratch0=single["scratch0"], scratch1=single["scratch1"], wireguard=single.get("wireguard", 0),
                      endpoint_mask=endpoint_mask)


def deposit(position: int, mask: int) -> int:
    """Bit i of ``position`` into the i-th set bit of ``mask``, counting from the least significant."""
    out = 0
    for i, bit in enumerate(_bits(mask)):
        if position >> i & 1:
            out |= bit
    return out


@dataclass
class MarkAllocator:
    """One node's endpoint marks. Feed it endpoints in the order they first appear in the log."""

    layout: MarkLayout
    position_of: dict[str, int] = field(default_factory=dict)  # interface name -> position
    taken: dict[int, str] = field(default_factory=dict)  # position -> interface name
    unmarked: list[str] = field(default_factory=list)  # endpoints left without a mark (exhausted), in order

    def __post_init__(self) -> None:
        if NON_CALICO not in self.position_of and self.layout.endpoint_mask:
            position = 1  # the non-Calico mark is the endpoint mask's lowest bit: position 1
            self.position_of[NON_CALICO] = position
            self.taken[position] = NON_CALICO

    def mark(self, interface: str) -> int:
        """The endpoint's mark, allocating it on first use; 0 when no position is left."""
        if interface in self.position_of:
            return deposit(self.position_of[interface], self.layout.endpoint_mask)
        positions = self.layout.positions
        prospect = fnv1_32(interface.encode()) % positions if positions else 0
        for i in range(positions):  # epmark.go's GetEndpointMark: linear probing, skipping 0 and taken positions
            position = (prospect + i) % positions
            if position == 0 or position in self.taken:
                continue
            self.position_of[interface] = position
            self.taken[position] = interface
            if interface in self.unmarked:
                self.unmarked.remove(interface)
            return deposit(position, self.layout.endpoint_mask)
        if interface not in self.unmarked:
            self.unmarked.append(interface)
        return 0

    def release(self, interface: str) -> None:
        position = self.position_of.pop(interface, None)
        if position is not None:
            del self.taken[position]
        if interface in self.unmarked:
            self.unmarked.remove(interface)

    def marks(self) -> dict[str, int]:
        return {name: deposit(p, self.layout.endpoint_mask) for name, p in sorted(self.position_of.items())
                if name != NON_CALICO}
