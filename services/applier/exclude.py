"""``--ipvs-exclude-cidrs``: address ranges whose IPVS virtual services belong to another program.

kube-proxy's flag (``KubeProxyIPVSConfiguration.ExcludeCIDRs``): its full sync deletes every IPVS service
it did not create this round, except those whose address is in these ranges (pkg/proxy/ipvs/proxier.go
``cleanLegacyService`` / ``isIPInExcludeCIDRs``). kipvs never deletes a service it did not create anyway
(the KIPVS-OWNED-VS sets); in these ranges it goes further and keeps out entirely: it never programs a
virtual service there (which would take over a service someone else made), never deletes or edits one
(even one an earlier run created), never binds or unbinds such an address on kube-ipvs0, and keeps such
addresses out of its sets (the entries keyed by a virtual address; KUBE-LOOP-BACK's pod-keyed entries
stay), so its nftables rules do not touch the other program's traffic either. The
other program owns the range; a Service planned there is logged, once per change. ``--cleanup`` is the
exception: it removes every service kipvs created, in the ranges too (kube-proxy's ``--cleanup`` flushes
the whole IPVS table).

Pure: a filter over what the planner resolves and what the kernel read back.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from shared.plan.node_state import Contribution, entry_virtual_address
from shared.service import sloppy

from .kernel.backend import Observed

log = logging.getLogger("kipvs.applier")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse(values: Iterable[str]) -> tuple[Network, ...]:
    """The ranges, from flag values that may each hold a comma-separated list (as kube-proxy's flag), read
    as kube-proxy reads them (``ParseCIDRSloppy``: proxier.go ``parseExcludedCIDRs``, validation.go
    ``validateIPVSExcludeCIDRs``; leading zeros decimal, IPv4-mapped forms IPv4: shared/service/sloppy.py).
    Raises ValueError naming the value that is no CIDR."""
    out = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            parsed = sloppy.parse_cidr(part)
            if parsed is None:
                raise ValueError(f"ipvs_exclude_cidrs: {part!r} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)")
            out.append(ipaddress.ip_network(parsed[0]))
    return tuple(out)


@dataclass(frozen=True)
class ExcludeCIDRs:
    networks: tuple[Network, ...] = ()

    def covers(self, ip: str) -> bool:
        if not self.networks:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.networks if net.version == addr.version)

    def contribution(self, c: Contribution | None) -> Contribution | None:
        """A Service's contribution without what lies in the ranges: virtual services, kube-ipvs0
        addresses and the set entries keyed by such an address. Entries about an endpoint stay (a pod
        reaching itself through its Service needs its KUBE-LOOP-BACK entry even when pod IPs are in
        the ranges)."""
        if c is None or not self.networks:
            return c
        kept = [vs for vs in c.virtual_services if not self.covers(vs.ip)]
        if len(kept) != len(c.virtual_services):
            skipped = sorted({f"{vs.ip}:{vs.port}" for vs in c.virtual_services if self.covers(vs.ip)})
            log.warning("not programming %s of %s: in --ipvs-exclude-cidrs (another program's IPVS services)",
                        ", ".join(skipped), c.virtual_services[0].service)
        entries = {(name, e) for name, e in c.ipset_entries
                   if (ip := entry_virtual_address(name, e)) is None or not self.covers(ip)}
        return replace(c, virtual_services=kept, addresses={ip for ip in c.addresses if not self.covers(ip)},
                       ipset_entries=entries)

    def hide(self, observed: Observed) -> Observed:
        """What the kernel holds, with the ranges' virtual services and kube-ipvs0 addresses left out: a
        diff against it never deletes, edits or unbinds them."""
        if not self.networks:
            return observed
        state = observed.state
        visible = replace(state, ipvs={k: vs for k, vs in state.ipvs.items() if not self.covers(k[1])},
                          addresses={ip for ip in state.addresses if not self.covers(ip)})
        return replace(observed, state=visible, owned={k for k in observed.owned if not self.covers(k[1])})
