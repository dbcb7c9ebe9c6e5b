"""ipset member changes encoded directly (nfnetlink, include/uapi/linux/netfilter/ipset/ip_set.h), for
:class:`.netlink_batch.BatchSocket`: the entry syntax is kube-proxy's (``10.96.0.10,tcp:80``,
``10.244.1.5,tcp:8080,10.244.1.5``, ``203.0.113.5,tcp:80,192.0.2.0/24``, ``30080``).

Many members of one set go in one request, as ``ipset restore`` sends them (libipset session.c: an
IPSET_ATTR_ADT nest of IPSET_ATTR_DATA entries, with IPSET_ATTR_LINENO, which the kernel requires beside
it): the kernel's ``ip_set_ad`` (net/netfilter/ipset/ip_set_core.c) runs ``call_ad`` on each entry in
order and returns at the first refused one, so the entries before it are applied and those after it are
not. Our requests never set NLM_F_EXCL, so ``flag_exist`` gives every entry IPSET_FLAG_EXIST: adding a
present member or deleting an absent one succeeds (``ipset -exist``), and replaying a request is harmless."""

from __future__ import annotations

import socket
import struct

from .netlink_batch import NLA_F_NESTED, NLA_F_NET_BYTEORDER, attr

NFNL_SUBSYS_IPSET = 6
IPSET_CMD_ADD, IPSET_CMD_DEL = 9, 10
IPSET_PROTOCOL = 6
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_DATA, ATTR_ADT, ATTR_LINENO = 1, 2, 7, 8, 9
ATTR_IP, ATTR_CIDR, ATTR_PORT, ATTR_PROTO, ATTR_IP2, ATTR_CIDR2 = 1, 3, 4, 7, 20, 21
IPADDR_IPV4, IPADDR_IPV6 = 1, 2
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
# ipset's "element already exists" / "does not exist" (IPSET_ERR_EXIST) and the plain errnos: the member
# is as wanted, not an error.
IPSET_ERR_EXIST = 4103
# ipset's own error codes (include/uapi/linux/netfilter/ipset/ip_set.h, ip_set_hash.h, ip_set_bitmap.h:
# a type's codes start at IPSET_ERR_TYPE_SPECIFIC, 4352), named and said as ipset(8) says them
ERROR_NAMES = {4097: "IPSET_ERR_PROTOCOL", 4098: "IPSET_ERR_FIND_TYPE", 4099: "IPSET_ERR_MAX_SETS",
               4100: "IPSET_ERR_BUSY", 4102: "IPSET_ERR_TYPE_MISMATCH", 4103: "IPSET_ERR_EXIST",
               4104: "IPSET_ERR_INVALID_CIDR", 4106: "IPSET_ERR_INVALID_FAMILY",
               4352: "IPSET_ERR_HASH_FULL or IPSET_ERR_BITMAP_RANGE",
               4353: "IPSET_ERR_HASH_ELEM", 4354: "IPSET_ERR_INVALID_PROTO", 4355: "IPSET_ERR_MISSING_PROTO"}
ERROR_TEXTS = {4097: "kernel and ipset protocol versions differ", 4098: "set type not supported by the kernel",
               4099: "the kernel's maximum number of sets is reached", 4100: "the set is in use",
               4102: "the set's type is not the one asked for", 4103: "element exists or is missing",
               4104: "invalid CIDR", 4106: "wrong address family for this set",
               4352: "the set is full (a hash at its maxelem) or the entry is outside a bitmap's range",
               4353: "element of the wrong type for this set",
               4354: "invalid protocol", 4355: "protocol missing"}
# The IPSET_ATTR_DATA bytes of one request: the IPSET_ATTR_ADT nest's length is 16 bits (65,535 bytes); a
# hash:ip,port member takes 32 bytes, so 1,024 per request.
ADT_BYTES = 32 << 10


def _ip(kind: int, ip: str) -> bytes:
    if ":" in ip:
        inner = attr(IPADDR_IPV6 | NLA_F_NET_BYTEORDER, socket.inet_pton(socket.AF_INET6, ip))
    else:
        inner = attr(IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_pton(socket.AF_INET, ip))
    return attr(kind | NLA_F_NESTED, inner)


def _port(port: str) -> bytes:
    return attr(ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port)))


# An IPv4 hash:ip,port member (KUBE-CLUSTER-IP and the ownership sets: most of a node's members) in one
# pack: the IPSET_ATTR_DATA nest, the address nest and its IPv4 attribute, the port (network order: given
# as htons), the protocol.
_IP_PORT_V4 = struct.Struct("=HHHHHH4sHHH2xHHB3x")


def data(set_type: str, entry: str) -> bytes:
    """The IPSET_ATTR_DATA attribute for one member of a set of ``set_type``; ValueError, KeyError,
    IndexError, OSError or OverflowError if malformed."""
    if set_type == "hash:ip,port" and ":" not in entry.partition(",")[0]:
        ip, _, rest = entry.partition(",")
        protocol, _, port = rest.partition(":")
        return _IP_PORT_V4.pack(32, ATTR_DATA | NLA_F_NESTED, 12, ATTR_IP | NLA_F_NESTED, 8,
                                IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_pton(socket.AF_INET, ip), 6,
                                ATTR_PORT | NLA_F_NET_BYTEORDER, socket.htons(int(port)), 5, ATTR_PROTO,
                                PROTOCOLS[protocol.lower()])
    if set_type == "bitmap:port":
        inner = _port(entry)
    elif set_type == "hash:ip":
        inner = _ip(ATTR_IP, entry)
    else:
        parts = entry.split(",")
        protocol, _, port = parts[1].partition(":")
        inner = _ip(ATTR_IP, parts[0]) + _port(port) + attr(ATTR_PROTO, bytes([PROTOCOLS[protocol.lower()]]))
        if set_type == "hash:ip,port,ip":
            inner += _ip(ATTR_IP2, parts[2])
        elif set_type == "hash:ip,port,net":
            net, _, prefix = parts[2].partition("/")
            inner += _ip(ATTR_IP2, net) + attr(ATTR_CIDR2, bytes([int(prefix or (128 if ":" in net else 32))]))
    return attr(ATTR_DATA | NLA_F_NESTED, inner)


def request(add: bool, set_name: str, family: int, data_attr: bytes) -> tuple[int, bytes]:
    """(netlink message type, payload) of one member change; ``family`` is socket.AF_INET or AF_INET6."""
    kind, head = _head(add, set_name, family)
    return kind, head + data_attr


def _head(add: bool, set_name: str, family: int) -> tuple[int, bytes]:
    return ((NFNL_SUBSYS_IPSET << 8) | (IPSET_CMD_ADD if add else IPSET_CMD_DEL),
            struct.pack("=BBH", family, 0, 0) + attr(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
            + attr(ATTR_SETNAME, set_name.encode() + b"\0"))


def requests(changes: list[tuple[bool, str, int, bytes]]) -> tuple[list[tuple[int, bytes]], list[int]]:
    """The requests making member ``changes`` ((add, set name, family, IPSET_ATTR_DATA attribute), in
    order): each run of changes alike (same set, all adds or all deletes) in requests of up to ADT_BYTES of
    entries, a lone change as :func:`request` encodes it. Returns the (message type, payload) requests and,
    for each, the index in ``changes`` of its first change."""
    out: list[tuple[int, bytes]] = []
    starts: list[int] = []
    start = 0
    while start < len(changes):
        add, name, family, _ = changes[start]
        end, size = start + 1, len(changes[start][3])
        while (end < len(changes) and changes[end][0] == add and changes[end][1] == name
               and size + len(changes[end][3]) <= ADT_BYTES):
            size += len(changes[end][3])
            end += 1
        if end - start == 1:
            out.append(request(add, name, family, changes[start][3]))
        else:
            kind, head = _head(add, name, family)
            entries = b"".join(change[3] for change in changes[start:end])
            out.append((kind, head + attr(ATTR_LINENO, struct.pack("=I", 0)) + attr(ATTR_ADT | NLA_F_NESTED, entries)))
        starts.append(start)
        start = end
    return out, starts
