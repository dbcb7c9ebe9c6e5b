"""Which IPVS services' real servers one drift check reads: a bounded slice, so that a check's cost per
``--drift-period`` stays flat however many Services the node has. Pure.

A full read-back costs one destination dump per IPVS service (libipvs and kube-proxy's ``ipvs.GetRealServers``
in pkg/proxy/ipvs/proxier.go ``syncProxyRules`` do the same, every sync); at 10,000 Services that is most of a
drift check. So each check reads every service (one dump: scheduler, persistence, existence), every
kube-ipvs0 address and every ipset (decoded only where their bytes changed: kernel/decode_memo.py), but the
real servers of only one slice of at most ``per_check`` services; the slices take turns, so every service's
real servers are read within ``parts`` checks (``ceil(services / per_check)``), i.e. a drifted real server
is found within that many drift periods (one period up to ``per_check`` Services). The diff compares no
real server outside the slice (``ops.diff``'s ``reals_read``); :meth:`DriftSlices.assume_unchecked` gives
them their desired ones where a whole read-back state is needed (the digest of a repair that did not take).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.plan.node_state import NodeState, VSKey

SERVICES_PER_CHECK = 1000  # --drift-check-services' default

Checked = Callable[[VSKey], bool]


def parts_for(services: int, per_check: int) -> int:
    """How many drift checks it takes to read every service's real servers."""
    return max(1, -(-services // max(1, per_check)))


@dataclass
class DriftSlices:
    per_check: int = SERVICES_PER_CHECK
    turn: int = 0

    def next(self, services: int) -> tuple[Checked, int]:
        """The next slice of a node with ``services`` IPVS services: (is this service's key in it, how many
        slices there are now). Keys are spread over slices by hash (stable for this process)."""
        parts = parts_for(services, self.per_check)
        part = self.turn % parts
        self.turn += 1
        if parts == 1:
            return (lambda key: True), 1
        return (lambda key: hash(key) % parts == part), parts

    @staticmethod
    def assume_unchecked(want: NodeState, observed: NodeState, checked: Checked) -> None:
        """Give each observed service outside the slice its desired real servers (they were not read)."""
        for key, vs in observed.ipvs.items():
            wanted = want.ipvs.get(key)
            if wanted is not None and not checked(key):
                vs.reals = dict(wanted.reals)
