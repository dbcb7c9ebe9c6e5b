"""The drift check: the manager that reads the kernel back and repairs it (``check``, every --drift-period
and on SIGUSR1, never while a batch is being written).

As kube-proxy's periodic full sync (pkg/proxy/ipvs/proxier.go, ``syncProxyRules`` every --ipvs-sync-period)
but read-back first: the kernel is read (``observe``), diffed with the desired state and only what differs
is written; the nftables table is rewritten when it is missing or its set members, endpoint marks, chains
or rules differ. With --node-addresses interfaces, an interface address that came or went first moves the
NodePorts. Every check ends with a drift report (``kipvs.status.<node>.drift``): what was found, desired
and observed digests.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from shared.contract import events
from shared.plan.node_state import NodeState

from .core import ApplierCore
from .drift_slices import SERVICES_PER_CHECK, Checked, DriftSlices
from .kernel.backend import Backend, KernelError, Observed
from .kernel.rules import NftRules
from .ops import Op, digest
from .reports import Reports

log = logging.getLogger("kipvs.applier")


def describe_op(op: Op) -> str:
    """One operation as a line of a report: its type and fields (``AddReal ('TCP', ...) ('10.0.0.1', 80)``)."""
    return f"{type(op).__name__} " + " ".join(str(v) for v in msgspec.structs.astuple(op))


class DriftCheck:
    """Read back, repair, report."""

    def __init__(self, core: ApplierCore, kernel: Backend, rules: NftRules | None, reports: Reports,
                 repairs: Any, per_check: int = SERVICES_PER_CHECK) -> None:
        self.core = core
        self.kernel = kernel
        self.rules = rules
        self.reports = reports
        self.repairs = repairs  # kipvs_applier_drift_repairs_total
        self.slices = DriftSlices(per_check)  # whose real servers each check reads (drift_slices.py)
        # (nf_tables generation, desired digest, endpoint marks) when the table last matched: see _check_rules
        self.rules_matched: tuple[int | None, str, object] | None = None

    async def check(self) -> None:
        if self.core.use_interfaces:
            await self._follow_addresses()
        want = self.core.desired.state()
        checked, _ = self.slices.next(len(want.ipvs))
        observed = await self.kernel.observe(checked)
        ops = self.core.repair(want, observed, checked)
        found = [describe_op(op) for op in ops]
        left: list[Op] = []
        if ops:
            try:
                await self.kernel.apply(ops)
                log.warning("drift: repaired %d kernel objects", len(ops))
            except KernelError as exc:  # all else applied; the report says what the kernel refused
                found.append(str(exc))
                log.warning("drift: repaired what the kernel took of %d kernel objects; %s", len(ops), exc)
            self.repairs.inc(len(ops))
            observed = await self.kernel.observe(checked)
            left = self.core.repair(want, observed, checked)
        found += await self._check_rules(want.ipsets)
        self.reports.report(events.DriftReport(
            node=self.core.node, plan_seq=self.core.plan.seq, found=events.summarised(found), repaired=True,
            desired_digest=self.core.desired.digest(),
            observed_digest=self._observed_digest(want, observed, left, checked)))

    def _observed_digest(self, want: NodeState, observed: Observed, left: list[Op], checked: Checked) -> str:
        """The desired digest when what was read matches it after the repair (kept per change, so a check
        hashes nothing: drift_slices.py); else the digest of what was read, unread real servers taken as
        desired (a repair that did not take: rare, so its whole-table hash is affordable)."""
        if not left:
            return self.core.desired.digest()
        state = self.core.exclude.hide(observed).state
        DriftSlices.assume_unchecked(want, state, checked)
        return digest(state)

    async def _follow_addresses(self) -> None:
        """An interface address came or went: NodePorts follow."""
        ops = self.core.readdress(await self.kernel.node_addresses(), time.monotonic())
        if ops is not None:
            await self.kernel.apply(ops)
            if self.rules is not None:
                await self.rules.apply(ops)

    async def _check_rules(self, ipsets: dict[str, set[str]]) -> list[str]:
        """The nftables table against ``ipsets``, the endpoint marks and the chains and rules kipvs wrote
        (``NftRules.divergence``): listed (an ``nft`` process, and the whole table decoded) only when an
        nf_tables transaction happened since it last matched this desired state, or the generation cannot be
        read."""
        if self.rules is None:
            return []
        marks = self.rules.marks
        seen = (await self._generation(), self.core.desired.digest(), marks)
        if seen[0] is not None and seen == self.rules_matched:
            return []
        self.rules_matched = None
        why = self.rules.divergence(await self.rules.listed(), ipsets)
        if why:
            await self.rules.install(ipsets)
            return [f"nftables table inet kipvs: {why}; table rewritten"]
        self.rules_matched = seen
        return []

    async def _generation(self) -> int | None:
        assert self.rules is not None
        try:
            return await self.rules.generation()
        except OSError as exc:  # then every check lists the table, as before the generation was read
            log.debug("nf_tables generation unreadable (%s): the drift check lists the table", exc)
            return None
