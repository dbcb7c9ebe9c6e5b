"""Netlink requests sent many per system call, acknowledgements read without the event loop.

The kernel executes a generic-netlink (IPVS) or nfnetlink (ipset) request inside the ``send`` that carries
it and queues its acknowledgement before ``send`` returns, so a batch is: one non-blocking ``send`` of
every encoded request, then draining the acknowledgements already waiting on the socket (an event-loop
wait happens only if the kernel has not queued them all, which it does not do for these families).
``NETLINK_CAP_ACK`` keeps each acknowledgement at 36 bytes instead of echoing the whole request.

Encoding is in :mod:`.ipvs_wire` and :mod:`.ipset_wire` (include/uapi/linux/ip_vs.h, netfilter/ipset).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

NETLINK_GENERIC, NETLINK_NETFILTER = 16, 12
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_RCVBUFFORCE = 33
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
_HEADER = struct.Struct("=IHHII")
_ACK = struct.Struct("=IHHIIi")


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type, length, payload padded to 4 bytes)."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def header(length: int, kind: int, seq: int) -> bytes:
    return _HEADER.pack(16 + length, kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)


class BatchError(Exception):
    """The kernel refused request ``index`` of a batch with errno ``code`` (the others were executed)."""

    def __init__(self, index: int, code: int) -> None:
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"request {index} of the batch failed: {os.strerror(code)} ({name})")
        self.index = index
        self.code = code


async def recv_datagram(sock: socket.socket, buffer: bytearray) -> int:
    """One netlink datagram into ``buffer`` (its size in bytes): at once when one is queued, else when the
    event loop sees the non-blocking socket readable."""
    try:
        return sock.recv_into(buffer)
    except BlockingIOError:
        return await asyncio.get_running_loop().sock_recv_into(sock, buffer)


class BatchSocket:
    """A netlink socket of one protocol that writes batches of already-encoded requests."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        # Every acknowledgement is its own buffer (about 1 KiB of receive-buffer accounting each), queued
        # before we read any: the receive buffer bounds the batch. SO_RCVBUFFORCE (CAP_NET_ADMIN, which the
        # applier has) passes net.core.rmem_max; without it the kernel caps SO_RCVBUF there.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        #: requests per send whose acks surely fit the receive buffer
        self.batch_limit = max(16, min(1024, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2048))
        with contextlib.suppress(OSError):  # older kernels echo each request in its ack: larger reads only
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.buffer = bytearray(1 << 20)  # reused: a fresh 1 MiB bytes per recv costs more than the syscall
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self.seq = 0

    def reserve(self, count: int) -> int:
        """Sequence numbers for ``count`` requests: returns the first (they are consecutive, wrapping)."""
        first = (self.seq + 1) & 0xFFFFFFFF
        self.seq = (self.seq + count) & 0xFFFFFFFF
        return first

    async def send(self, messages: list[bytes], first_seq: int, tolerated: frozenset[int] = frozenset()) -> None:
        """Send ``messages`` (sequence numbers first_seq, first_seq + 1, ...) and collect every ack.
        Errors whose errno is in ``tolerated`` count as success. Raises BatchError naming the first request
        the kernel refused otherwise."""
        data = b"".join(messages)
        sent = 0
        while sent < len(data):
            try:
                sent += self.sock.send(data[sent:])
            except BlockingIOError:
                await asyncio.get_running_loop().sock_sendall(self.sock, data[sent:])
                sent = len(data)
        pending = len(messages)
        failure: BatchError | None = None
        buffer = self.buffer
        while pending:
            size = await recv_datagram(self.sock, buffer)
            offset = 0
            while offset + 20 <= size:
                length, kind, _, seq, _, code = _ACK.unpack_from(buffer, offset)
                if kind == NLMSG_ERROR:
                    pending -= 1
                    if code and -code not in tolerated and failure is None:
                        failure = BatchError((seq - first_seq) & 0xFFFFFFFF, -code)
                offset += (length + 3) & ~3
        if failure is not None:
            raise failure

    async def query(self, kind: int, body: bytes) -> bytes:
        """One request that the kernel answers with one message (not a dump): that message's payload.
        OSError with the errno when the kernel refuses it."""
        seq = self.reserve(1)
        self.sock.send(_HEADER.pack(16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body)
        while True:
            size = await recv_datagram(self.sock, self.buffer)
            offset = 0
            while offset + 16 <= size:
                length, reply_kind, _, reply_seq, _ = _HEADER.unpack_from(self.buffer, offset)
                if reply_seq == seq:
                    if reply_kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", self.buffer, offset + 16)
                        raise OSError(-code, os.strerror(-code))
                    return bytes(self.buffer[offset + 16:offset + length])
                offset += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()
