"""A node's desired kernel state, and the per-Service contributions it is assembled from. Pure.

Rules of this room: values only (no kernel handle, no I/O); names and keys are kube-proxy's (``ipvsadm``
addresses, KUBE-* ipset names) so a state can be diffed against a kube-proxy node's kernel.

This is what the applier writes and what ``kipvs plan --node`` prints. Keys are chosen so two states can
be diffed cheaply: virtual services by (protocol, address, port), real servers by (address, port).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

VSKey = tuple[str, str, int]  # protocol, ip, port
RealKey = tuple[str, int]  # ip, port


@dataclass
class VirtualService:
    protocol: str
    ip: str
    port: int
    scheduler: str
    persistence_timeout: int = 0
    reals: dict[RealKey, int] = field(default_factory=dict)  # -> weight
    service: str = field(default="", compare=False)  # who put it there (audit only; not a kernel attribute)

    @property
    def key(self) -> VSKey:
        return (self.protocol, self.ip, self.port)


def family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


IPSET_MAX_NAME = 31  # the kernel's IPSET_MAXNAMELEN (32) less the terminating NUL


def ipset_name(base: str, family: int) -> str:
    """kube-proxy's names: KUBE-CLUSTER-IP for IPv4, KUBE-6-CLUSTER-IP for IPv6, truncated to 31
    characters as kube-proxy does (KUBE-6-LOAD-BALANCER-SOURCE-CID)."""
    return base if family == 4 else base.replace("KUBE-", "KUBE-6-", 1)[:IPSET_MAX_NAME]


# The ipsets kube-proxy keeps in IPVS mode (a fixed set, whatever the number of Services), with their types.
IPSET_TYPES: dict[str, str] = {
    "KUBE-CLUSTER-IP": "hash:ip,port",
    "KUBE-LOOP-BACK": "hash:ip,port,ip",
    "KUBE-EXTERNAL-IP": "hash:ip,port",
    "KUBE-EXTERNAL-IP-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER": "hash:ip,port",
    "KUBE-LOAD-BALANCER-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER-FW": "hash:ip,port",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": "hash:ip,port,net",
    "KUBE-LOAD-BALANCER-SOURCE-IP": "hash:ip,port,ip",
    "KUBE-NODE-PORT-TCP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-TCP": "bitmap:port",
    "KUBE-NODE-PORT-UDP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-UDP": "bitmap:port",
    "KUBE-NODE-PORT-SCTP-HASH": "hash:ip,port",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": "hash:ip,port",
    "KUBE-IPVS-IPS": "hash:ip",
    "KUBE-HEALTH-CHECK-NODE-PORT": "bitmap:port",
}
ALL_IPSETS: tuple[str, ...] = tuple(ipset_name(base, fam) for fam in (4, 6) for base in IPSET_TYPES)

# The sets whose entries start with the address a virtual service listens on (cluster, external or
# load-balancer IP; a node address for the SCTP node-port sets; a kube-ipvs0 address), as kube-proxy
# fills them (pkg/proxy/ipvs/proxier.go ``syncService`` callers in ``syncProxyRules``). KUBE-LOOP-BACK is
# not one: its entries are ``podIP,proto:port,podIP`` (an endpoint's address), and the bitmap:port sets
# hold ports only.
_VIRTUAL_ADDRESS_KEYED = ("KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER",
                          "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                          "KUBE-LOAD-BALANCER-SOURCE-IP", "KUBE-NODE-PORT-SCTP-HASH",
                          "KUBE-NODE-PORT-LOCAL-SCTP-HASH", "KUBE-IPVS-IPS")
VIRTUAL_ADDRESS_SETS: frozenset[str] = frozenset(ipset_name(base, fam) for fam in (4, 6)
                                                 for base in _VIRTUAL_ADDRESS_KEYED)


def entry_virtual_address(set_name: str, entry: str) -> str | None:
    """The virtual address an ipset entry is about (its first field, ``ip[,proto:port[,...]]``), or None
    when the set is not keyed by one (KUBE-LOOP-BACK's pod IPs, bitmap:port sets' ports)."""
    return entry.split(",", 1)[0] if set_name in VIRTUAL_ADDRESS_SETS else None


@dataclass
class Contribution:
    """What one Service adds to one node's state."""

    virtual_services: list[VirtualService] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)  # on kube-ipvs0
    ipset_entries: set[tuple[str, str]] = field(default_factory=set)  # (set name, entry)


@dataclass
class NodeState:
    ipvs: dict[VSKey, VirtualService] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    ipsets: dict[str, set[str]] = field(default_factory=lambda: {name: set() for name in ALL_IPSETS})

    def add(self, contribution: Contribution) -> None:
        for vs in contribution.virtual_services:
            self.ipvs.setdefault(vs.key, vs)  # two Services on one VIP:port: the first (by key) wins
        self.addresses |= contribution.addresses
        for name, entry in contribution.ipset_entries:
            self.ipsets[name].add(entry)

    def finish(self) -> NodeState:
        """Derived sets: KUBE-IPVS-IPS holds every kube-ipvs0 address."""
        for ip in self.addresses:
            self.ipsets[ipset_name("KUBE-IPVS-IPS", family_of(ip))].add(ip)
        return self


def sort_key_ip(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return (addr.version, int(addr))
