"""Calico's endpoint marks for IPVS mode, as Felix computes them. Pure.

Felix (felix/markbits, felix/rules/epmark.go) splits ``iptablesMarkMask`` into single bits (accept, pass,
drop, scratch0, scratch1, and wireguard when WireGuard is on, lowest set bit first) and an endpoint mask of
the remaining bits. Each local workload endpoint gets a *position* in 1 .. 2^n - 1 (0 means "no mark"; the
non-Calico pseudo-endpoint holds the position of the endpoint mask's lowest bit), found by FNV-1 hashing
its interface name and probing linearly; the mark is the position's bits deposited into the endpoint mask.

Unlike Felix, whose table lives in memory (marks can change after a restart) and which silently leaves an
endpoint unmarked when positions run out, this allocator is part of the planner's replayable state (the
same log gives the same marks) and reports exhaustion by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

DEFAULT_MASK = 0xFFFF0000
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
        return self.endpoint_mask & -self.endpoint_mask  # its lowest set bit

    @property
    def positions(self) -> int:
        return 1 << bin(self.endpoint_mask).count("1")

    @property
    def capacity(self) -> int:
        """Workload endpoints that can be marked: every position but 0 ("no mark") and the non-Calico one."""
        return max(self.positions - 2, 0)

    def as_json(self) -> dict[str, int]:
        return {"accept": self.accept, "pass": self.pass_, "drop": self.drop, "scratch0": self.scratch0,
                "scratch1": self.scratch1, "wireguard": self.wireguard, "endpoint_mask": self.endpoint_mask,
                "non_calico": self.non_calico}


def layout(mask: int, wireguard: bool = False) -> MarkLayout:
    """Split the mask as Felix does; InvalidMask if it cannot hold the single bits and an endpoint mask."""
    if not 0 <= mask <= 0xFFFFFFFF:
        raise InvalidMask(f"iptablesMarkMask {mask:#x} is not a 32-bit mask")
    bits = _bits(mask)
    singles = 6 if wireguard else 5
    if len(bits) < 2:
        raise InvalidMask(f"iptablesMarkMask {mask:#x} has fewer than 2 bits")
    if len(bits) < singles + 2:
        raise InvalidMask(f"iptablesMarkMask {mask:#x} has {len(bits)} bits; Felix needs {singles} single bits and "
                          "at least 2 for endpoint marks")
    taken = bits[:singles]
    endpoint_mask = 0
    for bit in bits[singles:]:
        endpoint_mask |= bit
    return MarkLayout(accept=taken[0], pass_=taken[1], drop=taken[2], scratch0=taken[3], scratch1=taken[4],
                      wireguard=taken[5] if wireguard else 0, endpoint_mask=endpoint_mask)


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
        if NON_CALICO not in self.position_of:
            position = 1  # the non-Calico mark is the endpoint mask's lowest bit: position 1
            self.position_of[NON_CALICO] = position
            self.taken[position] = NON_CALICO

    def mark(self, interface: str) -> int:
        """The endpoint's mark, allocating it on first use; 0 when no position is left."""
        if interface in self.position_of:
            return deposit(self.position_of[interface], self.layout.endpoint_mask)
        positions = self.layout.positions
        prospect = fnv1_32(interface.encode()) % positions
        for i in range(positions):
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
