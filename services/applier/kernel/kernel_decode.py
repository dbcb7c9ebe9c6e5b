"""Decoding the kernel's netlink dumps by hand, and the dump requests: pure (bytes in, values out).

The write side is encoded by hand (:mod:`.ipvs_wire`, :mod:`.ipset_wire`); this is the read side, for the
three dumps a read-back needs, each decoded straight from the attribute bytes with ``struct`` instead of
pyroute2's generic decoder (which builds a tree of Python objects per message: ~60 ms per IPVS service of
10 real servers in the project's guest, issue 22):

- IPVS (generic netlink, include/uapi/linux/ip_vs.h): IPVS_CMD_GET_SERVICE and, per service,
  IPVS_CMD_GET_DEST; the kernel's replies are built by ``ip_vs_genl_fill_service`` /
  ``ip_vs_genl_fill_dest`` (net/netfilter/ipvs/ip_vs_ctl.c): addresses are 16-byte ``nf_inet_addr``
  unions, ports big-endian, the 64-bit counters in IPVS_*_ATTR_STATS64;
- addresses (rtnetlink RTM_GETADDR, ``struct ifaddrmsg`` then IFA_* attributes);
- ipset members (nfnetlink IPSET_CMD_LIST, include/uapi/linux/netfilter/ipset/ip_set.h): one
  IPSET_ATTR_ADT per reply holding an IPSET_ATTR_DATA per member, printed in kube-proxy's entry syntax
  (the syntax ``ipset save`` prints and ``ipset_wire`` parses).

Every decoder checks lengths: an attribute that overruns its message raises :class:`DecodeError`.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from . import ipvs_wire, kernel_layouts
from .kernel_layouts import Runs, payloads_of
from .netlink_batch import attr

NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLA = struct.Struct("=HH")
_U16, _U32, _U64, _BE16 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q"), struct.Struct("!H")

# IPVS (include/uapi/linux/ip_vs.h)
CMD_GET_SERVICE, CMD_GET_DEST = 4, 8
SVC_FWMARK, SVC_STATS, SVC_STATS64 = 5, 10, 12
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_PERSIST_CONNS, DEST_STATS, DEST_STATS64 = 7, 8, 9, 10, 12
DEST_TUN_TYPE = 13  # u8: IP_VS_CONN_F_TUNNEL_TYPE_IPIP 0, _GUE 1, _GRE 2
STAT_NAMES = {1: "conns", 2: "inpkts", 3: "outpkts", 4: "inbytes", 5: "outbytes", 6: "cps", 7: "inpps",
              8: "outpps", 9: "inbps", 10: "outbps"}
# rtnetlink
RTM_NEWADDR, RTM_GETADDR, IFA_ADDRESS = 20, 22, 1
_IFADDRMSG = struct.Struct("=BBBBI")
# ipset
NFNL_SUBSYS_IPSET, IPSET_CMD_LIST, IPSET_PROTOCOL = 6, 7, 6
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_DATA, ATTR_ADT = 1, 2, 7, 8
ATTR_IP, ATTR_CIDR, ATTR_PORT, ATTR_PROTO, ATTR_IP2, ATTR_CIDR2 = 1, 3, 4, 7, 20, 21
IPADDR_IPV4, IPADDR_IPV6 = 1, 2
# nf_tables (include/uapi/linux/netfilter/nf_tables.h)
NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NFTA_GEN_ID = 10, 16, 1
PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 132: "sctp"}
IPVS_PROTOCOLS = {number: name.upper() for number, name in PROTOCOL_NAMES.items()}  # the plan's names


_COUNTERS = frozenset({SVC_STATS, SVC_STATS64, DEST_STATS, DEST_STATS64})  # where a fixed layout ends


class DecodeError(OSError):
    """A reply is not what the kernel's own encoder produces (an attribute overruns its message, a
    required attribute is missing): the message says which."""


def attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes from ``offset`` to the end of ``data``: type (flags masked off) -> payload. A later
    attribute of the same type wins. DecodeError if one overruns ``data``."""
    out: dict[int, bytes] = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            raise DecodeError(f"netlink attribute {kind & NLA_TYPE_MASK} of {length} bytes overruns its message "
                              f"({end - offset} bytes left)")
        out[kind & NLA_TYPE_MASK] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def attr_list(data: bytes) -> list[bytes]:
    """The payloads of every attribute in ``data`` in order (a nested list such as ipset's ADT)."""
    out = []
    offset, end = 0, len(data)
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            raise DecodeError(f"netlink attribute {kind & NLA_TYPE_MASK} of {length} bytes overruns its list")
        out.append(data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return out


def _need(found: dict[int, bytes], kind: int, what: str) -> bytes:
    try:
        return found[kind]
    except KeyError:
        raise DecodeError(f"{what} without attribute {kind}") from None


def _u32(found: dict[int, bytes], kind: int) -> int:
    raw = found.get(kind)
    return _U32.unpack(raw[:4])[0] if raw is not None and len(raw) >= 4 else 0


def _ip(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw[:16])


class Service(NamedTuple):
    """One IPVS virtual service as the kernel dumps it. Protocol-less (fwmark != 0) services have address
    "" and port 0. ``netmask`` is the raw be32 (an IPv6 service's holds a host-order prefix length, see
    :mod:`.ipvs_wire`); ``stats`` the raw nested counters (:func:`stats`); ``key`` the encoded
    IPVS_CMD_ATTR_SERVICE naming it (for its destinations' dump)."""

    family: int  # socket.AF_INET / AF_INET6
    protocol: int  # IPPROTO_*
    address: str
    port: int
    fwmark: int
    scheduler: str
    flags: int  # IP_VS_SVC_F_*
    timeout: int  # persistence, seconds
    netmask: bytes
    stats: bytes
    key: bytes


class Dest(NamedTuple):
    """One IPVS real server as the kernel dumps it (``forward``: IP_VS_CONN_F_* forwarding bits;
    ``tunnel``: the IP_VS_CONN_F_TUNNEL_TYPE_* of a tunnelled one)."""

    address: str
    port: int
    forward: int
    weight: int
    active: int
    inactive: int
    stats: bytes
    tunnel: int


def ipvs_dump_request(cmd: int, service_key: bytes = b"") -> bytes:
    """An IPVS dump request's payload (after the netlink header): GET_SERVICE, or GET_DEST of one service."""
    return struct.pack("=BBH", cmd, ipvs_wire.GENL_VERSION, 0) + service_key


def service(payload: bytes) -> Service:
    """One IPVS_CMD_NEW_SERVICE dump message's payload (after the netlink header): at this kernel's
    layout (:mod:`.kernel_layouts`, learned from the last message decoded attribute by attribute), else
    attribute by attribute."""
    if _service_layout:
        layout = _service_layout[0]
        v = kernel_layouts.read(layout, payload)
        if v is not None:
            nest, family, protocol, addr, port, scheduler, flags, timeout, netmask = v
            return Service(family, protocol, socket.inet_ntop(family, addr[:4] if family == socket.AF_INET else addr),
                           socket.ntohs(port), 0, _SCHEDULERS.get(scheduler) or _scheduler(scheduler), flags, timeout,
                           netmask, _Counters(payload[layout.end:4 + nest]), _KEY_HEAD + payload[8:_KEY_END])
    out = _service_general(payload)
    layout = kernel_layouts.learn(payload, _SERVICE_WANTED, _COUNTERS)
    # the key is the message's first four attributes as they are: only a layout that starts with them
    _service_layout[:] = [layout] if layout is not None and layout.expected[1:5] == _KEY_HEADERS else []
    return out


# IPVS_SVC_ATTR_* the fast path reads (ip_vs_genl_fill_service's order); the key's attributes' header words
_SERVICE_WANTED = {ipvs_wire.SVC_AF: "H", ipvs_wire.SVC_PROTOCOL: "H", ipvs_wire.SVC_ADDR: "16s",
                   ipvs_wire.SVC_PORT: "H", ipvs_wire.SVC_SCHED: "s", ipvs_wire.SVC_FLAGS: "I4x",
                   ipvs_wire.SVC_TIMEOUT: "I", ipvs_wire.SVC_NETMASK: "4s"}
_KEY_HEADERS = tuple(_U32.unpack(struct.pack("=HH", length, kind))[0] for length, kind in (
    (6, ipvs_wire.SVC_AF), (6, ipvs_wire.SVC_PROTOCOL), (20, ipvs_wire.SVC_ADDR), (6, ipvs_wire.SVC_PORT)))
_KEY_END = 8 + 8 + 8 + 20 + 8
_KEY_HEAD = struct.pack("=HH", 4 + _KEY_END - 8, ipvs_wire.ATTR_SERVICE)
_service_layout: list[kernel_layouts.Layout] = []
_SCHEDULERS: dict[bytes, str] = {}  # a scheduler attribute's bytes -> its name (few distinct)


def _scheduler(raw: bytes) -> str:
    name = raw.split(b"\0", 1)[0].decode(errors="replace")
    if len(_SCHEDULERS) < 64:
        _SCHEDULERS[raw] = name
    return name


def _service_general(payload: bytes) -> Service:
    found = attrs(_need(attrs(payload, 4), ipvs_wire.ATTR_SERVICE, "an IPVS service message"))
    af_raw = _need(found, ipvs_wire.SVC_AF, "an IPVS service")
    family = _U16.unpack(af_raw[:2])[0]
    fwmark = _u32(found, SVC_FWMARK)
    if fwmark:
        protocol, address, port = 0, "", 0
        key = attr(ipvs_wire.SVC_AF, af_raw) + attr(SVC_FWMARK, found[SVC_FWMARK])
    else:
        proto_raw = _need(found, ipvs_wire.SVC_PROTOCOL, "an IPVS service")
        addr_raw = _need(found, ipvs_wire.SVC_ADDR, "an IPVS service")
        port_raw = _need(found, ipvs_wire.SVC_PORT, "an IPVS service")
        protocol, address, port = _U16.unpack(proto_raw[:2])[0], _ip(family, addr_raw), _BE16.unpack(port_raw[:2])[0]
        key = (attr(ipvs_wire.SVC_AF, af_raw) + attr(ipvs_wire.SVC_PROTOCOL, proto_raw)
               + attr(ipvs_wire.SVC_ADDR, addr_raw) + attr(ipvs_wire.SVC_PORT, port_raw))
    flags = found.get(ipvs_wire.SVC_FLAGS, b"\0\0\0\0")
    return Service(family, protocol, address, port, fwmark,
                   _scheduler(found.get(ipvs_wire.SVC_SCHED, b"")),
                   _U32.unpack(flags[:4])[0], _u32(found, ipvs_wire.SVC_TIMEOUT),
                   found.get(ipvs_wire.SVC_NETMASK, b"\0\0\0\0")[:4],
                   found.get(SVC_STATS64) or found.get(SVC_STATS, b""), attr(ipvs_wire.ATTR_SERVICE, key))


def service_probe(protocol: int, ip: str, port: int) -> Service:
    """A Service naming (protocol, ip, port) for :func:`ipvs_dump_request` of its destinations, without
    dumping the services first (its other fields are empty)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return Service(family, protocol, ip, port, 0, "", 0, 0, b"", b"", ipvs_wire.service_key(protocol, ip, port))


# IPVS_DEST_ATTR_* the fast paths read, in ip_vs_genl_fill_dest's order: everything, or the weight alone
_DEST_WANTED = {ipvs_wire.DEST_ADDR: "16s", ipvs_wire.DEST_PORT: "H", ipvs_wire.DEST_FWD: "I",
                ipvs_wire.DEST_WEIGHT: "I", DEST_TUN_TYPE: "B", DEST_ACTIVE_CONNS: "I", DEST_INACT_CONNS: "I",
                ipvs_wire.DEST_FAMILY: "H"}
_WEIGHT_WANTED = {ipvs_wire.DEST_ADDR: "16s", ipvs_wire.DEST_PORT: "H", ipvs_wire.DEST_WEIGHT: "I",
                  ipvs_wire.DEST_FAMILY: "H"}
_dest_layout: list[kernel_layouts.Layout] = []
_weight_layout: list[kernel_layouts.Layout] = []


def dest(payload: bytes, family: int) -> Dest:
    """One IPVS_CMD_NEW_DEST dump message's payload; ``family`` is its service's (a real server of another
    family carries IPVS_DEST_ATTR_ADDR_FAMILY). Read at this kernel's layout (:mod:`.kernel_layouts`), or
    attribute by attribute when its headers differ (then its layout is learned)."""
    if _dest_layout:
        layout = _dest_layout[0]
        v = kernel_layouts.read(layout, payload)
        if v is not None:
            nest, raw, port, forward, weight, tunnel, active, inactive, own = v
            return Dest(socket.inet_ntop(own, raw[:4] if own == socket.AF_INET else raw), socket.ntohs(port),
                        forward, weight, active, inactive, _Counters(payload[layout.end:4 + nest]), tunnel)
    out = _dest_general(payload, family)
    _dest_layout[:] = [layout] if (layout := kernel_layouts.learn(payload, _DEST_WANTED, _COUNTERS)) is not None else []
    return out


def dests(runs: Runs, family: int) -> list[Dest]:
    """Every real server of one destination dump's replies (:meth:`~.netlink_dump.DumpSocket.dump_runs`),
    in order (:func:`dest`)."""
    return [dest(payload, family) for payload in payloads_of(runs)]


def dest_weights(runs: Runs, family: int) -> dict[tuple[str, int], int]:
    """(address, port) -> weight of one destination dump's replies (what the drift check compares). A
    run of same-length messages is read in two ``struct.iter_unpack`` passes when every message has the
    layout's header words (:func:`_run_weights`); any other message one by one at the layout, or by
    :func:`dest` when its headers differ (its layout is learned then)."""
    out: dict[tuple[str, int], int] = {}
    ntop, ntohs, v4 = socket.inet_ntop, socket.ntohs, socket.AF_INET
    for data, length in runs:
        layout = _weight_layout[0] if _weight_layout else None
        if layout is not None and len(data) > length and _run_weights(layout, data, length, out):
            continue
        for payload in payloads_of([(data, length)]):
            v = None if layout is None else kernel_layouts.read(layout, payload)
            if v is not None:
                _, raw, port, weight, own = v
                out[(ntop(own, raw[:4] if own == v4 else raw), ntohs(port))] = weight
                continue
            d = dest(payload, family)
            out[(d.address, d.port)] = d.weight
            layout = kernel_layouts.learn(payload, _WEIGHT_WANTED, _COUNTERS)
            _weight_layout[:] = [layout] if layout is not None else []
    return out


def _run_weights(layout: kernel_layouts.Layout, data: bytes, length: int, out: dict[tuple[str, int], int]) -> bool:
    """Every message of one run at ``layout`` into ``out``; False (``out`` untouched) unless all have its
    header words and an outer attribute that holds the fixed part."""
    readers = kernel_layouts.run_readers(layout, length)
    if readers is None:
        return False
    headers, values = readers
    first = headers.unpack_from(data)
    if not (first[1:] == layout.expected and layout.end <= 4 + first[0] <= length - 16
            and all(map(first.__eq__, headers.iter_unpack(data)))):
        return False
    ntop, ntohs, v4 = socket.inet_ntop, socket.ntohs, socket.AF_INET
    for _, raw, port, weight, own in values.iter_unpack(data):
        out[(ntop(own, raw[:4] if own == v4 else raw), ntohs(port))] = weight
    return True


class _Counters(bytes):
    """The attributes after a layout's plain ones (IPVS_*_ATTR_STATS, _STATS64), not decoded until asked."""


def _dest_general(payload: bytes, family: int) -> Dest:
    """Any attribute order and set (older kernels have no tunnel attributes)."""
    found = attrs(_need(attrs(payload, 4), ipvs_wire.ATTR_DEST, "an IPVS destination message"))
    own = found.get(ipvs_wire.DEST_FAMILY)
    if own is not None:
        family = _U16.unpack(own[:2])[0]
    return Dest(_ip(family, _need(found, ipvs_wire.DEST_ADDR, "an IPVS destination")),
                _BE16.unpack(_need(found, ipvs_wire.DEST_PORT, "an IPVS destination")[:2])[0],
                _u32(found, ipvs_wire.DEST_FWD), _u32(found, ipvs_wire.DEST_WEIGHT),
                _u32(found, DEST_ACTIVE_CONNS), _u32(found, DEST_INACT_CONNS),
                found.get(DEST_STATS64) or found.get(DEST_STATS, b""), found.get(DEST_TUN_TYPE, b"\0")[0])


def stats(raw: bytes) -> dict[str, int]:
    """IPVS counters (nested IPVS_STATS_ATTR_*, 32- or 64-bit each) by ``ipvsadm --stats`` name."""
    if isinstance(raw, _Counters):  # a message's undecoded tail: the 64-bit counters if there
        found = attrs(raw)
        raw = found.get(DEST_STATS64) or found.get(DEST_STATS, b"")
    out = {}
    for kind, value in attrs(raw).items():
        name = STAT_NAMES.get(kind)
        if name is not None:
            out[name] = _U64.unpack(value[:8])[0] if len(value) >= 8 else _U32.unpack(value[:4])[0]
    return out


def address_dump_request(index: int) -> bytes:
    """RTM_GETADDR dump payload: every family; ``index`` filters in kernels with strict checking on
    (NETLINK_GET_STRICT_CHK), and :func:`address` is given it too for kernels without."""
    return _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)


def address(payload: bytes) -> tuple[int, str] | None:
    """(interface index, address) of one RTM_NEWADDR message's payload; None without IFA_ADDRESS. The
    kernel puts IFA_ADDRESS first (``inet_fill_ifaddr``; ``inet6_fill_ifaddr`` without a peer): when the
    first attribute is one of the family's size, the rest is not walked."""
    if len(payload) < _IFADDRMSG.size:
        raise DecodeError(f"an address message of {len(payload)} bytes")
    family, _, _, _, index = _IFADDRMSG.unpack_from(payload)
    size = _ADDRESS_SIZES.get(family, 0)
    if size and len(payload) >= 12 + size and _NLA.unpack_from(payload, 8) == (4 + size, IFA_ADDRESS):
        return index, socket.inet_ntop(family, payload[12:12 + size])
    raw = attrs(payload, _IFADDRMSG.size).get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return index, _ip(family, raw)


_ADDRESS_SIZES = {socket.AF_INET: 4, socket.AF_INET6: 16}


def ipset_list_request(name: str) -> tuple[int, bytes]:
    """(netlink message type, payload) of ``ipset list NAME`` as a dump."""
    body = (struct.pack("=BBH", socket.AF_INET, 0, 0) + attr(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
            + attr(ATTR_SETNAME, name.encode() + b"\0"))
    return (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST, body


def nft_generation_request() -> tuple[int, bytes]:
    """(netlink message type, payload) of NFT_MSG_GETGEN: the netns's nf_tables ruleset generation."""
    return (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)


def nft_generation(payloads: list[bytes]) -> int:
    """The generation in the NFT_MSG_NEWGEN reply to :func:`nft_generation_request` (NFTA_GEN_ID, be32:
    ``nf_tables_fill_gen_info`` in net/netfilter/nf_tables_api.c). DecodeError without one."""
    for payload in payloads:
        raw = attrs(payload, 4).get(NFTA_GEN_ID)
        if raw is not None and len(raw) >= 4:
            return struct.unpack("!I", raw[:4])[0]
    raise DecodeError("an nf_tables generation reply without NFTA_GEN_ID")


def ipset_members(payload: bytes, set_type: str) -> list[str]:
    """The members in one IPSET_CMD_LIST reply's payload (after the netlink header), in kube-proxy's entry
    syntax for a set of ``set_type`` (hash:ip, hash:ip,port, hash:ip,port,ip, hash:ip,port,net,
    bitmap:port). The header message (no IPSET_ATTR_ADT) has none."""
    adt = attrs(payload, 4).get(ATTR_ADT)
    if adt is None:
        return []
    for shape in _MEMBER_SHAPES.get(set_type, ()):
        out = _members_at(shape, adt, set_type)
        if out is not None:
            return out
    return [_member(set_type, attrs(data)) for data in attr_list(adt)]


class _Shape(NamedTuple):
    """One fixed member layout (``hash_ipport4_data_list`` and kin in net/netfilter/ipset/: the nested
    address, then port and protocol; no extensions), read in network order: ``headers`` reads each
    attribute's header word, ``values`` (address, port, protocol) or (address,)."""

    family: int
    headers: struct.Struct
    values: struct.Struct
    with_port: bool


_MEMBER_SHAPES = {
    "hash:ip,port": (
        _Shape(socket.AF_INET, struct.Struct("!III4xI4xI4x"), struct.Struct("!12x4s4xH2x4xB3x"), True),
        _Shape(socket.AF_INET6, struct.Struct("!III16xI4xI4x"), struct.Struct("!12x16s4xH2x4xB3x"), True)),
    "hash:ip": (_Shape(socket.AF_INET, struct.Struct("!III4x"), struct.Struct("!12x4s"), False),
                _Shape(socket.AF_INET6, struct.Struct("!III16x"), struct.Struct("!12x16s"), False)),
}


def _members_at(shape: _Shape, adt: bytes, set_type: str) -> list[str] | None:
    """Every member of one reply's ADT list when all have the first member's header words, the first
    spans exactly ``shape``'s size and decodes attribute by attribute to what ``shape`` reads (so the
    header words mean what the shape assumes); None otherwise (the caller decodes member by member)."""
    size = shape.headers.size
    if not adt or len(adt) % size or _NLA.unpack_from(adt)[0] != size:
        return None
    first = shape.headers.unpack_from(adt)
    if not all(map(first.__eq__, shape.headers.iter_unpack(adt))):
        return None
    ntop, family, names = socket.inet_ntop, shape.family, PROTOCOL_NAMES
    if shape.with_port:
        out = [f"{ntop(family, ip)},{names.get(proto) or proto}:{port}"
               for ip, port, proto in shape.values.iter_unpack(adt)]
    else:
        out = [ntop(family, ip) for (ip,) in shape.values.iter_unpack(adt)]
    return out if out[0] == _member(set_type, attrs(adt[4:size])) else None


def _member(set_type: str, found: dict[int, bytes]) -> str:
    port = _BE16.unpack(found[ATTR_PORT][:2])[0] if ATTR_PORT in found else 0
    if set_type == "bitmap:port":
        return str(port)
    ip = _nested_ip(_need(found, ATTR_IP, "an ipset member"))
    if set_type == "hash:ip":
        return ip
    proto = found.get(ATTR_PROTO, b"\0")[0]
    out = f"{ip},{PROTOCOL_NAMES.get(proto, str(proto))}:{port}"
    if set_type == "hash:ip,port,ip":
        out += "," + _nested_ip(_need(found, ATTR_IP2, "an ipset member"))
    elif set_type == "hash:ip,port,net":
        cidr = found.get(ATTR_CIDR2, b"\0")[0]
        out += f",{_nested_ip(_need(found, ATTR_IP2, 'an ipset member'))}/{cidr}"
    return out


def _nested_ip(raw: bytes) -> str:
    found = attrs(raw)
    if IPADDR_IPV4 in found:
        return socket.inet_ntop(socket.AF_INET, found[IPADDR_IPV4][:4])
    if IPADDR_IPV6 in found:
        return socket.inet_ntop(socket.AF_INET6, found[IPADDR_IPV6][:16])
    raise DecodeError("an ipset address without IPSET_ATTR_IPADDR_IPV4/IPV6")
