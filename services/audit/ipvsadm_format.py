"""A kernel table in ``ipvsadm -Ln`` layout (also ``--stats`` and ``--rate``). Pure.

Follows ipvsadm 1.31's ``list_all`` / ``print_title`` / ``print_service_entry`` / ``print_largenum``
(ipvsadm.c) with ``-n``: the same header lines, column widths, number abbreviations (K, M, G, T above 100
million) and order (virtual servers by firewall mark, family, protocol number, address, port; real servers
by address and port), so scripts and eyes used to ``ipvsadm -Ln`` read it unchanged.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from kipvs.shared.events import IpvsStats, KernelRealServer, KernelTable, KernelVirtualServer

Layout = Literal["table", "stats", "rate"]
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}

_TITLES = {
    "table": ("Prot LocalAddress:Port Scheduler Flags\n"
              "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"),
    "stats": (f"{'Prot LocalAddress:Port':<33} {'Conns':>8} {'InPkts':>8} {'OutPkts':>8} {'InBytes':>8} "
              f"{'OutBytes':>8}\n  -> RemoteAddress:Port"),
    "rate": (f"{'Prot LocalAddress:Port':<33} {'CPS':>8} {'InPPS':>8} {'OutPPS':>8} {'InBPS':>8} {'OutBPS':>8}\n"
             "  -> RemoteAddress:Port"),
}


def largenum(value: int) -> str:
    """ipvsadm's ``print_largenum`` without ``--exact``: 9 columns, abbreviated from 100 million up."""
    if value < 100_000_000:
        return f"{value:9d}"
    for limit, divisor, unit in ((1_000_000_000, 1_000, "K"), (100_000_000_000, 1_000_000, "M"),
                                 (100_000_000_000_000, 1_000_000_000, "G")):
        if value < limit:
            return f"{value // divisor:8d}{unit}"
    return f"{value // 1_000_000_000_000:8d}T"


def _hostport(family: int, ip: str, port: int) -> str:
    return f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}"


def _service_name(vs: KernelVirtualServer) -> str:
    if vs.fwmark:
        return f"FWM  {vs.fwmark}" + (" IPv6" if vs.family == 6 else "")
    name = f"{vs.protocol}  {_hostport(vs.family, vs.address, vs.port)}"
    return name if vs.family == 6 else name[:33]  # ipvsadm cuts an IPv4 name at 33 characters


def _vs_order(vs: KernelVirtualServer) -> tuple[int, int, int, int, int]:
    address = int(ipaddress.ip_address(vs.address)) if vs.address else 0
    return (vs.fwmark, vs.family, PROTOCOL_NUMBERS.get(vs.protocol, 0), address, vs.port)


def _rs_order(rs: KernelRealServer) -> tuple[int, int, int]:
    addr = ipaddress.ip_address(rs.address)
    return (addr.version, int(addr), rs.port)


def _counters(stats: IpvsStats, layout: Layout) -> str:
    if layout == "stats":
        values = (stats.conns, stats.inpkts, stats.outpkts, stats.inbytes, stats.outbytes)
    else:
        values = (stats.cps, stats.inpps, stats.outpps, stats.inbps, stats.outbps)
    return "".join(largenum(v) for v in values)


def _service_line(vs: KernelVirtualServer, layout: Layout) -> str:
    name = _service_name(vs)
    if layout != "table":
        return f"{name:<33}{_counters(vs.stats, layout)}"
    line = f"{name} {vs.scheduler}"
    if vs.persistence_timeout:
        line += f" persistent {vs.persistence_timeout}"
        if vs.netmask and vs.netmask not in ("255.255.255.255", "128"):
            line += f" mask {vs.netmask}"
    if vs.one_packet:
        line += " ops"
    return line


def _real_line(vs: KernelVirtualServer, rs: KernelRealServer, layout: Layout) -> str:
    dname = _hostport(vs.family, rs.address, rs.port)
    if vs.family == 4:
        dname = dname[:28]
    if layout == "table":
        return f"  -> {dname:<28} {rs.forward:<7} {rs.weight:<6d} {rs.active_conns:<10d} {rs.inactive_conns:<10d}"
    if layout == "stats":
        return f"  -> {dname:<28}{_counters(rs.stats, layout)}"
    s = rs.stats
    return f"  -> {dname:<28} {s.cps:8d} {s.inpps:8d} {s.outpps:8d}{largenum(s.inbps)}{largenum(s.outbps)}"


def render(table: KernelTable, layout: Layout = "table") -> str:
    """The table as ``ipvsadm -Ln`` (``--stats``, ``--rate``) prints it, ending with a newline."""
    lines = [f"IP Virtual Server version {table.ipvs_version or '?'} (size={table.conn_table_size})",
             _TITLES[layout]]
    for vs in sorted(table.virtual_servers, key=_vs_order):
        lines.append(_service_line(vs, layout))
        lines += [_real_line(vs, rs, layout) for rs in sorted(vs.real_servers, key=_rs_order)]
    return "\n".join(lines) + "\n"
