"""The dump decoders' pure parts (services/applier/kernel/kernel_decode.py) on hand-built replies: the kernel's own
output is checked in the guest (tests/guest/kernel_readback.py); here, the shapes and the errors."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import pytest

from services.applier.kernel import ipset_wire, ipvs_wire, kernel_decode
from services.applier.kernel.decode_memo import DecodeMemo
from services.applier.kernel.netlink_batch import NETLINK_GENERIC, attr
from services.applier.kernel.netlink_dump import DumpSocket

GENL = struct.pack("=BBH", 1, 1, 0)


def test_service_and_its_key_from_a_dump_message() -> None:
    svc = ipvs_wire.service_full(socket.IPPROTO_TCP, "fd00::10", 443, "wrr", 600)
    decoded = kernel_decode.service(GENL + svc)
    assert (decoded.family, decoded.protocol, decoded.address, decoded.port) == (socket.AF_INET6, 6, "fd00::10", 443)
    assert (decoded.scheduler, decoded.flags & 1, decoded.timeout) == ("wrr", 1, 600)
    assert decoded.key == ipvs_wire.service_key(socket.IPPROTO_TCP, "fd00::10", 443)


def test_a_real_server_of_the_other_family_keeps_its_own() -> None:
    raw = ipvs_wire.dest("10.244.1.5", 8080, 3)  # carries IPVS_DEST_ATTR_ADDR_FAMILY
    decoded = kernel_decode.dest(GENL + raw, socket.AF_INET6)
    assert (decoded.address, decoded.port, decoded.weight, decoded.forward) == ("10.244.1.5", 8080, 3, 0)


def test_ipset_members_in_kube_proxy_syntax() -> None:
    entries = ["10.96.0.10,tcp:80,192.0.2.0/24", "fd00::1,sctp:3868,fd00::2/64"]
    adt = b"".join(ipset_wire.data("hash:ip,port,net", e) for e in entries)
    payload = struct.pack("=BBH", 2, 0, 0) + attr(kernel_decode.ATTR_ADT, adt)
    assert kernel_decode.ipset_members(payload, "hash:ip,port,net") == entries
    assert kernel_decode.ipset_members(struct.pack("=BBH", 2, 0, 0), "hash:ip") == []  # the header message


def test_ipset_members_at_the_fixed_shape_and_off_it() -> None:
    """A reply whose members all have the kernel's fixed shape is read in one pass; a member laid out
    otherwise (port and protocol swapped, an extension such as a timeout), in one member or in all, sends
    the whole reply through the member-by-member decoder."""
    def swapped(entry: str) -> bytes:  # the same attributes and sizes, port and protocol in the other order
        inner = ipset_wire.data("hash:ip,port", entry)[4:]
        return attr(kernel_decode.ATTR_DATA | 0x8000, inner[:12] + inner[20:] + inner[12:20])

    def reply(*members: bytes) -> bytes:
        return struct.pack("=BBH", 2, 0, 0) + attr(kernel_decode.ATTR_ADT | 0x8000, b"".join(members))

    v4 = ["10.96.0.1,tcp:80", "10.96.0.2,udp:53", "10.96.0.3,sctp:3868"]
    plain = [ipset_wire.data("hash:ip,port", e) for e in v4]
    timeout = attr(kernel_decode.ATTR_DATA | 0x8000, plain[1][4:] + attr(6 | 0x4000, struct.pack("!I", 300)))
    for members in [plain, [plain[0], swapped(v4[1]), plain[2]], [swapped(e) for e in v4],
                    [plain[0], timeout, plain[2]]]:
        assert kernel_decode.ipset_members(reply(*members), "hash:ip,port") == v4
    v6 = ["fd00::1,tcp:443", "fd00::2,udp:53"]
    assert kernel_decode.ipset_members(reply(*(ipset_wire.data("hash:ip,port", e) for e in v6)), "hash:ip,port") == v6
    ips = ["10.96.0.1", "fd00::1"]
    for ip in ips:
        assert kernel_decode.ipset_members(reply(ipset_wire.data("hash:ip", ip)), "hash:ip") == [ip]


def test_an_address_whatever_its_first_attribute() -> None:
    """IFA_ADDRESS first (the kernel's usual order) is read directly; otherwise (an IPv6 address with a
    peer: IFA_LOCAL first) the attributes are walked, and IFA_ADDRESS it is."""
    def message(family: int, index: int, *attributes: bytes) -> bytes:
        return struct.pack("=BBBBI", family, 32, 0, 0, index) + b"".join(attributes)

    v4 = socket.inet_pton(socket.AF_INET, "10.96.0.1")
    local, peer = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert kernel_decode.address(message(socket.AF_INET, 7, attr(1, v4), attr(2, v4), attr(3, b"kube-ipvs0\0"))) \
        == (7, "10.96.0.1")
    assert kernel_decode.address(message(socket.AF_INET6, 3, attr(2, local), attr(1, peer))) == (3, "fd00::2")
    assert kernel_decode.address(message(socket.AF_INET6, 3, attr(1, local))) == (3, "fd00::1")
    assert kernel_decode.address(message(socket.AF_INET, 3, attr(2, v4))) is None
    with pytest.raises(kernel_decode.DecodeError):
        kernel_decode.address(message(socket.AF_INET, 3, attr(3, b"x")[:2] + b"\xff\x00"))


def test_an_attribute_overrunning_its_message_is_an_error() -> None:
    svc = ipvs_wire.service_full(socket.IPPROTO_UDP, "10.96.0.10", 53, "rr", 0)
    with pytest.raises(kernel_decode.DecodeError, match="overruns"):
        kernel_decode.service(GENL + svc[:-6])
    with pytest.raises(kernel_decode.DecodeError, match="without attribute"):
        kernel_decode.service(GENL + attr(ipvs_wire.ATTR_SERVICE, attr(ipvs_wire.SVC_AF, b"\2\0")))


def kernel_dest(ip: str, port: int, weight: int, active: int, order: tuple[int, ...] | None = None) -> bytes:
    """A destination message laid out as Linux 6.1's ip_vs_genl_fill_dest lays it out (or in ``order``)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip).ljust(16, b"\0")
    counters = b"".join(attr(i, struct.pack("=Q", i)) for i in range(1, 11))
    plain = {1: attr(1, raw), 2: attr(2, struct.pack("!H", port)), 3: attr(3, struct.pack("=I", 0)),
             4: attr(4, struct.pack("=I", weight)), 13: attr(13, b"\0"), 14: attr(14, b"\0\0"),
             15: attr(15, b"\0\0"), 5: attr(5, b"\0" * 4), 6: attr(6, b"\0" * 4),
             7: attr(7, struct.pack("=I", active)), 8: attr(8, struct.pack("=I", 2)), 9: attr(9, b"\0" * 4),
             11: attr(11, struct.pack("=H", family))}
    # the counters as the kernel nests them: nla_nest_start_noflag
    inner = b"".join(plain[k] for k in order or plain) + attr(10, counters) + attr(12, counters)
    return GENL + attr(2 | 0x8000, inner)


def test_destinations_decode_alike_on_the_learned_layout_and_off_it() -> None:
    first = kernel_dest("10.244.1.5", 8080, 3, 7)
    general = kernel_decode.dest(first, socket.AF_INET)  # decoded attribute by attribute; teaches the layout
    assert kernel_decode._dest_layout
    for message, want in [(first, ("10.244.1.5", 8080, 3, 7, 2)),
                          (kernel_dest("fd00::5", 443, 1, 0), ("fd00::5", 443, 1, 0, 2)),
                          (kernel_dest("10.244.1.6", 80, 9, 1, order=(2, 1, 4, 3, 7, 8, 11)),
                           ("10.244.1.6", 80, 9, 1, 2))]:
        d = kernel_decode.dest(message, socket.AF_INET)
        assert (d.address, d.port, d.weight, d.active, d.inactive) == want
        assert kernel_decode.stats(d.stats)["outbps"] == 10
    fast = kernel_decode.dest(first, socket.AF_INET)
    assert fast[:6] == general[:6] and kernel_decode.stats(fast.stats) == kernel_decode.stats(general.stats)


def kernel_service(ip: str, port: int, scheduler: str, timeout: int, order: tuple[int, ...] | None = None) -> bytes:
    """A service message laid out as Linux 6.1's ip_vs_genl_fill_service lays it out (or in ``order``)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    counters = b"".join(attr(i, struct.pack("=Q", i)) for i in range(1, 11))
    plain = {1: attr(1, struct.pack("=H", family)), 2: attr(2, struct.pack("=H", socket.IPPROTO_TCP)),
             3: attr(3, socket.inet_pton(family, ip).ljust(16, b"\0")), 4: attr(4, struct.pack("!H", port)),
             6: attr(6, scheduler.encode() + b"\0"), 7: attr(7, struct.pack("=II", 1 if timeout else 0, 0xFFFFFFFF)),
             8: attr(8, struct.pack("=I", timeout)), 9: attr(9, b"\xff\xff\xff\x00")}
    # the counters as the kernel nests them: nla_nest_start_noflag
    inner = b"".join(plain[k] for k in order or plain) + attr(10, counters) + attr(12, counters)
    return GENL + attr(1, inner)


def test_services_decode_alike_at_the_learned_layout_and_off_it() -> None:
    """The first message teaches the layout; one whose headers differ (another scheduler's name length, two
    same-sized attributes swapped, a firewall-mark service) is decoded attribute by attribute."""
    first = kernel_service("10.96.0.1", 80, "rr", 0)
    kernel_decode.service(first)
    assert kernel_decode._service_layout, "a kernel-shaped service message teaches its layout"
    for message, want in [
            (first, ("10.96.0.1", 80, "rr", 0)),
            (kernel_service("fd00::1", 443, "rr", 600), ("fd00::1", 443, "rr", 600)),
            (kernel_service("10.96.0.2", 53, "wlc", 0), ("10.96.0.2", 53, "wlc", 0)),
            (kernel_service("10.96.0.1", 80, "rr", 0), ("10.96.0.1", 80, "rr", 0)),  # learnt again
            (kernel_service("10.96.0.3", 80, "rr", 300, order=(1, 2, 3, 4, 6, 7, 9, 8)), ("10.96.0.3", 80, "rr", 300))]:
        decoded = kernel_decode.service(message)
        assert (decoded.address, decoded.port, decoded.scheduler, decoded.timeout) == want
        assert decoded.netmask == b"\xff\xff\xff\x00"
        family = socket.AF_INET6 if ":" in want[0] else socket.AF_INET
        assert decoded.key == attr(1, attr(1, struct.pack("=H", family)) + attr(2, struct.pack("=H", 6))
                                   + attr(3, socket.inet_pton(family, want[0]).ljust(16, b"\0"))
                                   + attr(4, struct.pack("!H", want[1]))), "the key names the service as dumped"
        assert kernel_decode.stats(decoded.stats)["outbps"] == 10
    fwmark = GENL + attr(1, attr(1, struct.pack("=H", socket.AF_INET)) + attr(5, struct.pack("=I", 7))
                         + attr(6, b"rr\0") + attr(7, struct.pack("=II", 0, 0xFFFFFFFF)) + attr(8, b"\0" * 4)
                         + attr(9, b"\xff" * 4))
    assert kernel_decode.service(fwmark)[:6] == (socket.AF_INET, 0, "", 0, 7, "rr")
    with pytest.raises(kernel_decode.DecodeError):  # cut inside the fixed part: not read at the layout
        kernel_decode.service(kernel_service("10.96.0.1", 80, "rr", 0)[:40])


def runs(*payloads: bytes, together: bool = False) -> list[tuple[bytes, int]]:
    """Dump replies as DumpSocket.dump_runs gives them: each message its own run, or (``together``, all
    of one length) one run of them all."""
    messages = [struct.pack("=IHHII", 16 + len(p), 0x1C, 2, 1, 0) + p for p in payloads]
    if together:
        return [(b"".join(messages), len(messages[0]))]
    return [(m, len(m)) for m in messages]


def test_real_server_weights_at_the_learned_layout_and_off_it() -> None:
    """``dest_weights`` (the drift check's decode) reads the three attributes at the layout, a run of
    same-length messages in one pass; a message whose headers differ (weight and forwarding method
    swapped, an older kernel's shorter list), alone or inside a run, is read attribute by attribute, and
    a message too short for the layout is an error, not a guess."""
    messages = [kernel_dest("10.244.1.5", 8080, 3, 7), kernel_dest("fd00::5", 443, 1, 0),
                kernel_dest("10.244.1.6", 80, 9, 1, order=(1, 2, 4, 3, 13, 14, 15, 5, 6, 7, 8, 9, 11)),
                kernel_dest("10.244.1.7", 80, 4, 0, order=(1, 2, 3, 4, 5, 6, 7, 8, 9, 11)),
                kernel_dest("10.244.1.8", 80, 5, 0)]
    want = {("10.244.1.5", 8080): 3, ("fd00::5", 443): 1, ("10.244.1.6", 80): 9, ("10.244.1.7", 80): 4,
            ("10.244.1.8", 80): 5}
    assert kernel_decode.dest_weights(runs(*messages), socket.AF_INET) == want
    assert kernel_decode.dest_weights(runs(*messages), socket.AF_INET) == want, "again, at the layout learnt last"
    assert kernel_decode._weight_layout
    same_length = [messages[0], messages[1], messages[2], messages[4]]  # the third's headers differ
    assert kernel_decode.dest_weights(runs(messages[0]), socket.AF_INET) == {("10.244.1.5", 8080): 3}
    for batch in (same_length, [messages[0], messages[1], messages[4]]):
        assert kernel_decode.dest_weights(runs(*batch, together=True), socket.AF_INET) == {
            (d.address, d.port): d.weight for d in (kernel_decode.dest(m, socket.AF_INET) for m in batch)}
    with pytest.raises(kernel_decode.DecodeError):
        kernel_decode.dest_weights(runs(messages[0][:60]), socket.AF_INET)
    short_outer = messages[0][:4] + struct.pack("=H", 8) + messages[0][6:]  # holds less than the fixed part
    for batch in (runs(short_outer), runs(messages[0], short_outer, together=True),
                  runs(short_outer, short_outer, together=True)):
        kernel_decode.dest_weights(runs(messages[0]), socket.AF_INET)  # the layout learnt again
        with pytest.raises(kernel_decode.DecodeError):
            kernel_decode.dest_weights(batch, socket.AF_INET)


def test_a_memo_decodes_only_messages_not_in_the_last_read() -> None:
    def message(i: int, counter: int = 0) -> bytes:
        svc = ipvs_wire.service_full(socket.IPPROTO_TCP, f"10.96.0.{i}", 80, "rr", 0)
        stats = attr(kernel_decode.SVC_STATS64 | 0x8000, attr(1, struct.pack("=Q", counter)))
        return GENL + attr(ipvs_wire.ATTR_SERVICE, svc[4:] + stats)

    memo = DecodeMemo(kernel_decode.service)
    first = [message(i) for i in range(1, 101)]
    assert memo(first) == [kernel_decode.service(p) for p in first] and memo.decoded == 100
    assert memo([bytes(bytearray(p)) for p in first]) == memo(first) and memo.decoded == 100, "same bytes: no decode"
    second = [*first[:50], message(51, counter=7), *first[51:]]
    assert memo(second)[50].stats == attr(1, struct.pack("=Q", 7)) and memo.decoded == 101, "the one that changed"
    assert len(memo.last) == 100, "only the last read is kept"
    with pytest.raises(kernel_decode.DecodeError):
        memo([*first, b"\x01\x01\x00\x00\xff\x00\x01\x00"])
    assert list(memo.last) == second, "a bad read leaves the memo as it was"


class _Replies:
    """A netlink socket's stand-in: answers any request with the given reply buffers, one per recv."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def send(self, data: bytes) -> int:
        return len(data)

    def recv_into(self, buffer: bytearray) -> int:
        data = self.datagrams.pop(0)
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def test_dump_runs_take_a_reply_buffer_whole_only_when_it_holds_nothing_but_same_shaped_data() -> None:
    """A buffer of same-length data messages of this dump is one run; NLMSG_DONE after data in the same
    buffer (kernels that append it), or a message of another sequence number, sends the buffer through
    the message-by-message walk, which ends the dump at DONE and skips the stranger."""
    def message(kind: int, seq: int, payload: bytes) -> bytes:
        return struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + payload

    dump = DumpSocket(NETLINK_GENERIC)
    dump.sock.close()
    try:
        for case in ("one run", "DONE appended", "a stranger"):
            seq = dump.seq + 1  # the next dump's
            data = [message(0x1C, seq, GENL + attr(1, struct.pack("=I", n))) for n in range(3)]
            done = message(3, seq, b"\0" * 4)
            if case == "one run":
                dump.sock = _Replies(b"".join(data), done)  # type: ignore[assignment]
                assert asyncio.run(dump.dump_runs(0x1C, b"")) == [(b"".join(data), len(data[0]))]
            elif case == "DONE appended":
                dump.sock = _Replies(b"".join(data) + done)  # type: ignore[assignment]
                assert asyncio.run(dump.dump_runs(0x1C, b"")) == [(m, len(m)) for m in data]
            else:
                stranger = message(0x1C, seq + 5, GENL + attr(1, struct.pack("=I", 7)))
                dump.sock = _Replies(data[0] + stranger + data[2], done)  # type: ignore[assignment]
                assert asyncio.run(dump.dump(0x1C, b"")) == [data[0][16:], data[2][16:]]
    finally:
        dump.close()


def test_a_reply_buffer_that_fills_the_read_buffer_is_an_error_not_data() -> None:
    """A reply as large as the read buffer may have been cut short (recv keeps what fits): the dump fails
    with EMSGSIZE instead of returning the messages that fitted as if they were all."""
    dump = DumpSocket(NETLINK_GENERIC)
    dump.sock.close()
    try:
        seq = dump.seq + 1
        message = struct.pack("=IHHII", 64, 0x1C, 2, seq, 0) + b"\0" * 48
        full = message * (len(dump.buffer) // 64)
        dump.sock = _Replies(full, struct.pack("=IHHII", 20, 3, 2, seq, 0) + b"\0" * 4)  # type: ignore[assignment]
        with pytest.raises(OSError) as refused:
            asyncio.run(dump.dump_runs(0x1C, b""))
        assert refused.value.errno == errno.EMSGSIZE
    finally:
        dump.close()
