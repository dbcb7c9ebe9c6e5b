"""IPVS-mode detection: what this node looks like to Calico and to another proxy, watched live.

Calico's Felix decides it runs in IPVS mode by whether a link named ``kube-ipvs0`` exists, checks that
only at start, and restarts itself when the link comes or goes. kipvs reports the node's facts as a
record (``apply.node-facts`` on ``kipvs.status.<node>.facts``) at start and whenever they change:

- whether the kernel has IPVS (``/proc/net/ip_vs`` exists in this network namespace);
- ``kube-ipvs0``: absent, created by kipvs (its alias is ``kipvs``) or by someone else (kube-proxy);
- signs of another proxy in IPVS mode: a ``kube-proxy`` process (visible with the host's PID namespace),
  kube-proxy's IPVS-mode chains in the iptables-nft tables. Each is a conflict, reported loudly.

Link changes are watched over netlink (an rtnetlink socket subscribed to link events); processes and
chains have no events and are looked at again every drift period. :class:`FactsPublisher` is the manager:
it publishes on every new observation and on every change of endpoint-mark mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nats.js import JetStreamContext

from shared.contract import events, topology
from shared.contract.events import NodeFactsReport
from shared.messaging import bus

from .kernel.backend import LINK

log = logging.getLogger("kipvs.applier")

LINK_ALIAS = "kipvs"  # set on kube-ipvs0 when kipvs creates it: who owns the link is read from the kernel
# set on kube-ipvs0 when kipvs adopts kube-proxy's (takeover.py), with the time: "kipvs taken over <ISO time>"
TAKEOVER_ALIAS = "kipvs taken over "
RTMGRP_LINK = 0x1
# Chains only kube-proxy's IPVS mode creates (its iptables mode has KUBE-NODEPORTS, not KUBE-NODE-PORT).
IPVS_MODE_CHAINS = frozenset({"KUBE-IPVS-FILTER", "KUBE-LOAD-BALANCER", "KUBE-NODE-PORT", "KUBE-IPVS-OUT-FILTER"})


@dataclass(frozen=True)
class Observation:
    ipvs_available: bool
    kube_ipvs0: Literal["absent", "kipvs", "other"]
    kube_proxy_processes: tuple[str, ...] = ()  # "pid 42: kube-proxy --proxy-mode=ipvs ..."
    ipvs_mode_chains: tuple[str, ...] = ()  # "ip nat KUBE-LOAD-BALANCER", ...
    taken_over: str = ""  # when kipvs took kube-ipvs0 over from kube-proxy (its alias says so)


def conflicts(obs: Observation) -> tuple[str, ...]:
    """Every sign of another proxy on the node, as a sentence an operator can act on. Pure."""
    out = [f"a kube-proxy process runs on this node ({p}): two proxies fight over IPVS; stop kube-proxy "
           "(delete its DaemonSet or add a nodeSelector) before running kipvs" for p in obs.kube_proxy_processes]
    if obs.ipvs_mode_chains:
        out.append(f"kube-proxy's IPVS-mode chains exist ({', '.join(obs.ipvs_mode_chains)}): another kube-proxy in "
                   "IPVS mode runs or ran here; if it is stopped, restart the applier with --adopt: it removes them "
                   "once its own rules are in place (never 'kube-proxy --cleanup' on a live node: it deletes "
                   "every IPVS service)")
    return tuple(out)


def report(node: str, obs: Observation, mode: Literal["enforce", "observe", "off"], reason: str) -> NodeFactsReport:
    return NodeFactsReport(node=node, ipvs_available=obs.ipvs_available, kube_ipvs0=obs.kube_ipvs0,
                           endpoint_marks=mode, endpoint_marks_reason=reason, conflicts=conflicts(obs),
                           taken_over=obs.taken_over)


def link_owner(alias: str | None) -> tuple[Literal["kipvs", "other"], str]:
    """(who owns kube-ipvs0, when kipvs took it over from kube-proxy or "") from the link's alias. Pure."""
    if alias == LINK_ALIAS:
        return "kipvs", ""
    if alias and alias.startswith(TAKEOVER_ALIAS):
        return "kipvs", alias.removeprefix(TAKEOVER_ALIAS)
    return "other", ""


def kube_proxy_processes(proc: Path = Path("/proc")) -> tuple[str, ...]:
    """kube-proxy processes this PID namespace can see (all of the node's with hostPID)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == "kube-proxy":
            args = " ".join(a.decode(errors="replace") for a in argv if a)
            mode = "ipvs" if "--proxy-mode=ipvs" in args or "--proxy-mode ipvs" in args else "mode set elsewhere"
            found.append(f"pid {entry.name}, {mode}: {args[:120]}")
    return tuple(sorted(found))


class NodeProbe:
    """Reads the facts from the kernel (``ip`` and ``nft`` commands, in ``netns`` when given)."""

    def __init__(self, netns: str | None = None, proc: Path | None = Path("/proc")) -> None:
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = proc  # None: do not look at processes (tests in a network namespace share the host's)

    async def _run(self, *argv: str) -> tuple[int, str]:
        try:
            process = await asyncio.create_subprocess_exec(*self.prefix, *argv, stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.DEVNULL)
        except FileNotFoundError:
            return 127, ""
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    async def observe(self) -> Observation:
        rc, out = await self._run("cat", "/proc/net/ip_vs")
        ipvs = rc == 0
        rc, out = await self._run("ip", "-j", "-d", "link", "show", "dev", LINK)
        link: Literal["absent", "kipvs", "other"] = "absent"
        taken_over = ""
        if rc == 0 and out.strip():
            (info,) = json.loads(out)
            link, taken_over = link_owner(info.get("ifalias"))
        chains = []
        rc, out = await self._run("nft", "-j", "list", "chains")
        if rc == 0 and out.strip():
            for item in json.loads(out).get("nftables", []):
                chain = item.get("chain")
                if chain and chain.get("family") in ("ip", "ip6") and chain.get("name") in IPVS_MODE_CHAINS:
                    chains.append(f"{chain['family']} {chain['table']} {chain['name']}")
        processes = kube_proxy_processes(self.proc) if self.proc is not None else ()
        return Observation(ipvs_available=ipvs, kube_ipvs0=link, kube_proxy_processes=processes,
                           ipvs_mode_chains=tuple(sorted(chains)), taken_over=taken_over)


class LinkWatch:
    """Wakes up on every link change in the network namespace (rtnetlink, RTMGRP_LINK)."""

    def __init__(self, netns: str | None = None) -> None:
        self.changed = asyncio.Event()
        self.sock = self._open(netns)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    @staticmethod
    def _open(netns: str | None) -> socket.socket:
        if netns is None:
            return _subscribe()
        from pyroute2 import netns as pyroute2_netns

        pyroute2_netns.pushns(netns)  # the socket belongs to the namespace it is created in
        try:
            return _subscribe()
        finally:
            pyroute2_netns.popns()

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.sock.recv(65536):
                pass
        self.changed.set()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def _subscribe() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    sock.bind((0, RTMGRP_LINK))
    return sock


async def watch(probe: NodeProbe, on_change: Callable[[Observation], Awaitable[None]], stop: asyncio.Event,
                recheck: float = 60.0, settle: float = 0.2) -> None:
    """Call ``on_change`` with the first observation and with every different one after it: at once
    after a link change, else every ``recheck`` seconds."""
    links = LinkWatch(probe.netns)
    last: Observation | None = None
    try:
        while not stop.is_set():
            links.changed.clear()
            current = await probe.observe()
            if current != last:
                last = current
                await on_change(current)
            waiters = {asyncio.ensure_future(links.changed.wait()), asyncio.ensure_future(stop.wait())}
            _, pending = await asyncio.wait(waiters, timeout=recheck, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            await asyncio.sleep(settle)  # a burst of link messages is one look
    finally:
        links.close()


class FactsPublisher:
    """This node's facts on ``kipvs.status.<node>.facts``, with the endpoint-mark mode ``mode()`` gives."""

    def __init__(self, js: JetStreamContext, node: str,
                 mode: Callable[[], tuple[Literal["enforce", "observe", "off"], str]]) -> None:
        self.js = js
        self.node = node
        self.mode = mode
        self.observation: Observation | None = None

    async def on_observation(self, observation: Observation) -> None:
        self.observation = observation
        for conflict in conflicts(observation):
            log.error("CONFLICT on %s: %s", self.node, conflict)
        await self.publish()

    async def publish(self) -> None:
        if self.observation is None:
            return
        record = report(self.node, self.observation, *self.mode())
        envelope = events.Envelope(id=f"facts/{self.node}/{time.time_ns()}", time_ns=time.time_ns(),
                                   producer=f"applier/{self.node}", record=record)
        await bus.publish(self.js, topology.status_subject(self.node, "facts"), envelope)
