"""kipvs's packet rules: one nftables table, ``inet kipvs``, written in atomic transactions.

kube-proxy's IPVS mode keeps a fixed set of iptables rules that match its ipsets. nftables cannot match
ipsets, so kipvs's table holds nft sets with the same members as the KUBE-* ipsets (the ipsets are still
kept, for parity and for tools that read them) and rules that do kube-proxy's jobs:

- masquerade: traffic to a ClusterIP from outside the cluster CIDRs (or all of it with masquerade-all),
  to an external IP or a load-balancer IP (unless its Service is externalTrafficPolicy Local) and to a
  node port (same exception) is marked 0x4000 and masqueraded after IPVS; hairpin traffic (a pod reaching
  itself through its Service: the KUBE-LOOP-BACK entries) is masqueraded;
- the VIP port filter (KUBE-IPVS-FILTER's job, kubernetes#72236): a NEW connection to an address on
  kube-ipvs0 on a port that is no Service port is rejected, except a health-check node port
  (KUBE-HEALTH-CHECK-NODE-PORT: a cloud load balancer probes it on the LB address, kubernetes PR 117723);
- loadBalancerSourceRanges: traffic to a load-balancer VIP:port with source ranges is dropped unless
  its source is in a range (or is the node itself: the -SOURCE-IP entries), on the input path and on the
  output path (below);
- forwarding of marked and established traffic is accepted;
- Calico's endpoint marks, where this node's mode is ``enforce`` (see :mod:`.endpoint_mark_rules`).

A connection from the node itself (or a hostNetwork pod) to a load-balancer IP never crosses the input
hook: IPVS takes it at LOCAL_OUT (ip_vs_core.c ``ip_vs_local_request4``, priority NF_IP_PRI_NAT_DST + 1)
and rewrites its destination to the pod. So the source-range chain is also hooked on output, at priority
-110, before IPVS, where the destination is still the VIP; the node's source there is the VIP itself (its
route is local), which only a -SOURCE-IP entry lets through, i.e. when a node address is in a range.
kube-proxy fixed the same hole with an OUTPUT rule ``-s LBIP -m ipvs --vaddr LBIP -j DROP`` for each
load-balancer IP no node address is allowed to reach (pkg/proxy/ipvs/proxier.go ``writeIptablesRules``,
``lbNoNodeAccessIPs``; kubernetes#119656, PR 119791). nftables has no ipvs match, hence the hook before
IPVS; the result is the same except that kipvs filters per port, as the sets are.

The whole table is (re)written in one ``nft -f`` transaction (flush + define); member changes are one
transaction per batch. kipvs never touches another table.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2.netns import popns, pushns

from shared.plan.node_state import ALL_IPSETS, IPSET_TYPES, ipset_name

from ..ops import AddEntry, DelEntry, Op
from . import endpoint_mark_rules, kernel_decode, nft_shape
from .backend import CapabilityError, KernelError
from .endpoint_mark_rules import EndpointMarks
from .netlink_batch import NETLINK_NETFILTER
from .netlink_dump import DumpSocket

TABLE = "kipvs"
MASQ_MARK = 0x4000
OUTPUT_PRIORITY = -110  # before IPVS's LOCAL_OUT hook (NF_IP_PRI_NAT_DST + 1 = -99) and nat output (-100)

# ipset -> (nft set name, element type, needs interval flag)
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}


def _nft_type(set_type: str, family: int) -> tuple[str, bool]:
    addr = _ADDR[family]
    return {
        "hash:ip": (addr, False),
        "hash:ip,port": (f"{addr} . inet_proto . inet_service", False),
        "hash:ip,port,ip": (f"{addr} . inet_proto . inet_service . {addr}", False),
        "hash:ip,port,net": (f"{addr} . inet_proto . inet_service . {addr}", True),
        "bitmap:port": ("inet_service", False),
    }[set_type]


@dataclass(frozen=True)
class NftSet:
    ipset: str  # the KUBE-* ipset it mirrors
    name: str  # nft set name: lowercase, family suffixed
    family: int
    type: str
    interval: bool


def _sets() -> dict[str, NftSet]:
    out = {}
    for base, set_type in IPSET_TYPES.items():
        for family in (4, 6):
            ipset = ipset_name(base, family)
            nft_type, interval = _nft_type(set_type, family)
            name = base.removeprefix("KUBE-").lower().replace("-", "_") + str(family)
            out[ipset] = NftSet(ipset, name, family, nft_type, interval)
    return out


SETS = _sets()
assert set(SETS) == set(ALL_IPSETS)


def element(set_type: str, entry: str) -> str:
    """A kube-proxy ipset entry as an nft set element: ``10.96.0.10,tcp:80`` -> ``10.96.0.10 . tcp . 80``."""
    if set_type in ("bitmap:port", "hash:ip"):
        return entry
    parts = entry.split(",")
    protocol, _, port = parts[1].partition(":")
    return " . ".join([parts[0], protocol, port, *parts[2:]])


def _set_type(ipset: str) -> str:
    return IPSET_TYPES[ipset.replace("KUBE-6-", "KUBE-", 1)] if ipset in SETS else ""


@dataclass(frozen=True)
class RulesConfig:
    cluster_cidrs: tuple[str, ...] = ()  # pod CIDRs: ClusterIP traffic from elsewhere is masqueraded
    masquerade_all: bool = False


def ruleset(config: RulesConfig, members: dict[str, set[str]], marks: EndpointMarks | None = None) -> str:
    """The whole table, as one transaction: make sure it exists, delete it, define it again with every set
    member (``flush table`` would keep old set members). With ``marks``, Calico's endpoint-mark rules too."""
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for s in SETS.values():
        flags = " flags interval;" if s.interval else ""
        elems = sorted(element(_set_type(s.ipset), e) for e in members.get(s.ipset, ()))
        body = f" elements = {{ {', '.join(elems)} }};" if elems else ""
        lines.append(f"  set {s.name} {{ type {s.type};{flags}{body} }}")
    lines += _chains(config)
    if marks is not None:
        ipvs_ips = (SETS[ipset_name("KUBE-IPVS-IPS", 4)].name, SETS[ipset_name("KUBE-IPVS-IPS", 6)].name)
        lines += endpoint_mark_rules.definitions(marks, ipvs_ips)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dst(family: int) -> str:
    return f"{'ip' if family == 4 else 'ip6'} daddr . meta l4proto . th dport"


def _saddr(family: int) -> str:
    return f"{'ip' if family == 4 else 'ip6'} saddr"


def _chains(config: RulesConfig) -> list[str]:
    s = {k: v.name for k, v in SETS.items()}
    services, lb, firewall, vip_filter, postrouting = [], [], [], [], []
    for fam in (4, 6):
        n = ipset_name
        dst, src = _dst(fam), _saddr(fam)
        services.append(f"    {dst} @{s[n('KUBE-LOAD-BALANCER', fam)]} jump load_balancer")
        if config.masquerade_all:
            services.append(f"    {dst} @{s[n('KUBE-CLUSTER-IP', fam)]} jump mark_masq")
        else:
            cidrs = [c for c in config.cluster_cidrs if (":" in c) == (fam == 6)]
            if cidrs:
                services.append(f"    {dst} @{s[n('KUBE-CLUSTER-IP', fam)]} {src} != {{ {', '.join(cidrs)} }} "
                                "jump mark_masq")
        services.append(f"    {dst} @{s[n('KUBE-EXTERNAL-IP-LOCAL', fam)]} return")
        services.append(f"    {dst} @{s[n('KUBE-EXTERNAL-IP', fam)]} jump mark_masq")
        lb.append(f"    {dst} @{s[n('KUBE-LOAD-BALANCER-LOCAL', fam)]} return")
        firewall.append(f"    {dst} . {src} @{s[n('KUBE-LOAD-BALANCER-SOURCE-CIDR', fam)]} return")
        firewall.append(f"    {dst} . {src} @{s[n('KUBE-LOAD-BALANCER-SOURCE-IP', fam)]} return")
        firewall.append(f"    {dst} @{s[n('KUBE-LOAD-BALANCER-FW', fam)]} drop")
        for base in ("KUBE-LOAD-BALANCER", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL"):
            vip_filter.append(f"    {dst} @{s[n(base, fam)]} return")
        health_check = s[n("KUBE-HEALTH-CHECK-NODE-PORT", fam)]
        vip_filter.append(f"    meta nfproto {'ipv4' if fam == 4 else 'ipv6'} tcp dport @{health_check} return")
        addr = "ip" if fam == 4 else "ip6"
        vip_filter.append(f"    ct state new {addr} daddr @{s[n('KUBE-IPVS-IPS', fam)]} reject")
        loop_back = s[n("KUBE-LOOP-BACK", fam)]
        postrouting.append(f"    {addr} daddr . meta l4proto . th dport . {src} @{loop_back} masquerade")
    node_port = []
    for proto in ("tcp", "udp"):
        node_port.append(f"    meta l4proto {proto} th dport @{s['KUBE-NODE-PORT-LOCAL-' + proto.upper()]} return")
        node_port.append(f"    meta l4proto {proto} th dport @{s['KUBE-NODE-PORT-' + proto.upper()]} jump mark_masq")
    for fam in (4, 6):
        dst = _dst(fam)
        node_port.append(f"    {dst} @{s[ipset_name('KUBE-NODE-PORT-LOCAL-SCTP-HASH', fam)]} return")
        node_port.append(f"    {dst} @{s[ipset_name('KUBE-NODE-PORT-SCTP-HASH', fam)]} jump mark_masq")
    return [
        "  chain mark_masq {", f"    meta mark set meta mark | {MASQ_MARK:#x}", "  }",
        "  chain services {", *services, "    fib daddr type local jump node_port", "  }",
        "  chain node_port {", *node_port, "  }",
        "  chain load_balancer {", *lb, "    jump mark_masq", "  }",
        "  chain nat_prerouting {", "    type nat hook prerouting priority dstnat; policy accept;",
        "    jump services", "  }",
        "  chain nat_output {", "    type nat hook output priority -100; policy accept;", "    jump services", "  }",
        "  chain nat_postrouting {", "    type nat hook postrouting priority srcnat; policy accept;", *postrouting,
        f"    meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} meta mark set meta mark & {~MASQ_MARK & 0xFFFFFFFF:#x} "
        "masquerade fully-random", "  }",
        "  chain source_ranges {", *firewall, "  }",
        "  chain vip_filter {", *vip_filter, "  }",
        "  chain filter_input {", "    type filter hook input priority filter; policy accept;",
        "    jump source_ranges", "    jump vip_filter", "  }",
        "  chain filter_output {", f"    type filter hook output priority {OUTPUT_PRIORITY}; policy accept;",
        "    jump source_ranges", "  }",
        "  chain filter_forward {", "    type filter hook forward priority filter; policy accept;",
        f"    meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} accept", "    ct state related,established accept", "  }",
    ]


def member_changes(ops: Iterable[Op]) -> str:
    """The nft set changes for the ipset entry operations in ``ops``: one transaction."""
    lines = []
    for op in ops:
        if isinstance(op, AddEntry | DelEntry) and op.set in SETS:
            verb = "add" if isinstance(op, AddEntry) else "delete"
            member = element(_set_type(op.set), op.entry)
            lines.append(f"{verb} element inet {TABLE} {SETS[op.set].name} {{ {member} }}")
    return "\n".join(lines) + ("\n" if lines else "")


class NftRules:
    """The ``nft`` adapter: atomic transactions through ``nft -f -``."""

    def __init__(self, config: RulesConfig, netns: str | None = None) -> None:
        self.config = config
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.marks: EndpointMarks | None = None  # the endpoint marks in the table (enforce mode), else None
        self.nfnl: DumpSocket | None = None  # for generation(), opened at first use in the table's netns
        self.installed_shape: str | None = None  # nft_shape of the table right after this adapter's last install

    async def _nft(self, *args: str, script: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.prefix, "nft", *args, stdin=asyncio.subprocess.PIPE if script is not None else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(script.encode() if script is not None else None)
        if proc.returncode != 0:
            raise KernelError(f"nft {' '.join(args)}: {err.decode().strip()}")
        return out.decode()

    async def check(self) -> None:
        if shutil.which("nft") is None:
            raise CapabilityError("the nft command is missing: install nftables (Debian: apt-get install nftables)")
        try:
            await self._nft("-c", "-f", "-", script=ruleset(self.config, {}))
        except KernelError as exc:
            raise CapabilityError(f"this kernel cannot hold kipvs's nftables table: {exc}") from None

    async def install(self, members: dict[str, set[str]]) -> None:
        """Write the whole table, then note its shape as the kernel holds it (``nft_shape``: two short
        nfnetlink dumps whatever the node's size): what a drift check holds it to."""
        await self._nft("-f", "-", script=ruleset(self.config, members, self.marks))
        self.installed_shape = await self.shape()

    async def set_endpoint_marks(self, marks: EndpointMarks | None, members: dict[str, set[str]] | None) -> None:
        """Make the table's endpoint-mark rules ``marks`` (None: none). Endpoint changes are element
        changes; a new mask, new ranges or a mode change rewrite the table with ``members``."""
        before, self.marks = self.marks, marks
        if marks is not None and before is not None and marks.same_frame(before):
            script = endpoint_mark_rules.changes(before, marks)
            if script:
                await self._nft("-f", "-", script=script)
                self.installed_shape = await self.shape()  # its em_* chains came or went
        elif marks != before:
            assert members is not None, "a rewrite needs the set members"
            await self.install(members)

    async def installed_marks(self) -> dict[str, int] | None:
        """The interface -> mark pairs in the table (for drift checks); None when there are no mark rules."""
        return endpoint_mark_rules.parse_dispatch(json.loads(await self._nft("-j", "list", "table", "inet", TABLE)))

    async def apply(self, ops: list[Op]) -> None:
        script = member_changes(ops)
        if script:
            await self._nft("-f", "-", script=script)

    async def members(self) -> dict[str, set[str]]:
        """The nft sets' members, in ipset entry syntax. KernelError when the table is missing."""
        listed = await self.listed()
        if listed is None:
            raise KernelError(f"nftables table inet {TABLE} is missing")
        return listed.members

    async def listed(self) -> Listed | None:
        """What a drift check compares, from one ``nft -j list table``; None when the table is missing (an
        ``nft flush ruleset``, as Debian's nftables.service runs at every start and reload)."""
        try:
            doc = json.loads(await self._nft("-j", "list", "table", "inet", TABLE))
        except KernelError as exc:
            if "No such file" in str(exc):
                return None
            raise
        return Listed(_members(doc), endpoint_mark_rules.parse_dispatch(doc), await self.shape())

    def divergence(self, listed: Listed | None, members: dict[str, set[str]]) -> str:
        """Why the table ``listed`` is not the one to hold ``members`` and this adapter's endpoint marks
        ("" when it is): missing, set members, endpoint marks, then chains or rules (``nft_shape``)."""
        if listed is None:
            return "missing"
        if any(listed.members.get(name, set()) != entries for name, entries in members.items()):
            return "set members differed"
        if listed.marks != (self.marks.marks if self.marks is not None else None):
            return "endpoint marks differed"
        if self.installed_shape is not None and listed.shape != self.installed_shape:
            return "chains or rules differed"
        return ""

    async def generation(self) -> int:
        """The netns's nf_tables ruleset generation (NFT_MSG_GETGEN), which every committed nf_tables
        transaction bumps (``nf_tables_commit`` in net/netfilter/nf_tables_api.c, ``base_seq``): equal
        generations mean no table, set or element changed in between. libnftables keys its cache on it
        the same way (``mnl_genid_get`` in nftables' src/mnl.c). One netlink request, no ``nft`` process.
        Raises OSError (DumpError) when the kernel refuses it."""
        return kernel_decode.nft_generation(await self._nfnl().request(*kernel_decode.nft_generation_request()))

    async def shape(self) -> str:
        """The table's chains and rules as the kernel holds them now (``nft_shape.read``: two nfnetlink
        dumps, no ``nft`` process). Raises OSError (DumpError) when the kernel refuses a dump."""
        return await nft_shape.read(self._nfnl(), TABLE)

    def _nfnl(self) -> DumpSocket:
        if self.nfnl is None:
            self.nfnl = _socket_in(self.netns)
        return self.nfnl

    async def remove(self) -> None:
        try:
            await self._nft("delete", "table", "inet", TABLE)
        except KernelError as exc:
            if "No such file" not in str(exc):
                raise


def _socket_in(netns: str | None) -> DumpSocket:
    """An nfnetlink socket in ``netns`` (a socket keeps the namespace it was opened in)."""
    if netns is None:
        return DumpSocket(NETLINK_NETFILTER)
    pushns(netns)
    try:
        return DumpSocket(NETLINK_NETFILTER)
    finally:
        popns()


@dataclass
class Listed:
    """The table as a drift check compares it: set members in ipset entry syntax and the endpoint-mark pairs
    (``endpoint_mark_rules.parse_dispatch``) from ``nft -j list table``, and its shape (``nft_shape``)."""

    members: dict[str, set[str]]
    marks: dict[str, int] | None
    shape: str


def _members(doc: dict) -> dict[str, set[str]]:
    by_name = {s.name: s for s in SETS.values()}
    out: dict[str, set[str]] = {s.ipset: set() for s in SETS.values()}
    for item in doc.get("nftables", []):
        nft_set = item.get("set")
        if not nft_set or nft_set.get("name") not in by_name:
            continue
        spec = by_name[nft_set["name"]]
        for elem in nft_set.get("elem", []):
            out[spec.ipset].add(_entry_from_json(_set_type(spec.ipset), elem))
    return out


def _entry_from_json(set_type: str, elem: object) -> str:
    if isinstance(elem, dict) and "concat" in elem:
        parts = [p["prefix"]["addr"] + "/" + str(p["prefix"]["len"]) if isinstance(p, dict) and "prefix" in p
                 else str(p) for p in elem["concat"]]
        out = f"{parts[0]},{parts[1]}:{parts[2]}"
        return out + ("," + parts[3] if len(parts) > 3 else "")
    if isinstance(elem, dict) and "prefix" in elem:
        return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
    return str(elem)
