"""Node-wide kernel settings kube-proxy's IPVS mode offers, with its flag names: the IPVS connection
timeouts (``--ipvs-tcp-timeout``, ``--ipvs-tcpfin-timeout``, ``--ipvs-udp-timeout``: ``ipvsadm --set``;
0 leaves the kernel's value) and strict ARP (``--ipvs-strict-arp``: ``arp_ignore=1`` and
``arp_announce=2`` on all interfaces, which MetalLB and kube-vip in layer-2 mode need once load-balancer
addresses sit on kube-ipvs0). What to change, given what the kernel holds, is pure; the netlink and /proc
writes are in the backend; :class:`NodeSettings` (the manager) syncs them at start and at every drift check.
``--cleanup`` leaves these as they are, as kube-proxy's does: kipvs restores nothing, and so never restores
over a value someone else set since.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .conntrack_settings import CPUS, Conntrack
from .conntrack_settings import to_set as conntrack_to_set

if TYPE_CHECKING:  # the backend uses Timeouts: the type only, for the hints
    from .kernel.backend import Backend

log = logging.getLogger("kipvs.applier")

STRICT_ARP = {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}


@dataclass(frozen=True)
class Timeouts:
    """IPVS connection timeouts in seconds (0 in a wish: leave the kernel's value)."""

    tcp: int = 0
    tcp_fin: int = 0
    udp: int = 0

    def differs(self, kernel: Timeouts) -> bool:
        """Whether the kernel must change to satisfy this wish."""
        return any(want and want != have for want, have in ((self.tcp, kernel.tcp), (self.tcp_fin, kernel.tcp_fin),
                                                            (self.udp, kernel.udp)))


def sysctls_to_set(strict_arp: bool, current: dict[str, str]) -> dict[str, str]:
    """The strict-ARP sysctls that differ from what they must be (none when the flag is off)."""
    if not strict_arp:
        return {}
    return {key: value for key, value in STRICT_ARP.items() if current.get(key) != value}


class NodeSettings:
    """The IPVS timeouts, strict ARP and the conntrack sysctls (conntrack_settings.py) as configured, synced at
    start and at every drift check."""

    def __init__(self, kernel: Backend, timeouts: Timeouts, strict_arp: bool, conntrack: Conntrack | None = None,
                 cpus: int = CPUS) -> None:
        self.kernel = kernel
        self.timeouts = timeouts
        self.strict_arp = strict_arp
        self.conntrack = conntrack or Conntrack()
        self.cpus = cpus

    async def sync(self) -> None:
        current = await self.kernel.ipvs_timeouts()
        if self.timeouts.differs(current):
            log.info("IPVS timeouts %s -> %s", current, self.timeouts)
            await self.kernel.set_ipvs_timeouts(self.timeouts)
        changes = sysctls_to_set(self.strict_arp, self.kernel.sysctls(list(STRICT_ARP)))
        if changes:
            log.info("strict ARP: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.kernel.set_sysctls(changes)
        wanted = self.conntrack.sysctls(self.cpus)
        changes = conntrack_to_set(self.conntrack, self.cpus, self.kernel.sysctls(list(wanted)))
        if changes:
            log.info("conntrack: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.kernel.set_sysctls(changes)
