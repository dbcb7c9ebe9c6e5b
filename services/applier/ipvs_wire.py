"""IPVS write requests encoded directly (generic netlink, include/uapi/linux/ip_vs.h) and sent in batches.

pyroute2 builds and tracks each request in Python objects (~180 us a message here); the applier writes
thousands, so the write path encodes the few message shapes it needs with ``struct`` and sends many per
system call on a plain netlink socket, then reads one acknowledgement per message. pyroute2 still resolves
the IPVS family id and does every read (dumps).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
GENL_VERSION = 1

CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE = 1, 2, 3
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST = 5, 6, 7
ATTR_SERVICE, ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 1, 2, 3, 4, 6, 7, 8, 9
DEST_ADDR, DEST_PORT, DEST_FWD, DEST_WEIGHT, DEST_UTHRESH, DEST_LTHRESH, DEST_FAMILY = 1, 2, 3, 4, 5, 6, 11
PERSISTENT = 0x1
MASQUERADE = 0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _addr(ip: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return family, socket.inet_pton(family, ip)


def service_key(protocol: int, ip: str, port: int) -> bytes:
    family, raw = _addr(ip)
    return (_attr(SVC_AF, struct.pack("=H", family)) + _attr(SVC_PROTOCOL, struct.pack("=H", protocol))
            + _attr(SVC_ADDR, raw) + _attr(SVC_PORT, struct.pack("!H", port)))


def service_full(protocol: int, ip: str, port: int, scheduler: str, timeout: int) -> bytes:
    family, _ = _addr(ip)
    # For IPv6 the kernel reads this be32 attribute's raw bytes as a host-order prefix length (as ipvsadm
    # writes it with nla_put_u32): pack 128 natively, not in network order.
    netmask = struct.pack("=I", 128) if family == socket.AF_INET6 else b"\xff\xff\xff\xff"
    return (service_key(protocol, ip, port) + _attr(SVC_SCHED, scheduler.encode() + b"\0")
            + _attr(SVC_FLAGS, struct.pack("=II", PERSISTENT if timeout else 0, 0xFFFFFFFF))
            + _attr(SVC_TIMEOUT, struct.pack("=I", timeout)) + _attr(SVC_NETMASK, netmask))


def dest(ip: str, port: int, weight: int | None) -> bytes:
    family, raw = _addr(ip)
    out = _attr(DEST_ADDR, raw) + _attr(DEST_PORT, struct.pack("!H", port))
    if weight is not None:  # a full entry (new / set); a delete names the server only
        out += (_attr(DEST_FWD, struct.pack("=I", MASQUERADE)) + _attr(DEST_WEIGHT, struct.pack("=I", weight))
                + _attr(DEST_UTHRESH, struct.pack("=I", 0)) + _attr(DEST_LTHRESH, struct.pack("=I", 0))
                + _attr(DEST_FAMILY, struct.pack("=H", family)))
    return out


def message(family_id: int, seq: int, cmd: int, service: bytes, dest_attrs: bytes | None = None) -> bytes:
    body = struct.pack("=BBH", cmd, GENL_VERSION, 0) + _attr(ATTR_SERVICE, service)
    if dest_attrs is not None:
        body += _attr(ATTR_DEST, dest_attrs)
    return struct.pack("=IHHII", 16 + len(body), family_id, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class BatchError(Exception):
    def __init__(self, index: int, code: int) -> None:
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"request {index} of the batch failed: {os.strerror(code)} ({name})")
        self.index = index
        self.code = code


class IPVSWriter:
    """A netlink socket for IPVS writes: send many requests at once, then collect every acknowledgement."""

    def __init__(self, family_id: int) -> None:
        self.family_id = family_id
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self.seq = 0

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    async def send(self, messages: list[bytes], first_seq: int) -> None:
        """Send ``messages`` (sequence numbers first_seq, first_seq + 1, ...) and wait for every ack.
        Raises BatchError naming the first request the kernel refused (the others were still executed)."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, b"".join(messages))
        pending = len(messages)
        failure: BatchError | None = None
        while pending:
            data = await loop.sock_recv(self.sock, 1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    pending -= 1
                    if code and failure is None:
                        failure = BatchError((seq - first_seq) & 0xFFFFFFFF, -code)
                offset += (length + 3) & ~3
        if failure is not None:
            raise failure

    def close(self) -> None:
        self.sock.close()
