"""``kipvs ipvs --node N``: what node N's applier holds in its kernel, in ``ipvsadm -Ln`` layout.

Asks the node's applier over core NATS request/reply (``kipvs.inspect.<node>.ipvs``, the versioned
``IpvsInspectRequest``/``IpvsInspectReply`` of ``shared/contract/events.py``); the applier reads its kernel through
its backend (netlink: ``services/applier/kernel/kernel_read.py``). An applier in shadow mode answers with the
kernel kube-proxy wrote.

- default: ``ipvsadm -Ln``; ``--stats``: ``ipvsadm -Ln --stats``; ``--rate``: ``ipvsadm -Ln --rate``
  (the kernel's counters and rate estimates, read over netlink);
- ``--json``: the reply as JSON (the table with every counter, kube-ipvs0's addresses, the ipsets);
- ``--diff``: the kernel against the published plan for the node (snapshot + deltas, resolved as the
  applier and ``kipvs plan`` resolve it), one line per difference (``shared/plan/divergence.py``), exit 1
  when they differ; what lies in the applier's ``--ipvs-exclude-cidrs`` (sent in its reply) is left out.

Exit 2, with one sentence, when NATS cannot be reached, no applier answers within ``--timeout``, or the
applier answers with an error (it cannot read its kernel). A table over the server's max_payload (10,000
Services is several MB) comes in parts (``IpvsInspectPart``), put together and checked against their
SHA-256 before the table is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
from typing import Any

import msgspec
import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import Header

from shared.contract import events, topology
from shared.messaging import bus, plan_log
from shared.plan.divergence import divergences
from shared.plan.resolve import resolve_node
from shared.tools import log_client
from shared.tools.log_client import ToolError, run_tool

from .ipvsadm_format import render

_reply_decoder = msgspec.msgpack.Decoder(events.IpvsInspectReply)
_part_decoder = msgspec.msgpack.Decoder(events.IpvsInspectPart)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="the node whose applier is asked (its Node name)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--stats", action="store_true", help="counters, as ipvsadm -Ln --stats")
    layout.add_argument("--rate", action="store_true", help="rate estimates, as ipvsadm -Ln --rate")
    layout.add_argument("--diff", action="store_true",
                        help="differences with the published plan for the node, one per line; exit 1 if any")
    parser.add_argument("--json", action="store_true", help="JSON instead of text")
    parser.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                        help="how long to wait for the applier's answer (default 5)")
    log_client.add_nats_arguments(parser, recorded_log=False)


async def ask(nc: nats.NATS, node: str, wait: float) -> events.IpvsInspectReply:
    """The applier's reply, put together when it comes in parts (a table over the server's max_payload);
    ToolError when none answers within ``wait`` seconds, its parts do not make a reply, or it could not read
    its kernel."""
    subject = topology.inspect_subject(node)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, msgspec.msgpack.encode(events.IpvsInspectRequest(parts=True)), reply=inbox)
        data = await _collect(sub, node, subject, asyncio.get_running_loop().time() + wait, wait)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    try:
        reply = _reply_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ToolError(f"the applier of {node} sent an answer this build cannot read ({exc}): "
                        "are the applier and this tool the same version?") from None
    if reply.error or reply.table is None:
        raise ToolError(f"the applier of {node} answered with an error: {reply.error or 'no table'}")
    return reply


async def _collect(sub: Any, node: str, subject: str, deadline: float, wait: float) -> bytes:
    """The reply's bytes: one message, or every part of one in order (IpvsInspectPart)."""
    parts: list[bytes] = []
    digest = ""
    while True:
        try:
            msg = await sub.next_msg(timeout=max(deadline - asyncio.get_running_loop().time(), 0.001))
        except (NatsTimeout, TimeoutError):
            if parts:
                raise ToolError(f"the applier of {node} sent {len(parts)} parts of its answer, then nothing "
                                f"within {wait:g}s (raise --timeout for a large table)") from None
            raise ToolError(f"no applier answered for node {node} on {subject} within {wait:g}s: is "
                            f"'kipvs applier --node {node}' running and connected to this NATS?") from None
        headers = msg.headers or {}
        if headers.get(Header.STATUS) == "503" and not parts:  # the server: nothing subscribes to the subject
            raise ToolError(f"no applier answered for node {node} on {subject}: is 'kipvs applier --node {node}' "
                            "running and connected to this NATS?")
        if events.INSPECT_PART_HEADER not in headers:
            return msg.data  # a whole reply (an older applier sends only those)
        try:
            part = _part_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ToolError(f"the applier of {node} sent a part this build cannot read ({exc})") from None
        if part.parts > events.INSPECT_MAX_PARTS or part.part != len(parts) + 1 or (parts and part.digest != digest):
            raise ToolError(f"the applier of {node} sent part {part.part} of {part.parts} after {len(parts)}: "
                            "its answer was cut (ask again)")
        digest = part.digest
        parts.append(part.data)
        if part.part == part.parts:
            whole = b"".join(parts)
            if hashlib.sha256(whole).hexdigest() != digest:
                raise ToolError(f"the applier of {node} sent an answer whose parts do not match their digest")
            return whole


async def plan_differences(js: JetStreamContext, plan_reader: bus.LogReader,
                           reply: events.IpvsInspectReply) -> tuple[int, list[str]]:
    """(the published plan's shared delta, the differences between the reply's kernel and that plan); the
    plan is read with ``plan_reader`` (``log_client.plan_source``)."""
    assert reply.table is not None
    plan = await plan_log.published_plan(js, plan_reader)
    facts = plan.nodes.get(reply.node)
    if reply.node_addresses:  # the applier uses its interfaces' addresses for NodePorts, not the Node's
        facts = msgspec.structs.replace(facts or events.NodeFacts(name=reply.node), addresses=reply.node_addresses)
    return plan.seq, divergences(reply.table, resolve_node(plan.services.values(), facts), reply.exclude_cidrs)


async def ipvs(args: argparse.Namespace) -> int:
    async with log_client.connect(args) as nc:
        reply = await ask(nc, args.node, args.timeout)
        if not args.diff:
            if args.json:
                sys.stdout.write(msgspec.json.encode(reply).decode() + "\n")
            else:
                assert reply.table is not None
                sys.stdout.write(render(reply.table, "stats" if args.stats else "rate" if args.rate else "table"))
            return 0
        plan_seq, found = await plan_differences(nc.jetstream(), log_client.plan_source(args), reply)
    if args.json:
        sys.stdout.write(msgspec.json.encode({"node": args.node, "mode": reply.mode, "plan_seq": plan_seq,
                                              "applier_plan_seq": reply.plan_seq, "differences": found}).decode()
                         + "\n")
    else:
        sys.stdout.writelines(line + "\n" for line in found)
    held = f"applier at shared delta {reply.plan_seq}" if reply.mode == "apply" else "shadow mode: kube-proxy's"
    print(f"{args.node}: {len(found)} difference{'s' if len(found) != 1 else ''} between the kernel ({held}) "
          f"and the published plan (shared delta {plan_seq})", file=sys.stderr)
    return 1 if found else 0


def run(args: argparse.Namespace) -> int:
    return run_tool("ipvs", lambda: ipvs(args))
