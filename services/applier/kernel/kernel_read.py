"""Reading a node's kernel whole, read-only: what ``kipvs ipvs --node`` shows and shadow mode compares.

Unlike the drift check's read-back (``NetlinkKernel.observe``, only what kipvs writes, into the plan's
model), this reads everything IPVS holds, whoever wrote it: firewall-mark services, every forwarding
method, connection counts and the 64-bit counters and rates (IPVS_SVC_ATTR_STATS64 /
IPVS_DEST_ATTR_STATS64, the ones ``ipvsadm --stats`` prints); the addresses on kube-ipvs0 if that link
exists; and every KUBE-* ipset of kube-proxy's list that exists. It never creates or changes anything, so
it works on a node where kube-proxy owns the kernel (shadow mode) as well as under a running applier.

The IPVS version and connection-table size (ipvsadm's header line) come from IPVS_CMD_GET_INFO.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.contract import events
from shared.plan.ipvs_flags import sched_flag_names
from shared.plan.node_state import ALL_IPSETS, IPSET_TYPES, VSKey, ipset_name

from . import ipvs_wire, kernel_decode
from .backend import LINK
from .kernel_decode import Dest, Service
from .kernel_readback import IPVS_PROTOCOLS, PERSISTENT

if TYPE_CHECKING:
    from .netlink_writer import NetlinkKernel

CMD_GET_INFO = 15
INFO_VERSION, INFO_CONN_TAB_SIZE = 1, 2
FORWARD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route"}  # IP_VS_CONN_F_FWD_MASK, ipvsadm's names
FWD_MASK = 0x7
ONE_PACKET = 0x4  # IP_VS_SVC_F_ONEPACKET
IPSET_TYPES_BY_NAME = {ipset_name(base, family): kind for base, kind in IPSET_TYPES.items() for family in (4, 6)}
STAT_FIELDS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps", "outpps", "inbps", "outbps")


def get_info() -> bytes:
    return struct.pack("=BBH", CMD_GET_INFO, ipvs_wire.GENL_VERSION, 0)


def parse_info(payload: bytes) -> tuple[str, int]:
    """(version "1.2.1", connection table size) from an IPVS_CMD_GET_INFO reply's payload (after the
    netlink header). The version is packed as ipvsadm's NVERSION reads it: major << 16 | minor << 8 | patch."""
    found: dict[int, int] = {}
    offset = 4  # the generic netlink header
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        if kind in (INFO_VERSION, INFO_CONN_TAB_SIZE) and length >= 8:
            (found[kind],) = struct.unpack_from("=I", payload, offset + 4)
        offset += (length + 3) & ~3
    version = found.get(INFO_VERSION, 0)
    return f"{version >> 16 & 0xFF}.{version >> 8 & 0xFF}.{version & 0xFF}", found.get(INFO_CONN_TAB_SIZE, 0)


def _stats(raw: bytes) -> events.IpvsStats:
    return events.IpvsStats(**kernel_decode.stats(raw)) if raw else events.IpvsStats()


def _netmask(family: int, raw: bytes) -> str:
    if not raw:
        return ""
    if family == 4:
        return socket.inet_ntoa(raw)
    # IPv6: the kernel's be32 holds a host-order prefix length (see ipvs_wire)
    return str(struct.unpack("=I", raw)[0])


def virtual_server(svc: Service, dests: list[Dest]) -> events.KernelVirtualServer:
    """One service and its destinations, as :mod:`.kernel_decode` decodes them."""
    family = 6 if svc.family == socket.AF_INET6 else 4
    reals = tuple(events.KernelRealServer(
        address=d.address, port=d.port,
        forward=FORWARD_NAMES.get(d.forward & FWD_MASK, "Masq"),  # type: ignore[arg-type]
        weight=d.weight, active_conns=d.active, inactive_conns=d.inactive, stats=_stats(d.stats)) for d in dests)
    return events.KernelVirtualServer(
        family=family,  # type: ignore[arg-type]
        protocol="" if svc.fwmark else IPVS_PROTOCOLS.get(svc.protocol, "?"),
        address=svc.address, port=svc.port, fwmark=svc.fwmark, scheduler=svc.scheduler,
        persistence_timeout=svc.timeout if svc.flags & PERSISTENT else 0,
        netmask=_netmask(family, svc.netmask), one_packet=bool(svc.flags & ONE_PACKET),
        stats=_stats(svc.stats), real_servers=reals, sched_flags=tuple(sched_flag_names(svc.scheduler, svc.flags)))


async def read_table(kernel: NetlinkKernel, reals_of: Callable[[VSKey], bool] | None = None) -> events.KernelTable:
    """Read a :class:`~.netlink_writer.NetlinkKernel`'s kernel whole (see the module's docstring), with its
    sockets (opened if needed); creates nothing. Raises DumpError (an OSError) when the kernel refuses a
    dump. Virtual and real servers stay in the kernel's dump order (``ipvsadm_format`` needs it). With
    ``reals_of``, real servers only of the (protocol, address, port) services it accepts (shadow mode's
    slice: ``divergence.divergences``' ``reals_read``); firewall-mark services' then none."""
    await kernel._open()
    reader, ipr = kernel.reader, kernel.ipr
    assert reader is not None and ipr is not None and kernel.writer is not None
    version, size = parse_info(await kernel.writer.query(kernel.ipvs_family, get_info()))
    dests_of = None if reals_of is None else (
        lambda svc: not svc.fwmark and svc.protocol in IPVS_PROTOCOLS
        and reals_of((IPVS_PROTOCOLS[svc.protocol], svc.address, svc.port)))
    services = [virtual_server(svc, dests) for svc, dests in await reader.table(dests_of=dests_of)]
    found = await ipr.link_lookup(ifname=LINK)
    kernel.link_index = found[0] if found else 0  # node_addresses() leaves this link's addresses out
    addresses = [ip for _, ip in await reader.addresses(found[0])] if found else []
    ipsets: dict[str, tuple[str, ...]] = {}
    for name in ALL_IPSETS:
        members = await reader.members(name, IPSET_TYPES_BY_NAME[name])
        if members is not None:
            ipsets[name] = tuple(sorted(members))
    return events.KernelTable(ipvs_version=version, conn_table_size=size, virtual_servers=tuple(services),
                              link=bool(found), addresses=tuple(sorted(addresses)), ipsets=ipsets)
