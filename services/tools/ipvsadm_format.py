"""A kernel table in ``ipvsadm -Ln`` layout (also ``--stats`` and ``--rate``). Pure.

Follows ipvsadm 1.31's ``list_all`` / ``print_title`` / ``print_service_entry`` / ``print_largenum``
(ipvsadm.c) with ``-n``: the same header lines, column widths, number abbreviations (K, M, G, T above 100
million) and order (virtual servers by firewall mark, family, protocol number, address, port; real servers
by address and port, as libipvs compares them: see ``glibc_qsort``), so scripts and eyes used to
``ipvsadm -Ln`` read it unchanged. The table must be in the kernel's dump order (as ``kernel_read`` and
the memory backend give it) for the order to be ipvsadm's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from shared.contract.events import IpvsStats, KernelRealServer, KernelTable, KernelVirtualServer

Layout = Literal["table", "stats", "rate"]
T = TypeVar("T")
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
    # Debian's ipvsadm 1.31 pads the protocol to four columns: "TCP  10.96.0.10:80", "SCTP 10.96.2.2:3868"
    # (seen in the guest: tests/guest/kernel_readback.py).
    name = f"{vs.protocol:<4} {_hostport(vs.family, vs.address, vs.port)}"
    return name if vs.family == 6 else name[:33]  # ipvsadm cuts an IPv4 name at 33 characters


# ipvsadm sorts with libipvs's ipvs_cmp_services / ipvs_cmp_dests through glibc's qsort. Those comparators
# subtract unsigned 32-bit words and return the difference as an int, so it wraps: 192.168.50.11 sorts
# before 10.96.0.10 (0xC0A8320B - 0x0A60000A is negative as an int). The comparison is therefore not an
# order, and the result depends on the algorithm and the input order: glibc's qsort is a top-down merge
# sort, fed in the kernel's dump order. Both are reproduced, so the output is ipvsadm's line for line.
AF = {4: 2, 6: 10}  # AF_INET, AF_INET6


def _wrap(a: int, b: int) -> int:
    """``(int)(a - b)`` for two u32: C's wrap-around."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d >= 1 << 31 else d


def _words(family: int, ip: str) -> list[int]:
    if not ip:
        return [0] if family == 4 else [0, 0, 0, 0]
    raw = int(ipaddress.ip_address(ip))
    return [raw] if family == 4 else [(raw >> shift) & 0xFFFFFFFF for shift in (96, 64, 32, 0)]


def _cmp_address(family: int, a: str, b: str) -> int:
    r = 0
    for x, y in zip(_words(family, a), _words(family, b), strict=True):
        r = _wrap(x, y)
        if r:
            break
    return r


def _cmp_services(a: KernelVirtualServer, b: KernelVirtualServer) -> int:
    return (_wrap(a.fwmark, b.fwmark) or AF[a.family] - AF[b.family]
            or PROTOCOL_NUMBERS.get(a.protocol, 0) - PROTOCOL_NUMBERS.get(b.protocol, 0)
            or _cmp_address(a.family, a.address, b.address) or a.port - b.port)


def _cmp_dests(family: int) -> Callable[[KernelRealServer, KernelRealServer], int]:
    return lambda a, b: _cmp_address(family, a.address, b.address) or a.port - b.port


def glibc_qsort(items: Sequence[T], cmp: Callable[[T, T], int]) -> list[T]:
    """glibc's ``qsort`` (``msort_with_tmp``): split at n/2, sort both halves, merge taking the left element
    while ``cmp(left, right) <= 0``."""
    if len(items) <= 1:
        return list(items)
    half = len(items) // 2
    left, right = glibc_qsort(items[:half], cmp), glibc_qsort(items[half:], cmp)
    out: list[T] = []
    i = j = 0
    while i < len(left) and j < len(right):
        if cmp(left[i], right[j]) <= 0:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    return out + left[i:] + right[j:]


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
    if vs.sched_flags:  # ipvsadm.c print_service_entry: "(flags)" right after the scheduler
        line += f" ({','.join(vs.sched_flags)})"
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
    for vs in glibc_qsort(table.virtual_servers, _cmp_services):
        lines.append(_service_line(vs, layout))
        lines += [_real_line(vs, rs, layout) for rs in glibc_qsort(vs.real_servers, _cmp_dests(vs.family))]
    return "\n".join(lines) + "\n"
