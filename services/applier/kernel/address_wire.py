"""kube-ipvs0 address changes encoded directly (rtnetlink RTM_NEWADDR / RTM_DELADDR, include/uapi/linux/
if_addr.h), for :class:`.netlink_batch.BatchSocket`: a node of 10,000 Services has 10,000 of them, written
many per ``send`` as IPVS and ipset changes are. The message is what ``ip addr add|del IP/32 dev LINK``
sends (iproute2 ``ipaddr_modify``): an ``ifaddrmsg`` with the prefix length and link index, then IFA_LOCAL
and IFA_ADDRESS both holding the address, scope global."""

from __future__ import annotations

import errno
import socket
import struct

from .netlink_batch import attr

RTM_NEWADDR, RTM_DELADDR = 20, 21
IFA_ADDRESS, IFA_LOCAL = 1, 2
# Adding an address that is there, or deleting one that is not: the address is as wanted, not an error.
BENIGN = frozenset({errno.EEXIST, errno.EADDRNOTAVAIL})


def request(add: bool, ip: str, index: int) -> tuple[int, bytes]:
    """(netlink message type, payload) adding or deleting ``ip`` (/32 or /128) on link ``index``.
    ValueError (OSError from inet_pton) for a malformed address."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    body = (struct.pack("=BBBBI", family, 128 if family == socket.AF_INET6 else 32, 0, 0, index)
            + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))
    return (RTM_NEWADDR if add else RTM_DELADDR), body
