"""Node-wide kernel settings kube-proxy's IPVS mode offers, with its flag names: the IPVS connection
timeouts (``--ipvs-tcp-timeout``, ``--ipvs-tcpfin-timeout``, ``--ipvs-udp-timeout``: ``ipvsadm --set``;
0 leaves the kernel's value) and strict ARP (``--ipvs-strict-arp``: ``arp_ignore=1`` and
``arp_announce=2`` on all interfaces, which MetalLB and kube-vip in layer-2 mode need once load-balancer
addresses sit on kube-ipvs0), and ``net.ipv4.vs.conn_reuse_mode=0`` on the kernels that need it (below).
What to change, given what the kernel holds, is pure; the netlink and /proc writes are in the backend;
:class:`NodeSettings` (the manager) syncs them at start and at every drift check. ``--cleanup`` leaves
these as they are, as kube-proxy's does: kipvs restores nothing, and so never restores over a value
someone else set since.
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
CONN_REUSE_MODE = "net.ipv4.vs.conn_reuse_mode"
OSRELEASE = "kernel.osrelease"
# pkg/util/kernel/constants.go: IPVSConnReuseModeMinSupportedKernelVersion, IPVSConnReuseModeFixedKernelVersion
CONN_REUSE_MIN, CONN_REUSE_FIXED = (4, 1), (5, 9)
KEYS = (*STRICT_ARP, CONN_REUSE_MODE, OSRELEASE)  # what sync reads back


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string (``4.18.0-305.el8.x86_64`` -> (4, 18)), None if it has
    none (k8s.io/apimachinery version.ParseGeneric reads the leading numbers the same way)."""
    parts = release.strip().split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    minor = ""
    for ch in parts[1]:
        if not ch.isdigit():
            break
        minor += ch
    return (int(parts[0]), int(minor)) if minor else None


def conn_reuse_mode(release: str) -> str | None:
    """The ``net.ipv4.vs.conn_reuse_mode`` kube-proxy wants on this kernel, None to leave it alone.

    pkg/proxy/ipvs/proxier.go ``NewProxier``: below 4.1 the sysctl does not exist (kube-proxy logs that it
    cannot set it); from 5.9 the kernel no longer drops the SYN of a reused source port (kubernetes#93297),
    so it is left as is; in between (RHEL 8's 4.18, Ubuntu 20.04's 5.4) it is set to 0, or with
    ``vs.conntrack=1`` such a SYN is dropped and the client waits a second for its retransmission
    (kubernetes#81775). An unreadable release leaves it alone too."""
    version = kernel_version(release)
    if version is None or version < CONN_REUSE_MIN or version >= CONN_REUSE_FIXED:
        return None
    return "0"


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
    """The sysctls that differ from what they must be, given ``current`` (read for :data:`KEYS`; the
    kernel's release is ``kernel.osrelease``): strict ARP's when the flag is on, and ``conn_reuse_mode``
    where :func:`conn_reuse_mode` wants it."""
    wanted = dict(STRICT_ARP) if strict_arp else {}
    reuse = conn_reuse_mode(current.get(OSRELEASE, ""))
    if reuse is not None:
        wanted[CONN_REUSE_MODE] = reuse
    return {key: value for key, value in wanted.items() if current.get(key) != value}


class NodeSettings:
    """The IPVS timeouts, strict ARP, conn_reuse_mode (by kernel version) and the conntrack sysctls
    (conntrack_settings.py) as configured, synced at start and at every drift check."""

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
        changes = sysctls_to_set(self.strict_arp, self.kernel.sysctls(list(KEYS)))
        if changes:
            log.info("node sysctls: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.kernel.set_sysctls(changes)
        wanted = self.conntrack.sysctls(self.cpus)
        changes = conntrack_to_set(self.conntrack, self.cpus, self.kernel.sysctls(list(wanted)))
        if changes:
            log.info("conntrack: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
            self.kernel.set_sysctls(changes)
