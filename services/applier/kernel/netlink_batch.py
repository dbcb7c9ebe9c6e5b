"""Netlink requests sent many per system call, only the last of each send acknowledged.

The kernel executes a generic-netlink (IPVS), nfnetlink (ipset) or rtnetlink (address) request inside the
``send`` that carries it: ``netlink_unicast_kernel`` runs the family's input (``genl_rcv``,
``nfnetlink_rcv``, ``rtnetlink_rcv``) in the sender's context, and each of them hands the datagram to
``netlink_rcv_skb`` (net/netlink/af_netlink.c), which runs its messages one after the other, in order, and
answers a message with an NLMSG_ERROR "if (nlh->nlmsg_flags & NLM_F_ACK || err)": a refused request is
reported whether or not it asked for an acknowledgement, and a refusal does not stop the messages after it.
So a batch is: one ``send`` of every encoded request, none asking for an acknowledgement but the last (the
barrier); then reading the replies until the barrier's: every refusal before it is already queued, in
order, naming its request by sequence number. The kernel builds and queues one acknowledgement per batch
instead of one per request, and we parse one (each costs tens of microseconds in the QEMU guest).
``NETLINK_CAP_ACK`` keeps an acknowledgement at 36 bytes instead of echoing the whole request.

Bounds: a send holds at most ``batch_limit`` requests (every one could be refused, and each refusal takes
about 1 KiB of receive buffer) and at most ``send_limit`` bytes (``netlink_sendmsg`` refuses a datagram
larger than the send buffer with EMSGSIZE).

Encoding is in :mod:`.ipvs_wire`, :mod:`.ipset_wire` and :mod:`.address_wire`.
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
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.batch_limit = max(16, min(1024, rcvbuf // 2048))
        #: bytes per send: under the send buffer (netlink_sendmsg: EMSGSIZE above sk_sndbuf - 32), and half
        #: the receive buffer, since a refusal may echo its whole request (ipset's, ip_set_core.c call_ad)
        self.send_limit = min(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64, rcvbuf // 2)
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

    async def write(self, requests: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
        """Execute ``requests`` ((netlink message type, payload), in order), as few sends as the bounds allow;
        returns (index in ``requests``, errno) of every request the kernel refused, in order (the others
        were executed: a refusal does not stop the batch). OSError if the socket fails."""
        refused: list[tuple[int, int]] = []
        start, total = 0, len(requests)
        while start < total:
            first = (self.seq + 1) & 0xFFFFFFFF
            parts: list[bytes] = []
            size, end, stop = 0, start, min(total, start + self.batch_limit)
            while end < stop:  # one pass: bounds, numbers and headers (the last one's redone below)
                kind, body = requests[end]
                size += 16 + len(body)
                if size > self.send_limit and end > start:
                    break
                parts += (_HEADER.pack(16 + len(body), kind, NLM_F_REQUEST, (first + end - start) & 0xFFFFFFFF, 0),
                          body)
                end += 1
            last = end - start - 1
            kind, body = requests[end - 1]
            parts[-2] = _HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, (first + last) & 0xFFFFFFFF, 0)
            self.seq = (first + last) & 0xFFFFFFFF
            refused += [(start + index, code) for index, code in await self._exchange(b"".join(parts), first, last)]
            start = end
        return refused

    async def send(self, requests: list[tuple[int, bytes]], tolerated: frozenset[int] = frozenset()) -> None:
        """:meth:`write`, then BatchError naming the first refused request whose errno is not in
        ``tolerated`` (a tolerated refusal counts as success)."""
        for index, code in await self.write(requests):
            if code not in tolerated:
                raise BatchError(index, code)

    async def _exchange(self, data: bytes, first: int, last: int) -> list[tuple[int, int]]:
        """One send of ``data``, requests numbered ``first`` to ``first + last``, only the last acknowledged
        (the barrier); the refusals (index from ``first``, errno), read up to the barrier's reply (the
        kernel queued every one before it: see the module docstring)."""
        sent = 0
        while sent < len(data):
            try:
                sent += self.sock.send(data[sent:])
            except BlockingIOError:
                await asyncio.get_running_loop().sock_sendall(self.sock, data[sent:])
                sent = len(data)
        refused: list[tuple[int, int]] = []
        buffer = self.buffer
        while True:
            size = await recv_datagram(self.sock, buffer)
            offset = 0
            while offset + 20 <= size:
                length, kind, _, seq, _, code = _ACK.unpack_from(buffer, offset)
                index = (seq - first) & 0xFFFFFFFF
                # index > last: a reply to an earlier batch abandoned half-read (a cancelled task)
                if kind == NLMSG_ERROR and index <= last:
                    if code:
                        refused.append((index, -code))
                    if index == last:
                        return refused
                offset += max((length + 3) & ~3, 20)

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
