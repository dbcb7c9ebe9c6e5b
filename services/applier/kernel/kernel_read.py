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

import errno
import socket
import struct
from typing import TYPE_CHECKING, Any

from pyroute2.ipvs import IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from kipvs.shared import events
from kipvs.shared.plan.node_state import ALL_IPSETS

from . import ipvs_wire
from .backend import LINK
from .ipvs_wire import PERSISTENT, PROTOCOL_NAMES

if TYPE_CHECKING:
    from .netlink_writer import NetlinkKernel

CMD_GET_INFO = 15
INFO_VERSION, INFO_CONN_TAB_SIZE = 1, 2
FORWARD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route"}  # IP_VS_CONN_F_FWD_MASK, ipvsadm's names
FWD_MASK = 0x7
ONE_PACKET = 0x4  # IP_VS_SVC_F_ONEPACKET
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


def _stats(attrs: dict[str, Any], prefix: str) -> events.IpvsStats:
    raw = attrs.get(f"{prefix}_STATS64") or attrs.get(f"{prefix}_STATS")
    if raw is None:
        return events.IpvsStats()
    values = dict(raw["attrs"])
    return events.IpvsStats(**{name: int(values.get(f"IPVS_STATS_ATTR_{name.upper()}", 0)) for name in STAT_FIELDS})


def _netmask(family: int, raw: str | None) -> str:
    if raw is None:
        return ""
    if family == 4:
        return raw
    # IPv6: the kernel's be32 holds a host-order prefix length (see ipvs_wire); pyroute2 decodes it as IPv4
    return str(struct.unpack("=I", socket.inet_aton(raw))[0])


def virtual_server(svc: dict[str, Any], dests: list[dict[str, Any]]) -> events.KernelVirtualServer:
    """One service and its destinations, from pyroute2's decoded attributes (name -> value)."""
    family = 6 if svc.get("IPVS_SVC_ATTR_AF") == socket.AF_INET6 else 4
    fwmark = svc.get("IPVS_SVC_ATTR_FWMARK") or 0
    flags = svc.get("IPVS_SVC_ATTR_FLAGS", {"flags": 0})["flags"]
    reals = []
    for d in dests:
        reals.append(events.KernelRealServer(
            address=d["IPVS_DEST_ATTR_ADDR"], port=d["IPVS_DEST_ATTR_PORT"],
            forward=FORWARD_NAMES.get(d.get("IPVS_DEST_ATTR_FWD_METHOD", 0) & FWD_MASK, "Masq"),  # type: ignore[arg-type]
            weight=d.get("IPVS_DEST_ATTR_WEIGHT", 0),
            active_conns=d.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0), inactive_conns=d.get("IPVS_DEST_ATTR_INACT_CONNS", 0),
            stats=_stats(d, "IPVS_DEST_ATTR")))
    return events.KernelVirtualServer(
        family=family,  # type: ignore[arg-type]
        protocol="" if fwmark else PROTOCOL_NAMES.get(svc.get("IPVS_SVC_ATTR_PROTOCOL", 0), "?"),
        address="" if fwmark else svc.get("IPVS_SVC_ATTR_ADDR", ""),
        port=0 if fwmark else svc.get("IPVS_SVC_ATTR_PORT", 0),
        fwmark=fwmark, scheduler=svc.get("IPVS_SVC_ATTR_SCHED_NAME", ""),
        persistence_timeout=svc.get("IPVS_SVC_ATTR_TIMEOUT", 0) if flags & PERSISTENT else 0,
        netmask=_netmask(family, svc.get("IPVS_SVC_ATTR_NETMASK")), one_packet=bool(flags & ONE_PACKET),
        stats=_stats(svc, "IPVS_SVC_ATTR"), real_servers=tuple(reals))


async def read_table(kernel: NetlinkKernel) -> events.KernelTable:
    """Read a :class:`~.netlink_writer.NetlinkKernel`'s kernel whole (see the module's docstring), with its
    sockets (opened if needed); creates nothing. Raises NetlinkError/OSError when the kernel refuses a dump.
    Virtual and real servers stay in the kernel's dump order (``ipvsadm_format`` needs it)."""
    await kernel._open()
    ipvs, ipr = kernel.ipvs, kernel.ipr
    assert ipvs is not None and ipr is not None and kernel.writer is not None
    version, size = parse_info(await kernel.writer.query(kernel.ipvs_family, get_info()))
    services = []
    for msg in await ipvs.service("dump"):
        svc = dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
        key = IPVSService(af=svc["IPVS_SVC_ATTR_AF"], fwmark=svc["IPVS_SVC_ATTR_FWMARK"]) \
            if svc.get("IPVS_SVC_ATTR_FWMARK") else \
            IPVSService(af=svc["IPVS_SVC_ATTR_AF"], protocol=svc["IPVS_SVC_ATTR_PROTOCOL"],
                        addr=svc["IPVS_SVC_ATTR_ADDR"], port=svc["IPVS_SVC_ATTR_PORT"])
        try:
            dests = [dict(d.get_attr("IPVS_CMD_ATTR_DEST")["attrs"]) for d in await ipvs.dest("dump", service=key)]
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise
            continue  # deleted between the two dumps
        services.append(virtual_server(svc, dests))
    found = await ipr.link_lookup(ifname=LINK)
    kernel.link_index = found[0] if found else 0  # node_addresses() leaves this link's addresses out
    addresses: list[str] = []
    if found:
        async for addr in await ipr.addr("dump", index=found[0]):
            addresses.append(addr.get_attr("IFA_ADDRESS"))
    ipsets: dict[str, tuple[str, ...]] = {}
    for name in ALL_IPSETS:
        try:
            ipsets[name] = tuple(sorted(await kernel._members(name)))
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise
    return events.KernelTable(ipvs_version=version, conn_table_size=size, virtual_servers=tuple(services),
                              link=bool(found), addresses=tuple(sorted(addresses)), ipsets=ipsets)
