"""UDP/SCTP conntrack cleanup after a write: the manager that runs after every batch (``on_applied``).

UDP and SCTP have no connection end, so conntrack keeps steering a client's datagrams the way its first one
went. As kube-proxy does after each sync (pkg/proxy/conntrack/cleanup.go, ``CleanStaleEntries``), the
entries of flows whose real server left are deleted, of virtual services that went away, and of virtual
services that had no real server until now (their datagrams went to the node itself and would keep doing
so: the CoreDNS-not-ready case). A failed cleanup is logged, never fatal: stale flows expire by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from shared.plan.node_state import RealKey, VirtualService, VSKey

from .kernel.backend import Backend
from .ops import AddReal, DelReal, DelService, Op

log = logging.getLogger("kipvs.applier")

Flow = tuple[VSKey, RealKey | None]  # (virtual service, real server); None: every flow of the service
DATAGRAM = ("UDP", "SCTP")


def stale_flows(ops: list[Op], desired: Mapping[VSKey, VirtualService]) -> list[Flow]:
    """The flows a batch's operations made stale. Pure. ``desired``: the node's virtual services after the
    batch (``DesiredState.services``, not ``state()``: that copies the whole node for one change)."""
    flows: list[Flow] = []
    added: dict[VSKey, int] = {}
    for op in ops:
        if isinstance(op, DelReal) and op.service[0] in DATAGRAM:
            flows.append((op.service, op.real))
        elif isinstance(op, DelService) and op.key[0] in DATAGRAM:
            flows.append((op.key, None))
        elif isinstance(op, AddReal) and op.service[0] in DATAGRAM:
            added[op.service] = added.get(op.service, 0) + 1
    for key, count in sorted(added.items()):
        if key in desired and len(desired[key].reals) == count:  # every real server is new: 0 -> N
            flows.append((key, None))
    return flows


class ConntrackCleanup:
    """Deletes the stale flows of each written batch (off with --conntrack-cleanup=false, for tests)."""

    def __init__(self, kernel: Backend, enabled: bool, deleted: Any) -> None:
        self.kernel = kernel
        self.enabled = enabled
        self.deleted = deleted  # kipvs_applier_conntrack_entries_deleted_total

    async def on_applied(self, ops: list[Op], desired: Mapping[VSKey, VirtualService]) -> None:
        if not self.enabled:
            return
        flows = stale_flows(ops, desired)
        if flows:
            try:
                self.deleted.inc(await self.kernel.clear_conntrack(flows))
            except (OSError, NetlinkError) as exc:
                log.warning("conntrack cleanup failed (%s); stale UDP flows expire by themselves", exc)
