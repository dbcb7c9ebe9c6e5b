"""What the applier needs from a kernel, and the in-memory kernel model (``--backend memory``).

``Backend`` is the seam between the applier's logic and the kernel: the netlink backend
(``netlink_writer.py``) writes a real kernel; ``MemoryKernel`` models one for simulations, dry runs and
differential tests (the same operations must leave both in the same state).

Ownership: kipvs records every IPVS service it creates in the kernel itself, in the ipsets
KIPVS-OWNED-VS / KIPVS-6-OWNED-VS (``ip,proto:port``), so that after any restart it knows which services
are its own and never touches a foreign one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared.contract import events
from shared.plan.ipvs_flags import sched_flag_names, service_flags
from shared.plan.node_state import ALL_IPSETS, NodeState, RealKey, VirtualService, VSKey, family_of

from ..node_settings import Timeouts
from ..ops import (
    AddAddress,
    AddEntry,
    AddReal,
    AddService,
    DelAddress,
    DelEntry,
    DelReal,
    DelService,
    EditReal,
    EditService,
    Op,
)

LINK = "kube-ipvs0"
OWNED_SETS = {4: "KIPVS-OWNED-VS", 6: "KIPVS-6-OWNED-VS"}


def owned_entry(key: VSKey) -> str:
    protocol, ip, port = key
    return f"{ip},{protocol.lower()}:{port}"


def parse_owned_entry(entry: str) -> VSKey:
    ip, _, rest = entry.partition(",")
    protocol, _, port = rest.partition(":")
    return (protocol.upper(), ip, int(port))


class CapabilityError(Exception):
    """The kernel or the process cannot do what the applier needs; the message says what and how to fix it."""


class KernelError(Exception):
    """A kernel write failed; the message names the operation."""


@dataclass
class Observed:
    """What was read back from the kernel. Real servers' connection counts are not in it: only the drain
    asks for them, of its few services (``Backend.connections``)."""

    state: NodeState
    owned: set[VSKey]


class Backend(Protocol):
    label: str

    async def check(self) -> None: ...

    async def setup(self) -> None: ...

    async def observe(self, checked: Callable[[VSKey], bool] | None = None) -> Observed:
        """kipvs's objects as the kernel holds them; with ``checked``, real servers are read only for the
        services it accepts (the others' ``reals`` may be empty: see drift_slices.py)."""
        ...

    async def apply(self, ops: list[Op]) -> None: ...

    async def connections(self, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]: ...

    async def kernel_table(self, reals_of: Callable[[VSKey], bool] | None = None) -> events.KernelTable:
        """Everything the kernel holds (``kipvs ipvs``, shadow mode); with ``reals_of``, real servers may be
        left out for the services it refuses (shadow mode's slice)."""
        ...

    async def node_addresses(self) -> tuple[str, ...]: ...

    async def cleanup(self) -> None: ...

    async def close(self) -> None: ...

    async def ipvs_timeouts(self) -> Timeouts: ...

    async def set_ipvs_timeouts(self, wish: Timeouts) -> None: ...

    def sysctls(self, keys: list[str]) -> dict[str, str]: ...

    def set_sysctls(self, values: dict[str, str]) -> None: ...

    async def clear_conntrack(self, flows: list[tuple[VSKey, RealKey | None]]) -> int: ...

    async def set_link_alias(self, alias: str) -> None: ...


@dataclass
class MemoryKernel:
    """An in-memory model of the kernel objects kipvs writes. Clearly not a kernel: nothing is forwarded."""

    label: str = "memory (simulated kernel: nothing is programmed)"
    ipvs: dict[VSKey, VirtualService] = field(default_factory=dict)
    link: bool = False
    addresses: set[str] = field(default_factory=set)
    ipsets: dict[str, set[str]] | None = None
    conns: dict[tuple[VSKey, RealKey], int] = field(default_factory=dict)  # set by tests: open connections
    interface_addresses: tuple[str, ...] = ()  # the simulated node's own addresses
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(900, 120, 300))  # the kernel's defaults
    sysctl_values: dict[str, str] = field(default_factory=dict)
    conntrack_cleared: list[tuple[VSKey, RealKey | None]] = field(default_factory=list)
    link_alias: str = ""

    async def set_link_alias(self, alias: str) -> None:
        self.link_alias = alias

    async def ipvs_timeouts(self) -> Timeouts:
        return self.timeouts

    async def set_ipvs_timeouts(self, wish: Timeouts) -> None:
        self.timeouts = Timeouts(wish.tcp or self.timeouts.tcp, wish.tcp_fin or self.timeouts.tcp_fin,
                                 wish.udp or self.timeouts.udp)

    def sysctls(self, keys: list[str]) -> dict[str, str]:
        return {key: self.sysctl_values.get(key, "0") for key in keys}

    def set_sysctls(self, values: dict[str, str]) -> None:
        self.sysctl_values.update(values)

    async def clear_conntrack(self, flows: list[tuple[VSKey, RealKey | None]]) -> int:
        self.conntrack_cleared += flows
        return 0  # a simulated kernel tracks no connections

    async def node_addresses(self) -> tuple[str, ...]:
        return self.interface_addresses

    async def check(self) -> None:
        return None

    async def setup(self) -> None:
        self.link = True
        if self.ipsets is None:
            self.ipsets = {}
        for name in (*ALL_IPSETS, *OWNED_SETS.values()):
            self.ipsets.setdefault(name, set())

    async def observe(self, checked: Callable[[VSKey], bool] | None = None) -> Observed:
        """Everything (``checked`` is not needed: reading memory costs nothing)."""
        assert self.ipsets is not None, "setup() first"
        state = NodeState()
        state.ipvs = {k: VirtualService(v.protocol, v.ip, v.port, v.scheduler, v.persistence_timeout, dict(v.reals))
                      for k, v in self.ipvs.items()}
        state.addresses = set(self.addresses)
        state.ipsets = {name: set(self.ipsets[name]) for name in ALL_IPSETS}
        owned = {parse_owned_entry(e) for name in OWNED_SETS.values() for e in self.ipsets[name]}
        return Observed(state, owned)

    async def connections(self, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]:
        return {k: v for k, v in self.conns.items() if k[0] in services}

    async def kernel_table(self, reals_of: Callable[[VSKey], bool] | None = None) -> events.KernelTable:
        """The simulated table in the kernel view's form: masquerade, no counters (nothing is forwarded),
        ``conns`` as active connections; the sets that exist (none before ``setup``); every real server
        (reading memory costs nothing)."""
        vss = tuple(events.KernelVirtualServer(
            family=family_of(vs.ip), protocol=vs.protocol, address=vs.ip, port=vs.port,  # type: ignore[arg-type]
            scheduler=vs.scheduler, persistence_timeout=vs.persistence_timeout,
            netmask="" if not vs.persistence_timeout else "255.255.255.255" if family_of(vs.ip) == 4 else "128",
            sched_flags=tuple(sched_flag_names(vs.scheduler, service_flags(vs.scheduler, vs.persistence_timeout))),
            real_servers=tuple(events.KernelRealServer(address=ip, port=port, weight=weight,
                                                       active_conns=self.conns.get((key, (ip, port)), 0))
                               for (ip, port), weight in vs.reals.items()))
            for key, vs in self.ipvs.items())
        ipsets = {name: tuple(sorted(entries)) for name, entries in (self.ipsets or {}).items() if name in ALL_IPSETS}
        return events.KernelTable(ipvs_version="simulated", virtual_servers=vss, link=self.link,
                                  addresses=tuple(sorted(self.addresses)), ipsets=ipsets)

    async def apply(self, ops: list[Op]) -> None:
        assert self.ipsets is not None, "setup() first"
        for op in ops:
            self._apply(op)

    def _apply(self, op: Op) -> None:
        assert self.ipsets is not None
        match op:
            case AddAddress(ip):
                self._absent(ip in self.addresses, f"address {ip} exists")
                self.addresses.add(ip)
            case DelAddress(ip):
                self._present(ip in self.addresses, f"address {ip}")
                self.addresses.discard(ip)
            case AddService(key, scheduler, timeout):
                self._absent(key in self.ipvs, f"service {key} exists")
                self.ipvs[key] = VirtualService(key[0], key[1], key[2], scheduler, timeout)
                self.ipsets[OWNED_SETS[family_of(key[1])]].add(owned_entry(key))
            case EditService(key, scheduler, timeout):
                self._present(key in self.ipvs, f"service {key}")
                self.ipvs[key].scheduler, self.ipvs[key].persistence_timeout = scheduler, timeout
            case DelService(key):
                self._present(key in self.ipvs, f"service {key}")
                del self.ipvs[key]
                self.ipsets[OWNED_SETS[family_of(key[1])]].discard(owned_entry(key))
            case AddReal(service, real, weight):
                self._present(service in self.ipvs, f"service {service}")
                self._absent(real in self.ipvs[service].reals, f"real server {real} exists")
                self.ipvs[service].reals[real] = weight
            case EditReal(service, real, weight):
                self._present(real in self.ipvs.get(service, VirtualService("", "", 0, "")).reals, f"real {real}")
                self.ipvs[service].reals[real] = weight
            case DelReal(service, real):
                self._present(real in self.ipvs.get(service, VirtualService("", "", 0, "")).reals, f"real {real}")
                del self.ipvs[service].reals[real]
                self.conns.pop((service, real), None)
            case AddEntry(name, entry):
                self.ipsets.setdefault(name, set()).add(entry)
            case DelEntry(name, entry):
                self.ipsets.setdefault(name, set()).discard(entry)

    @staticmethod
    def _absent(exists: bool, what: str) -> None:
        if exists:
            raise KernelError(f"{what} (EEXIST)")

    @staticmethod
    def _present(exists: bool, what: str) -> None:
        if not exists:
            raise KernelError(f"{what} does not exist (ENOENT)")

    async def cleanup(self) -> None:
        assert self.ipsets is not None
        owned = {parse_owned_entry(e) for name in OWNED_SETS.values() for e in self.ipsets[name]}
        for key in owned:
            self.ipvs.pop(key, None)
        self.addresses.clear()
        self.link = False
        self.ipsets = None

    async def close(self) -> None:
        return None
