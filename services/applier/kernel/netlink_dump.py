"""Netlink dumps read without the event loop: the read side of :class:`.netlink_batch.BatchSocket`.

The kernel runs a dump inside the system calls of the reader: the ``send`` of the request builds the first
reply buffer, and each ``recv`` that takes one builds the next (``netlink_dump`` in
net/netlink/af_netlink.c, called from ``netlink_dump_start`` and ``netlink_recvmsg``). So a dump costs a
``send`` and one ``recv`` per reply buffer plus one for NLMSG_DONE, none of which waits, and decoding the
bytes is the only Python work (:mod:`.kernel_decode`). A socket holds one dump at a time: a second dump
request sent before the first one's NLMSG_DONE has been built is refused with EBUSY
(``netlink_dump_start``: ``if (nlk->cb_running) ret = -EBUSY``; measured in the guest with three IPVS
destination dumps in one ``send``), so many dumps are pipelined back to back on one socket, never
together in one ``send``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct

from .kernel_layouts import Runs, payloads_of
from .netlink_batch import BatchSocket, recv_datagram

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x4, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE, NLMSG_MIN_TYPE = 2, 3, 0x10  # below NLMSG_MIN_TYPE: control messages
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
_HEADER = struct.Struct("=IHHII")
_CODE = struct.Struct("=i")
# One dump's bound. The largest kipvs reads: 10,000 IPVS services (about 2 MB of replies), an ipset of
# 100,000 members (about 6 MB), 250 real servers of one service (about 90 kB).
DUMP_MAX_BYTES = 64 << 20
# One reply buffer: the kernel builds a dump's at most SKB_WITH_OVERHEAD(32768) bytes (netlink_recvmsg caps
# max_recvmsg_len there) and a reply to a plain request is one small message; a reply that fills the
# buffer may have been cut short and is an error (EMSGSIZE), never read as data.
DUMP_BUFFER_BYTES = 64 << 10
DUMP_RETRIES = 3  # a dump the kernel marks interrupted (NLM_F_DUMP_INTR: the table changed under it) is redone


_RUN_HEADERS: dict[int, struct.Struct] = {}  # message length -> a Struct reading a message's header


def _uniform(buffer: bytearray, size: int, seq: int) -> bool:
    """Whether the ``size`` bytes in ``buffer`` are two or more data messages of dump ``seq``, all with the
    first one's header (so none ends the dump, and each is as long as the first)."""
    length, kind, _, first_seq, _ = _HEADER.unpack_from(buffer)
    if first_seq != seq or length < 20 or length % 4 or size % length or size == length or kind < NLMSG_MIN_TYPE:
        return False
    reader = _RUN_HEADERS.get(length)
    if reader is None:
        reader = _RUN_HEADERS.setdefault(length, struct.Struct(f"=IHHII{length - 16}x"))
    first = reader.unpack_from(buffer)
    return all(map(first.__eq__, reader.iter_unpack(memoryview(buffer)[:size])))


class DumpError(OSError):
    """The kernel refused a dump (errno and strerror as OSError), or its reply broke a bound."""


class DumpSocket(BatchSocket):
    """A netlink socket of one protocol that reads dumps (and, being a BatchSocket, can write batches)."""

    def __init__(self, protocol: int) -> None:
        super().__init__(protocol)
        self.buffer = bytearray(DUMP_BUFFER_BYTES)  # instead of the batch writer's 1 MiB (resident: it is zeroed)
        self.view = memoryview(self.buffer)
        if protocol == NETLINK_ROUTE:
            # Lets RTM_GETADDR filter by interface index in the kernel (Linux 4.20+); harmless where absent.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)

    async def dump(self, kind: int, body: bytes, max_bytes: int = DUMP_MAX_BYTES) -> list[bytes]:
        """Every reply message's payload (after its netlink header) of one dump request of message type
        ``kind``. Raises DumpError with the kernel's errno when it refuses the request (ENOENT: no such
        object), or when the replies exceed ``max_bytes``; a dump interrupted by a change is redone."""
        return payloads_of(await self.dump_runs(kind, body, max_bytes))

    async def dump_runs(self, kind: int, body: bytes, max_bytes: int = DUMP_MAX_BYTES) -> Runs:
        """:meth:`dump`'s replies as runs: (bytes, length) where the bytes are one or more whole netlink
        messages (headers included) of that same length each; a reply buffer whose messages all have the
        first one's header (the same length, type, flags and sequence: none is NLMSG_DONE) is one run,
        checked in one ``struct.iter_unpack`` pass, not message by message."""
        for _ in range(DUMP_RETRIES):
            runs, interrupted = await self._dump_once(kind, body, max_bytes)
            if not interrupted:
                return runs
        raise DumpError(errno.EAGAIN, f"the dump of type {kind} was interrupted by changes {DUMP_RETRIES} times")

    async def request(self, kind: int, body: bytes, max_bytes: int = 1 << 16) -> list[bytes]:
        """Every reply message's payload of one plain (not dump) request, asked with NLM_F_ACK so that the
        kernel's acknowledgement ends the replies (``netlink_rcv_skb`` acks after the handler's unicast
        reply). Raises DumpError as :meth:`dump` does."""
        runs, _ = await self._dump_once(kind, body, max_bytes, NLM_F_REQUEST | NLM_F_ACK)
        return payloads_of(runs)

    async def _dump_once(self, kind: int, body: bytes, max_bytes: int,
                         flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> tuple[Runs, bool]:
        seq = self.reserve(1)
        self.sock.send(_HEADER.pack(16 + len(body), kind, flags, seq, 0) + body)
        runs: Runs = []
        interrupted = False
        total = 0
        buffer, view, unpack = self.buffer, self.view, _HEADER.unpack_from
        while True:
            size = await recv_datagram(self.sock, buffer)
            total += size
            if size >= len(buffer):  # filled: maybe cut short (not drained: its DONE may have been cut off too;
                # what is left of it is skipped by later reads, whose sequence numbers differ)
                raise DumpError(errno.EMSGSIZE, f"a netlink reply of {size} bytes or more to a request of type {kind}")
            if total > max_bytes:
                await self._drain(seq)
                raise DumpError(errno.EMSGSIZE, f"a dump of type {kind} is larger than {max_bytes} bytes")
            if _uniform(buffer, size, seq):
                runs.append((bytes(view[:size]), unpack(buffer)[0]))
                interrupted |= bool(unpack(buffer)[2] & NLM_F_DUMP_INTR)
                continue
            offset = 0
            while offset + 16 <= size:
                length, reply_kind, flags, reply_seq, _ = unpack(buffer, offset)
                if length < 16 or offset + length > size:
                    raise DumpError(errno.EBADMSG, f"a netlink message of {length} bytes in a read of {size}")
                if reply_seq == seq:
                    if reply_kind == NLMSG_DONE:
                        return runs, interrupted
                    if reply_kind == NLMSG_ERROR:
                        (code,) = _CODE.unpack_from(buffer, offset + 16)
                        if code:
                            raise DumpError(-code, os.strerror(-code))
                        return runs, interrupted
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    runs.append((bytes(view[offset:offset + length]), length))  # one copy (a bytearray slice is two)
                offset += (length + 3) & ~3

    async def _drain(self, seq: int) -> None:
        """Read a dump we gave up on to its end, so that the socket can take the next one."""
        while True:
            size = await recv_datagram(self.sock, self.buffer)
            offset = 0
            while offset + 16 <= size:
                length, reply_kind, _, reply_seq, _ = _HEADER.unpack_from(self.buffer, offset)
                if reply_seq == seq and reply_kind in (NLMSG_DONE, NLMSG_ERROR):
                    return
                offset += max((length + 3) & ~3, 16)
