"""Decoding a dump message at the fixed layout its kernel's fill function always writes. Pure.

The kernel builds every message of one kind with the same code: ``ip_vs_genl_fill_service`` and
``ip_vs_genl_fill_dest`` (net/netfilter/ipvs/ip_vs_ctl.c) put the same plain attributes, in the same order
and of the same sizes, before the nested counters of every service and every real server. So the
attribute-by-attribute decoder (:mod:`.kernel_decode`) runs once, on the first message, and a
:class:`Layout` learned from it reads every later message with two ``struct`` calls: one that reads
each attribute's header (length and type) as one word and is compared with the learned ones as one tuple,
and one that reads only the values wanted, skipping the rest. A message whose headers differ (another
scheduler name's length, a firewall-mark service, a kernel that orders them otherwise) is not read at
the layout: its caller decodes it attribute by attribute and learns its layout instead. Nothing is
assumed that a message does not show: every header word of the fixed part is checked, and the outer
attribute must hold that part (its length is read, not assumed).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

_NLA, _WORD = struct.Struct("=HH"), struct.Struct("=I")
Runs = list[tuple[bytes, int]]  # (whole netlink messages, each's length): netlink_dump.DumpSocket.dump_runs


def payloads_of(runs: Runs) -> list[bytes]:
    """Every message's payload (after its 16-byte netlink header) in ``runs``."""
    return [data[offset + 16:offset + length] for data, length in runs for offset in range(0, len(data), length)]
NLA_F_NESTED = 0x8000


class Layout(NamedTuple):
    """One message kind's fixed part: ``headers.unpack_from(payload) == expected`` says a message has it;
    then ``values.unpack_from(payload)`` through ``pick`` is (outer attribute's length, then each wanted
    attribute's value in the order ``wanted`` names them), and the fixed part ends at ``end`` (the
    counters start there)."""

    headers: struct.Struct
    expected: tuple[int, ...]
    values: struct.Struct
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None  # None: the message has them in that order
    end: int


def learn(payload: bytes, wanted: dict[int, str], ends: frozenset[int]) -> Layout | None:
    """The layout of ``payload`` (a generic netlink message's payload: 4-byte genl header, then one
    attribute holding plain attributes, then the counters), reading the types in ``wanted`` (type ->
    struct format of its value; "s" alone: a string of the attribute's own length). The fixed part ends
    at the first attribute whose type is in ``ends`` or that is flagged nested: the kernel opens the
    counters with ``nla_nest_start_noflag``, so the flag alone does not show where they start. None when
    the message does not have every wanted type in its fixed part, each at its format's size. The
    caller has decoded ``payload`` attribute by attribute first: this trusts its outer attribute."""
    if len(payload) < 8:
        return None
    header_fmt, value_fmt = "=6xH", "=4xH"  # the outer attribute's type; its length
    expected: list[int] = [_NLA.unpack_from(payload, 4)[1]]
    order: list[int] = []
    header_at, value_at = 8, 6  # where each format has read up to
    offset = 8
    while offset + 4 <= len(payload):
        length, kind = _NLA.unpack_from(payload, offset)
        if kind & NLA_F_NESTED or kind in ends or length < 4 or offset + length > len(payload):
            break
        header_fmt += f"{offset - header_at}xI"
        header_at = offset + 4
        expected.append(_WORD.unpack_from(payload, offset)[0])
        fmt = wanted.get(kind)
        if fmt is not None:
            fmt = f"{length - 4}s" if fmt == "s" else fmt
            if struct.calcsize("=" + fmt) != length - 4:
                return None
            value_fmt += f"{offset + 4 - value_at}x{fmt}"
            value_at = offset + length
            order.append(kind)
        offset += (length + 3) & ~3
    if sorted(order) != sorted(wanted):
        return None
    pick = None if order == list(wanted) else operator.itemgetter(0, *(1 + order.index(kind) for kind in wanted))
    return Layout(struct.Struct(header_fmt), tuple(expected), struct.Struct(value_fmt), pick, offset)


def read(layout: Layout, payload: bytes) -> tuple[Any, ...] | None:
    """The wanted values of ``payload`` at ``layout`` (outer length first, then as ``wanted`` orders
    them), or None when its headers are
    not the layout's or its outer attribute does not hold the fixed part."""
    if len(payload) < layout.end or layout.headers.unpack_from(payload) != layout.expected:
        return None
    values = layout.values.unpack_from(payload)
    if not layout.end <= 4 + values[0] <= len(payload):
        return None
    return values if layout.pick is None else layout.pick(values)


_RUNS: dict[tuple[str, str, int], tuple[struct.Struct, struct.Struct] | None] = {}


def run_readers(layout: Layout, length: int) -> tuple[struct.Struct, struct.Struct] | None:
    """For a run of netlink messages of ``length`` bytes each (16-byte header, then a payload at
    ``layout``): a Struct reading each message's (outer attribute's length, then the layout's header
    words) and one reading its values as ``layout.values`` does, both ``length`` long, for
    ``iter_unpack`` over the run. None when the layout reads past such a message or needs reordering."""
    key = (layout.headers.format, layout.values.format, length)
    if key not in _RUNS:
        headers, values = layout.headers.format, layout.values.format
        fits = layout.pick is None and 16 + max(layout.headers.size, layout.values.size, layout.end) <= length
        # headers: "=6xH..." reads the outer type at payload offset 6; its length sits at offset 4
        _RUNS[key] = (struct.Struct(f"=16x4xH{headers[3:]}{length - 16 - layout.headers.size}x"),
                      struct.Struct(f"=16x{values[1:]}{length - 16 - layout.values.size}x")) if fits else None
    return _RUNS[key]
