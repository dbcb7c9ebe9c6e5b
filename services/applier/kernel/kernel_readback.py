"""Reading the kernel back: the dumps behind the drift check, shadow mode, ``kipvs ipvs`` and the drain.

Each read is one or more netlink dumps on a :class:`~.netlink_dump.DumpSocket` of this reader's own (never
the write sockets, so a read never consumes a write's acknowledgements), decoded by
:mod:`.kernel_decode`. IPVS is read as ``ipvsadm -Sn`` reads it (libipvs ``ipvs_get_services`` then
``ipvs_get_dests`` per service): one IPVS_CMD_GET_SERVICE dump, then one IPVS_CMD_GET_DEST dump per
service, back to back on one socket without an event-loop round trip between them (the kernel builds each
reply inside our system calls; see :mod:`.netlink_dump` for why two dumps cannot share one ``send``). The
event loop gets a turn every ``YIELD_EVERY`` services so that a 10,000-service read never holds it for
seconds.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable
from typing import TypeVar

from shared.plan.node_state import NodeState, RealKey, VirtualService, VSKey

from . import kernel_decode
from .backend import Observed, parse_owned_entry
from .decode_memo import DecodeMemo
from .ipvs_wire import observed_scheduler
from .kernel_decode import CMD_GET_DEST, CMD_GET_SERVICE, Dest, Service
from .kernel_layouts import Runs
from .netlink_batch import NETLINK_GENERIC, NETLINK_NETFILTER
from .netlink_dump import NETLINK_ROUTE, DumpError, DumpSocket

YIELD_EVERY = 200  # IPVS services read between two turns of the event loop
PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
IPVS_PROTOCOLS = kernel_decode.IPVS_PROTOCOLS

T = TypeVar("T")


class KernelReader:
    """The kernel's IPVS table, addresses and ipsets, read with hand-decoded dumps. ``ipvs_family`` is the
    generic-netlink family id of IPVS (resolved by the caller). Every method raises DumpError (an OSError
    with the kernel's errno) when the kernel refuses a dump, DecodeError (a ValueError) for a malformed
    reply."""

    def __init__(self, ipvs_family: int) -> None:
        self.ipvs_family = ipvs_family
        self.genl = DumpSocket(NETLINK_GENERIC)
        self.nfnl = DumpSocket(NETLINK_NETFILTER)
        self.route = DumpSocket(NETLINK_ROUTE)
        # decode only messages that changed since the last read (decode_memo.py)
        self.service_memo = DecodeMemo(kernel_decode.service)
        self.address_memo = DecodeMemo(kernel_decode.address)
        self.member_memos: dict[tuple[str, str], DecodeMemo[list[str]]] = {}  # (set, type)

    async def services(self) -> list[Service]:
        """Every IPVS virtual service, in the kernel's dump order."""
        payloads = await self.genl.dump(self.ipvs_family, kernel_decode.ipvs_dump_request(CMD_GET_SERVICE))
        return self.service_memo(payloads)

    async def dests(self, service: Service) -> list[Dest]:
        """One service's real servers in the kernel's order (none if the service is gone meanwhile: the
        kernel's ``ip_vs_genl_dump_dests`` ends the dump empty then)."""
        return kernel_decode.dests(await self._dest_runs(service), service.family)

    async def _dest_runs(self, service: Service) -> Runs:
        return await self.genl.dump_runs(self.ipvs_family, kernel_decode.ipvs_dump_request(CMD_GET_DEST, service.key))

    async def table(self, wanted: Callable[[Service], bool] | None = None,
                    dests_of: Callable[[Service], bool] | None = None,
                    decode: Callable[[Runs, int], T] = kernel_decode.dests) -> list[tuple[Service, T]]:
        """Every service (or those ``wanted``) with its real servers as ``decode`` (the destination dump's
        runs, the service's family) makes them: :func:`~.kernel_decode.dests` in the kernel's order, or
        :func:`~.kernel_decode.dest_weights`. Only for the services ``dests_of`` accepts, if given; the
        others get ``decode([])``, unread. In the kernel's service order."""
        out: list[tuple[Service, T]] = []
        for n, service in enumerate(await self.services()):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if wanted is None or wanted(service):
                read = dests_of is None or dests_of(service)
                out.append((service, decode(await self._dest_runs(service) if read else [], service.family)))
        return out

    async def addresses(self, index: int = 0) -> list[tuple[int, str]]:
        """(interface index, address) of every address, or of interface ``index``'s only (index > 0)."""
        payloads = await self.route.dump(kernel_decode.RTM_GETADDR, kernel_decode.address_dump_request(index))
        return [found for found in self.address_memo(payloads)
                if found is not None and (index == 0 or found[0] == index)]

    async def members(self, name: str, set_type: str) -> list[str] | None:
        """The members of ipset ``name`` (of ``set_type``) in kube-proxy's entry syntax; None when no set
        has that name."""
        try:
            payloads = await self.nfnl.dump(*kernel_decode.ipset_list_request(name))
        except DumpError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        memo = self.member_memos.get((name, set_type))
        if memo is None:
            memo = self.member_memos[(name, set_type)] = DecodeMemo(
                functools.partial(kernel_decode.ipset_members, set_type=set_type))
        out: list[str] = []
        for members in memo(payloads):
            out += members
        return out

    def close(self) -> None:
        for sock in (self.genl, self.nfnl, self.route):
            sock.close()


def _kipvs_shaped(service: Service) -> bool:
    return not service.fwmark and service.protocol in IPVS_PROTOCOLS  # fwmark services are never kipvs's


def _key(service: Service) -> VSKey:
    return (IPVS_PROTOCOLS[service.protocol], service.address, service.port)


async def observe(reader: KernelReader, link_index: int, sets: dict[str, str], owned_sets: tuple[str, ...],
                  checked: Callable[[VSKey], bool] | None = None) -> Observed:
    """What the drift check compares with the plan: IPVS services of kipvs's shape with their real servers'
    weights (only of the services ``checked`` accepts, if given), ``link_index``'s
    addresses, and the members of ``sets`` (name -> type); members of ``owned_sets`` are parsed as
    ownership markers. A set that does not exist reads as empty."""
    state = NodeState()
    dests_of = None if checked is None else (lambda service: checked(_key(service)))
    for service, reals in await reader.table(_kipvs_shaped, dests_of, kernel_decode.dest_weights):
        key = _key(service)
        vs = VirtualService(key[0], key[1], key[2], observed_scheduler(service.scheduler, service.flags),
                            service.timeout if service.flags & PERSISTENT else 0)
        vs.reals = reals
        state.ipvs[key] = vs
    state.addresses = {ip for _, ip in await reader.addresses(link_index)} if link_index else set()
    owned: set[VSKey] = set()
    for name, set_type in sets.items():
        entries = set(await reader.members(name, set_type) or ())
        if name in owned_sets:
            owned |= {parse_owned_entry(e) for e in entries}
        else:
            state.ipsets[name] = entries
    return Observed(state, owned)


async def connections(reader: KernelReader, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]:
    """Active + inactive connections per real server of ``services`` only (the drain's question): one
    destination dump per named service, none for the rest of the table."""
    numbers = {name: number for number, name in IPVS_PROTOCOLS.items()}
    out = {}
    for key in services:
        protocol, ip, port = key
        try:
            probe = kernel_decode.service_probe(numbers[protocol], ip, port)
            dests = await reader.dests(probe)
        except DumpError:
            continue  # the service is gone: nothing left to drain
        for d in dests:
            out[(key, (d.address, d.port))] = d.active + d.inactive
    return out
