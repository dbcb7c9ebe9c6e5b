"""A kernel table against a node's plan: one precise line per difference. Pure.

Used by shadow mode (kube-proxy's kernel against kipvs's plan, before a migration) and by ``kipvs ipvs
--diff`` (an applier's kernel against the published plan). Both read the kernel with the counters and
everything else IPVS keeps; only what the plan decides is compared:

- IPVS virtual servers by (protocol, address, port): missing, extra, scheduler, persistence timeout;
  their real servers: missing, extra, weight, forwarding method (kube-proxy and kipvs masquerade).
- The addresses on ``kube-ipvs0``: missing, extra (and the link itself when the plan needs addresses).
- Every KUBE-* ipset of kube-proxy's fixed list (``node_state.ALL_IPSETS``): entries missing and extra; a
  set that does not exist while the plan puts entries in it.

What legitimately differs between two correct proxies, and is therefore never reported:

- a real server with weight 0 that the plan does not have: a terminating endpoint still draining its
  connections (kube-proxy's graceful termination, kipvs's ``--drain-timeout``), removed once drained;
- firewall-mark virtual servers: neither kube-proxy nor kipvs creates them (another program owns them);
- an absent ipset the plan leaves empty (kube-proxy creates the IPv6 sets only in dual-stack), and kipvs's
  own KIPVS-* sets. An absent set the plan fills is one line, not one per entry (kube-proxy before 1.28 has
  no KUBE-IPVS-IPS or KUBE-HEALTH-CHECK-NODE-PORT: expected there, and the operator's call);
- persistence netmask and scheduler flags: kube-proxy sets no netmask, nor does kipvs; both set ``mh-port``
  with the ``mh`` scheduler (kube-proxy from PR 115527 on), and an older kube-proxy's lack of it is not
  reported;
- what lies in the node's ``--ipvs-exclude-cidrs`` (``exclude``): another program's ranges, where the
  applier never programs, deletes nor binds (services/applier/exclude.py): virtual servers, kube-ipvs0
  addresses and ipset entries about such an address;
- iptables/nftables rules and chains: kube-proxy's are iptables chains, kipvs's an nftables table; they
  are different implementations of the same filtering, compared by their ipsets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable

import msgspec

from shared.contract.events import KernelTable, KernelVirtualServer
from shared.plan.node_state import (
    ALL_IPSETS,
    NodeState,
    VirtualService,
    VSKey,
    entry_virtual_address,
    sort_key_ip,
)

LINK = "kube-ipvs0"


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _vs_name(protocol: str, ip: str, port: int) -> str:
    return f"{protocol} {_hostport(ip, port)}"


def _order(key: tuple[str, str, int]) -> tuple[object, ...]:
    return (key[0], sort_key_ip(key[1]), key[2])


RealLines = dict[VSKey, list[str]]


def divergences(table: KernelTable, want: NodeState, exclude: Iterable[str] = (),
                reals_read: Callable[[VSKey], bool] | None = None, last: RealLines | None = None) -> list[str]:
    """Every difference between ``table`` (read from a kernel) and ``want`` (the node's resolved plan),
    one line each, in a stable order: virtual servers, then addresses, then ipsets; nothing in the
    ``exclude`` CIDRs (strings, e.g. ``"10.97.0.0/16"``; ValueError for one that is not a CIDR).

    Sliced (shadow mode, as the drift check: services/applier/drift_slices.py): with ``reals_read``, the
    real servers of a virtual server on both sides are compared only where it accepts the key (the table
    holds no others); ``last`` (kept by the caller across calls) maps each such key to its real-server
    lines from its last read: updated for the keys read, given back for the others, dropped for keys no
    longer on both sides."""
    networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in exclude)
    if networks:
        table, want = _outside(table, networks), _plan_outside(want, networks)
    out: list[str] = []
    have = {(vs.protocol, vs.address, vs.port): vs for vs in table.virtual_servers if not vs.fwmark}
    memory: RealLines = last if last is not None else {}
    for key in sorted(set(have) | set(want.ipvs), key=_order):
        held, planned = have.get(key), want.ipvs.get(key)
        out += _virtual_server(key, held, planned)
        if held is None or planned is None:
            memory.pop(key, None)
        elif reals_read is None or reals_read(key):
            memory[key] = _real_servers(_vs_name(*key), held, planned)
            out += memory[key]
        else:
            out += memory.get(key, [])
    planned_addresses = want.addresses
    if planned_addresses and not table.link:
        out.append(f"link {LINK} missing ({len(planned_addresses)} addresses planned)")
    else:
        held = set(table.addresses)
        for ip in sorted(planned_addresses - held, key=sort_key_ip):
            out.append(f"address {ip} missing on {LINK}")
        for ip in sorted(held - planned_addresses, key=sort_key_ip):
            out.append(f"address {ip} extra on {LINK}")
    for name in ALL_IPSETS:
        planned = want.ipsets.get(name, set())
        if name not in table.ipsets:
            if planned:
                out.append(f"ipset {name} missing ({len(planned)} entries planned)")
            continue
        held = set(table.ipsets[name])
        out += [f"ipset {name} entry {entry} missing" for entry in sorted(planned - held)]
        out += [f"ipset {name} entry {entry} extra" for entry in sorted(held - planned)]
    return out


def _virtual_server(key: tuple[str, str, int], have: KernelVirtualServer | None,
                    want: VirtualService | None) -> list[str]:
    name = _vs_name(*key)
    if have is None:
        assert want is not None
        return [f"virtual server {name} missing (planned {want.scheduler}, {len(want.reals)} real servers)"]
    if want is None:
        return [f"virtual server {name} extra ({have.scheduler}, {len(have.real_servers)} real servers)"]
    out = []
    if have.scheduler != want.scheduler:
        out.append(f"virtual server {name} scheduler {have.scheduler}, planned {want.scheduler}")
    if have.persistence_timeout != want.persistence_timeout:
        out.append(f"virtual server {name} persistence {have.persistence_timeout}s, "
                   f"planned {want.persistence_timeout}s")
    return out


def _real_servers(name: str, have: KernelVirtualServer, want: VirtualService) -> list[str]:
    out = []
    reals = {(rs.address, rs.port): rs for rs in have.real_servers}
    for real in sorted(set(reals) | set(want.reals), key=lambda r: (sort_key_ip(r[0]), r[1])):
        where = f"real server {_hostport(*real)} of {name}"
        held = reals.get(real)
        if held is None:
            out.append(f"{where} missing (planned weight {want.reals[real]})")
        elif real not in want.reals:
            if held.weight != 0:  # weight 0: a terminating endpoint draining (see the module's docstring)
                out.append(f"{where} extra (weight {held.weight})")
        else:
            if held.weight != want.reals[real]:
                out.append(f"{where} weight {held.weight}, planned {want.reals[real]}")
            if held.forward != "Masq":
                out.append(f"{where} forward {held.forward}, planned Masq")
    return out


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _covered(ip: str, networks: Networks) -> bool:
    """Whether an address lies in ``networks``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:  # not an address: compared as it is
        return False
    return any(addr in net for net in networks if net.version == addr.version)


def _entry_covered(name: str, entry: str, networks: Networks) -> bool:
    """Whether an ipset entry is about a virtual address in ``networks``; entries about an endpoint
    (KUBE-LOOP-BACK) or a port are never left out."""
    ip = entry_virtual_address(name, entry)
    return ip is not None and _covered(ip, networks)


def _outside(table: KernelTable, networks: Networks) -> KernelTable:
    return msgspec.structs.replace(
        table, virtual_servers=tuple(vs for vs in table.virtual_servers if vs.fwmark or not _covered(vs.address,
                                                                                                      networks)),
        addresses=tuple(ip for ip in table.addresses if not _covered(ip, networks)),
        ipsets={name: tuple(e for e in entries if not _entry_covered(name, e, networks))
                for name, entries in table.ipsets.items()})


def _plan_outside(want: NodeState, networks: Networks) -> NodeState:
    return dataclasses.replace(
        want, ipvs={key: vs for key, vs in want.ipvs.items() if not _covered(key[1], networks)},
        addresses={ip for ip in want.addresses if not _covered(ip, networks)},
        ipsets={name: {e for e in entries if not _entry_covered(name, e, networks)}
                for name, entries in want.ipsets.items()})
