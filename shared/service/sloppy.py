"""Addresses as kube-proxy reads them: k8s.io/utils/net ``ParseIPSloppy`` and ``ParseCIDRSloppy``. Pure.

Before Kubernetes 1.20 the API server accepted IPv4 addresses with leading zeros (``10.96.011.012``), and
objects created then still exist (CVE-2021-29923; kubernetes issues 100895 and 108074; KEP-4858). Go's
old parser, which ``ParseIPSloppy`` keeps (utils/net/ipv4.go ``parseIPv4``, forked from Go 1.16), reads
each dotted part as *decimal* whatever its leading zeros: ``011`` is 11, not octal 9. kube-proxy reads
every address field this way (pkg/proxy/serviceport.go ``newBaseServiceInfo``; endpointslicecache.go;
pkg/util/node ``GetNodeHostIPs``), so kipvs does too, and says which field was read so.

Python's parsers (``inet_pton``, ``ipaddress``) refuse such addresses; the canonical forms go through them
first and only what they refuse is read sloppily.

IPv4-mapped IPv6 forms (``::ffff:10.96.0.19``) are IPv4 to kube-proxy: Go's ``net.ParseIP`` gives the
16-byte form, whose ``To4()`` is not nil, so every family decision (``utilnet.IsIPv6``) and every rendered
address (``IP.String``) is IPv4. ``ParseCIDRSloppy("::ffff:a.b.c.d/96+n")`` likewise prints and matches as
``a.b.c.d/n`` (net/ip.go ``networkNumberAndMask``). Such forms are read as IPv4 and flagged like the
leading-zero ones; IPv4-*compatible* ones (``::a.b.c.d``) stay IPv6, as in Go.
"""

from __future__ import annotations

import ipaddress
import socket


def _ipv4_sloppy(text: str) -> str | None:
    """Go 1.16's parseIPv4: four dot-separated decimal parts, each 0-255, leading zeros allowed."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    values = [int(p, 10) for p in parts]
    if any(v > 255 for v in values):
        return None
    return ".".join(str(v) for v in values)


V4_IN_V6 = b"\0" * 10 + b"\xff\xff"  # Go's v4InV6Prefix


def parse_ip(text: str) -> tuple[str, bool] | None:
    """``(canonical address, read sloppily)``, or None when it is no address even to kube-proxy.
    ``'10.96.011.012'`` -> ``('10.96.11.12', True)``; ``'::ffff:10.96.0.19'`` -> ``('10.96.0.19', True)``;
    ``'fd00:0::a'`` -> ``('fd00::a', False)``."""
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            if packed[:12] == V4_IN_V6:
                return socket.inet_ntop(socket.AF_INET, packed[12:]), True
            return socket.inet_ntop(socket.AF_INET6, packed), False
        socket.inet_pton(socket.AF_INET, text)  # glibc accepts only canonical dotted quads
        return text, False
    except (OSError, ValueError):
        pass
    if ":" in text:
        return None
    sloppy = _ipv4_sloppy(text)
    return (sloppy, True) if sloppy is not None else None


def parse_cidr(text: str) -> tuple[str, bool] | None:
    """``(canonical network, read sloppily)``, or None. As Go's ``ParseCIDR`` (which ``ParseCIDRSloppy``
    keeps), host bits are masked off: ``'10.0.01.7/24'`` -> ``('10.0.1.0/24', True)``. An IPv4-mapped
    network whose mask keeps the ``::ffff`` prefix is IPv4: ``'::ffff:198.51.100.0/120'`` ->
    ``('198.51.100.0/24', True)``; a shorter mask masks the prefix away and leaves IPv6, as in Go."""
    address, slash, prefix = text.partition("/")
    if not slash or not prefix.isascii() or not prefix.isdigit():
        return None
    if ":" in address:
        return _parse_cidr6(address, int(prefix, 10))
    ip = parse_ip(address)
    if ip is None:
        return None
    try:
        return str(ipaddress.ip_network(f"{ip[0]}/{int(prefix, 10)}", strict=False)), ip[1]
    except ValueError:
        return None


def _parse_cidr6(address: str, prefix: int) -> tuple[str, bool] | None:
    try:
        network = ipaddress.IPv6Network((socket.inet_pton(socket.AF_INET6, address), prefix), strict=False)
    except (OSError, ValueError):
        return None
    mapped = network.network_address.ipv4_mapped
    if mapped is not None and network.prefixlen >= 96:
        return f"{mapped}/{network.prefixlen - 96}", True
    return str(network), False
