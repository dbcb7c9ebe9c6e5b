"""Conntrack entries deleted over netlink (pyroute2's conntrack), never the ``conntrack`` binary."""

from __future__ import annotations

import errno
import logging
import socket

from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple
from pyroute2.netlink.exceptions import NetlinkError

from shared.plan.node_state import RealKey, VSKey

from .ipvs_wire import PROTOCOL_NUMBERS

log = logging.getLogger("kipvs.applier")


async def clear_conntrack(flows: list[tuple[VSKey, RealKey | None]]) -> int:
    """Delete the conntrack entries of UDP/SCTP flows to a virtual service whose reply came from a real
    server that left it (real None: the whole virtual service left), as kube-proxy does after a sync:
    a client's next datagram is then load-balanced again instead of following the stale entry.
    Returns how many entries were deleted. Over netlink (pyroute2's conntrack), never the binary."""
    deleted = 0
    sockets: dict[int, AsyncConntrack] = {}
    try:
        for (protocol, vip, port), real in flows:
            number = PROTOCOL_NUMBERS[protocol]
            family = socket.AF_INET6 if ":" in vip else socket.AF_INET
            if family not in sockets:
                sockets[family] = AsyncConntrack(nfgen_family=family)
                await sockets[family].__aenter__()
            ct = sockets[family]
            orig = NFCTAttrTuple(family=family, proto=number, daddr=vip, dport=port)
            reply = NFCTAttrTuple(family=family, proto=number, saddr=real[0], sport=real[1]) if real else None
            entries = [entry async for entry in await ct.dump_entries(tuple_orig=orig, tuple_reply=reply)]
            for entry in entries:
                try:
                    await ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # gone by itself meanwhile: as wanted
                        log.warning("could not delete a conntrack entry of %s %s:%d: %s", protocol, vip, port, exc)
    finally:
        for ct in sockets.values():
            ct.close()
    return deleted
