"""IPVS write requests encoded directly (generic netlink, include/uapi/linux/ip_vs.h).

pyroute2 builds and tracks each request in Python objects (~180 us a message here); the applier writes
thousands, so the write path encodes the few message shapes it needs with ``struct`` (each service key
encoded once and reused for all its real servers) and sends them through :class:`.netlink_batch.BatchSocket`.
pyroute2 still resolves the IPVS family id and does every read (dumps).
"""

from __future__ import annotations

import functools
import socket
import struct

from shared.plan.ipvs_flags import MH_PORT, service_flags

from .netlink_batch import attr

CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE = 1, 2, 3
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST = 5, 6, 7
CMD_SET_CONFIG, CMD_GET_CONFIG = 12, 13
ATTR_TIMEOUT_TCP, ATTR_TIMEOUT_TCP_FIN, ATTR_TIMEOUT_UDP = 4, 5, 6
ATTR_SERVICE, ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 1, 2, 3, 4, 6, 7, 8, 9
DEST_ADDR, DEST_PORT, DEST_FWD, DEST_WEIGHT, DEST_UTHRESH, DEST_LTHRESH, DEST_FAMILY = 1, 2, 3, 4, 5, 6, 11
GENL_VERSION = 1
PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items()}
MASQUERADE = 0


def observed_scheduler(name: str, flags: int) -> str:
    """The scheduler as read back, compared with the plan's: an ``mh`` service without ``mh-port`` (written
    by an older kipvs, or by hand) reads as ``mh without mh-port``, so a read-back (bootstrap, drift check)
    repairs its flags with an EditService."""
    if name == "mh" and not flags & MH_PORT:
        return "mh without mh-port"
    return name


def _addr(ip: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return family, socket.inet_pton(family, ip)


@functools.lru_cache(maxsize=65536)
def service_key(protocol: int, ip: str, port: int) -> bytes:
    """The IPVS_CMD_ATTR_SERVICE attribute naming a service (cached: every real server repeats it)."""
    family, raw = _addr(ip)
    return attr(ATTR_SERVICE, attr(SVC_AF, struct.pack("=H", family)) + attr(SVC_PROTOCOL, struct.pack("=H", protocol))
                + attr(SVC_ADDR, raw) + attr(SVC_PORT, struct.pack("!H", port)))


def service_full(protocol: int, ip: str, port: int, scheduler: str, timeout: int) -> bytes:
    family, raw = _addr(ip)
    # For IPv6 the kernel reads this be32 attribute's raw bytes as a host-order prefix length (as ipvsadm
    # writes it with nla_put_u32): pack 128 natively, not in network order.
    netmask = struct.pack("=I", 128) if family == socket.AF_INET6 else b"\xff\xff\xff\xff"
    return attr(ATTR_SERVICE, attr(SVC_AF, struct.pack("=H", family)) + attr(SVC_PROTOCOL, struct.pack("=H", protocol))
                + attr(SVC_ADDR, raw) + attr(SVC_PORT, struct.pack("!H", port))
                + attr(SVC_SCHED, scheduler.encode() + b"\0")
                + attr(SVC_FLAGS, struct.pack("=II", service_flags(scheduler, timeout), 0xFFFFFFFF))
                + attr(SVC_TIMEOUT, struct.pack("=I", timeout)) + attr(SVC_NETMASK, netmask))


_MASQ_TAIL = (attr(DEST_FWD, struct.pack("=I", MASQUERADE)), attr(DEST_UTHRESH, struct.pack("=I", 0))
              + attr(DEST_LTHRESH, struct.pack("=I", 0)))


@functools.lru_cache(maxsize=65536)
def dest(ip: str, port: int, weight: int | None) -> bytes:
    """The IPVS_CMD_ATTR_DEST attribute: a full masquerade entry, or (weight None) just its name."""
    family, raw = _addr(ip)
    out = attr(DEST_ADDR, raw) + attr(DEST_PORT, struct.pack("!H", port))
    if weight is not None:
        out += (_MASQ_TAIL[0] + attr(DEST_WEIGHT, struct.pack("=I", weight)) + _MASQ_TAIL[1]
                + attr(DEST_FAMILY, struct.pack("=H", family)))
    return attr(ATTR_DEST, out)


def body(cmd: int, service: bytes, dest_attr: bytes = b"") -> bytes:
    """One request's payload (after the netlink header, whose type is the IPVS family id): ``service``
    and ``dest_attr`` are the encoded attributes from the functions above."""
    return struct.pack("=BBH", cmd, GENL_VERSION, 0) + service + dest_attr


def set_timeouts(tcp: int, tcp_fin: int, udp: int) -> bytes:
    """IPVS_CMD_SET_CONFIG: what ``ipvsadm --set tcp tcpfin udp`` sends (0: the kernel keeps its value)."""
    attrs = (attr(ATTR_TIMEOUT_TCP, struct.pack("=I", tcp)) + attr(ATTR_TIMEOUT_TCP_FIN, struct.pack("=I", tcp_fin))
             + attr(ATTR_TIMEOUT_UDP, struct.pack("=I", udp)))
    return struct.pack("=BBH", CMD_SET_CONFIG, GENL_VERSION, 0) + attrs


def get_timeouts() -> bytes:
    return struct.pack("=BBH", CMD_GET_CONFIG, GENL_VERSION, 0)


def parse_timeouts(payload: bytes) -> tuple[int, int, int]:
    """The (tcp, tcp_fin, udp) attributes of an IPVS_CMD_GET_CONFIG reply's payload (after the genl header)."""
    found = {}
    offset = 4
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        if kind in (ATTR_TIMEOUT_TCP, ATTR_TIMEOUT_TCP_FIN, ATTR_TIMEOUT_UDP) and length >= 8:
            (found[kind],) = struct.unpack_from("=I", payload, offset + 4)
        offset += (length + 3) & ~3
    return found.get(ATTR_TIMEOUT_TCP, 0), found.get(ATTR_TIMEOUT_TCP_FIN, 0), found.get(ATTR_TIMEOUT_UDP, 0)
