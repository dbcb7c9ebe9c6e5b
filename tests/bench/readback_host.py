"""The read-back's pure-Python cost on the host (issue 22): kipvs's own ``kernel_readback.observe`` over
dumps laid out as Linux 6.1 builds them, from a stand-in netlink socket, so that the guest's time can be
split into the kernel's part and ours, and ours profiled where timings are stable.

The stand-in (:class:`ReplayKernel`) answers each dump request as the kernel does (net/netlink/af_netlink.c
``netlink_dump``): the replies packed into reply buffers of at most ``SKB_BYTES``, one buffer per
``recv``, NLMSG_DONE in a buffer of its own after a non-empty dump. The messages follow
``ip_vs_genl_fill_service`` / ``ip_vs_genl_fill_dest`` (net/netfilter/ipvs/ip_vs_ctl.c), ``inet_fill_ifaddr``
(net/ipv4/devinet.c) and the ipset list's ``mtype_list`` (net/netfilter/ipset/ip_set_hash_gen.h): the
plain attributes first in the kernel's order, then the nested counters.

``python -m tests.bench.readback_host --services 10000 --endpoints 10 [--profile]``: the read's seconds
(first read: every message decoded; second: the memos at work), and with ``--profile`` cProfile's top
functions of the first read. A figure, never asserted."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import struct
import time
from collections import deque

from services.applier.kernel import ipset_wire, kernel_decode, kernel_readback
from services.applier.kernel.backend import OWNED_SETS
from services.applier.kernel.kernel_readback import KernelReader
from services.applier.kernel.netlink_batch import NLA_F_NESTED, attr
from services.applier.kernel.netlink_read_back import TYPES_BY_NAME

IPVS_FAMILY = 0x1C  # any generic-netlink id: the stand-in answers it as IPVS
LINK_INDEX = 7
SKB_BYTES = 32768 - 320  # SKB_WITH_OVERHEAD(32768): the most one dump buffer holds (netlink_recvmsg)
_HEADER = struct.Struct("=IHHII")
GENL = struct.pack("=BBH", 1, 1, 0)


def _counters(kind: int, wide: bool) -> bytes:
    """IPVS_*_ATTR_STATS (u32 each) or _STATS64 (u64 each), nested (``ip_vs_genl_fill_stats``)."""
    fmt = "=Q" if wide else "=I"
    return attr(kind, b"".join(attr(i, struct.pack(fmt, i * 3)) for i in range(1, 11)))  # nla_nest_start_noflag


def service_message(ip: str, port: int) -> bytes:
    """One IPVS_CMD_NEW_SERVICE payload: TCP ``ip``:``port``, rr, as ``ip_vs_genl_fill_service`` lays it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    inner = (attr(1, struct.pack("=H", family)) + attr(2, struct.pack("=H", socket.IPPROTO_TCP))
             + attr(3, socket.inet_pton(family, ip).ljust(16, b"\0")) + attr(4, struct.pack("!H", port))
             + attr(6, b"rr\0") + attr(7, struct.pack("=II", 0, 0xFFFFFFFF)) + attr(8, struct.pack("=I", 0))
             + attr(9, b"\xff\xff\xff\xff") + _counters(10, False) + _counters(12, True))
    return GENL + attr(1 | NLA_F_NESTED, inner)


def dest_message(ip: str, port: int, weight: int, active: int = 0, inactive: int = 0) -> bytes:
    """One IPVS_CMD_NEW_DEST payload, as Linux 6.1's ``ip_vs_genl_fill_dest`` lays it out."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    inner = (attr(1, socket.inet_pton(family, ip).ljust(16, b"\0")) + attr(2, struct.pack("!H", port))
             + attr(3, struct.pack("=I", 0)) + attr(4, struct.pack("=I", weight)) + attr(13, b"\0")
             + attr(14, b"\0\0") + attr(15, b"\0\0") + attr(5, b"\0" * 4) + attr(6, b"\0" * 4)
             + attr(7, struct.pack("=I", active)) + attr(8, struct.pack("=I", inactive)) + attr(9, b"\0" * 4)
             + attr(11, struct.pack("=H", family)) + _counters(10, False) + _counters(12, True))
    return GENL + attr(2 | NLA_F_NESTED, inner)


def address_message(ip: str, index: int) -> bytes:
    """One RTM_NEWADDR payload of a /32 on ``index`` (``inet_fill_ifaddr``)."""
    raw = socket.inet_pton(socket.AF_INET, ip)
    return (struct.pack("=BBBBI", socket.AF_INET, 32, 0x80, 0, index) + attr(1, raw) + attr(2, raw)
            + attr(3, b"kube-ipvs0\0") + attr(8, struct.pack("=I", 0x80)) + attr(6, b"\xff" * 8 + b"\0" * 8))


def ipset_messages(name: str, set_type: str, members: list[str]) -> list[bytes]:
    """IPSET_CMD_LIST payloads of one set: the header, then ADT messages as full as a buffer allows."""
    head = struct.pack("=BBH", socket.AF_INET, 0, 0) + attr(1, b"\x06") + attr(2, name.encode() + b"\0")
    out = [head + attr(3, set_type.encode() + b"\0") + attr(4, b"\x04") + attr(5, b"\x02")]
    batch: list[bytes] = []
    for member in members:
        batch.append(ipset_wire.data(set_type, member))
        if sum(map(len, batch)) > SKB_BYTES - 200:
            out.append(head + attr(8 | NLA_F_NESTED, b"".join(batch)))
            batch = []
    if batch:
        out.append(head + attr(8 | NLA_F_NESTED, b"".join(batch)))
    return out


class ReplayKernel:
    """A netlink socket's stand-in holding one node's IPVS table, kube-ipvs0 addresses and ipsets."""

    def __init__(self, services: int, endpoints: int) -> None:
        self.services = [service_message(f"10.96.{i // 250}.{i % 250 + 1}", 80) for i in range(services)]
        self.dests = {kernel_decode.service(m).key: [
            dest_message(f"10.{64 + i // 250 % 64}.{i % 250}.{e + 1}", 8080, 1) for e in range(endpoints)]
            for i, m in enumerate(self.services)}
        self.addresses = [address_message(f"10.96.{i // 250}.{i % 250 + 1}", LINK_INDEX) for i in range(services)]
        entries = [f"10.96.{i // 250}.{i % 250 + 1},tcp:80" for i in range(services)]
        self.sets = {"KUBE-CLUSTER-IP": ipset_messages("KUBE-CLUSTER-IP", "hash:ip,port", entries),
                     OWNED_SETS[4]: ipset_messages(OWNED_SETS[4], "hash:ip,port", entries),
                     "KUBE-IPVS-IPS": ipset_messages("KUBE-IPVS-IPS", "hash:ip", [e.split(",")[0] for e in entries])}
        self.queue: deque[bytes] = deque()
        self.own_s = 0.0  # CPU seconds spent in this stand-in (not kipvs's), measured around each call

    def answer(self, kind: int, body: bytes) -> list[bytes]:
        """The reply payloads of one request (None: no such set)."""
        if kind == IPVS_FAMILY:
            return self.services if body[0] == kernel_decode.CMD_GET_SERVICE else self.dests.get(body[4:], [])
        if kind == kernel_decode.RTM_GETADDR:
            return self.addresses
        name = kernel_decode.attrs(body, 4)[kernel_decode.ATTR_SETNAME].rstrip(b"\0").decode()
        return self.sets.get(name, ipset_messages(name, TYPES_BY_NAME.get(name, "hash:ip"), []))

    def send(self, data: bytes) -> int:
        started = time.process_time()
        _, kind, _, seq, _ = _HEADER.unpack_from(data)
        buffer = b""
        for payload in self.answer(kind, data[16:]):
            message = _HEADER.pack(16 + len(payload), 0x10, 0x2, seq, 0) + payload
            if len(buffer) + len(message) > SKB_BYTES:
                self.queue.append(buffer)
                buffer = b""
            buffer += message
        if buffer:
            self.queue.append(buffer)
        self.queue.append(_HEADER.pack(20, 3, 0x2, seq, 0) + b"\0" * 4)  # NLMSG_DONE
        self.own_s += time.process_time() - started
        return len(data)

    def recv_into(self, buffer: bytearray) -> int:
        started = time.process_time()
        data = self.queue.popleft()
        buffer[:len(data)] = data
        self.own_s += time.process_time() - started
        return len(data)

    def close(self) -> None:
        pass


def reader_on(kernel: ReplayKernel) -> KernelReader:
    reader = KernelReader(IPVS_FAMILY)
    for dump_socket in (reader.genl, reader.nfnl, reader.route):
        dump_socket.sock.close()
        dump_socket.sock = kernel  # type: ignore[assignment]
    return reader


async def observe(reader: KernelReader) -> kernel_readback.Observed:
    return await kernel_readback.observe(reader, LINK_INDEX, TYPES_BY_NAME, tuple(OWNED_SETS.values()))


async def measure(services: int, endpoints: int, profile: cProfile.Profile | None) -> None:
    """Two whole reads of one node's kernel (the first decodes everything, the second meets the memos)."""
    kernel = ReplayKernel(services, endpoints)
    reader = reader_on(kernel)
    times = []
    for n in range(2):
        kernel.own_s = 0.0
        started = time.process_time()
        if profile is not None and n == 0:
            profile.enable()
        observed = await observe(reader)
        if profile is not None and n == 0:
            profile.disable()
        times.append(time.process_time() - started - kernel.own_s)
    reals = sum(len(vs.reals) for vs in observed.state.ipvs.values())
    print(f"host read back of {services:,} x {endpoints}: {len(observed.state.ipvs):,} services, {reals:,} real "
          f"servers, {len(observed.state.addresses):,} addresses; CPU of the first read {times[0]:.3f} s, of the "
          f"second (memos) {times[1]:.3f} s (the stand-in socket's own CPU left out)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.readback_host", description=__doc__)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="cProfile the first read")
    args = parser.parse_args(argv)
    profile = cProfile.Profile() if args.profile else None
    asyncio.run(measure(args.services, args.endpoints, profile))
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
