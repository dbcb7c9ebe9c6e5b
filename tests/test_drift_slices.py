"""The drift check's slices (services/applier/drift_slices.py): bounded real-server reads per check, every
service covered within ceil(services / per_check) checks, and a drifted real server found in its slice."""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from services.applier.core import ApplierCore
from services.applier.drift import DriftCheck
from services.applier.drift_slices import Checked, DriftSlices, parts_for
from services.applier.kernel.backend import MemoryKernel, Observed
from services.applier.kernel.rules import SETS, Listed, NftRules, RulesConfig
from services.applier.ops import AddReal, diff, digest
from shared.contract import events
from shared.plan.node_state import NodeState, VirtualService


def state(services: int) -> NodeState:
    out = NodeState()
    for i in range(services):
        vs = VirtualService("TCP", f"10.96.0.{i + 1}", 80, "rr", reals={(f"10.64.0.{i + 1}", 8080): 1,
                                                                        (f"10.64.1.{i + 1}", 8080): 1})
        out.ipvs[vs.key] = vs
    return out


def test_every_service_is_read_once_in_parts_checks() -> None:
    keys = list(state(250).ipvs)
    slices = DriftSlices(per_check=100)
    assert parts_for(250, 100) == 3
    seen: list[int] = [0] * len(keys)
    for _ in range(3):
        checked, parts = slices.next(len(keys))
        assert parts == 3
        for n, key in enumerate(keys):
            seen[n] += checked(key)
    assert seen == [1] * len(keys)
    checked, parts = DriftSlices(per_check=1000).next(len(keys))
    assert parts == 1 and all(checked(k) for k in keys)


def test_a_drifted_real_server_is_found_in_its_slice_and_nowhere_else() -> None:
    want = state(250)
    kernel = copy.deepcopy(want)
    drifted = ("TCP", "10.96.0.7", 80)
    del kernel.ipvs[drifted].reals[("10.64.0.7", 8080)]
    slices = DriftSlices(per_check=100)
    found = []
    for turn in range(3):
        checked, _ = slices.next(len(want.ipvs))
        observed = copy.deepcopy(kernel)
        for key, vs in observed.ipvs.items():  # what observe(checked) returns: no reals outside the slice
            if not checked(key):
                vs.reals = {}
        DriftSlices.assume_unchecked(want, observed, checked)
        ops = diff(want, observed, set(want.ipvs))
        if ops:
            found.append((turn, ops))
    assert len(found) == 1
    assert found[0][1] == [AddReal(drifted, ("10.64.0.7", 8080), 1)]


class _Collected:
    """The drift check's report sink and repair counter (the bus side is tested in test_applier_service)."""

    def __init__(self) -> None:
        self.reports: list[events.DriftReport] = []
        self.repaired = 0

    def report(self, record: events.DriftReport) -> None:
        self.reports.append(record)

    def inc(self, n: int) -> None:
        self.repaired += n


class _SlicedKernel(MemoryKernel):
    """Reads back as the netlink kernel does: real servers only of the services ``checked`` accepts."""

    async def observe(self, checked: Checked | None = None) -> Observed:
        seen = await super().observe(checked)
        for key, vs in seen.state.ipvs.items():
            if checked is not None and not checked(key):
                vs.reals = {}
        return seen


def _service(i: int) -> events.ServicePlan:
    endpoints = tuple(events.Endpoint(ip=f"10.64.{k}.{i % 250 + 1}", port=8080, node="node-a") for k in range(2))
    return events.ServicePlan(key=f"default/s{i}", cluster_ips=(f"10.96.{i // 250}.{i % 250 + 1}",),
                              ports=(events.PortPlan(protocol="TCP", port=80, endpoints=endpoints),))


async def _programmed(services: int) -> tuple[ApplierCore, _SlicedKernel]:
    core = ApplierCore("node-a")
    ops = [events.SetNode(events.NodeFacts(name="node-a"))] + [events.SetService(_service(i)) for i in range(services)]
    touched = core.take(events.PlanDelta(scope="all", seq=1, source_seq=1, ops=tuple(ops)))
    kernel = _SlicedKernel()
    await kernel.setup()
    await kernel.apply(core.resolve(touched or set(), core.facts(), 0.0)[0])
    return core, kernel


async def test_a_check_compares_every_service_but_only_its_slice_s_real_servers() -> None:
    core, kernel = await _programmed(250)
    sink = _Collected()
    drift = DriftCheck(core, kernel, None, sink, sink, per_check=100)  # type: ignore[arg-type]
    for _ in range(3):
        await drift.check()
    assert [r.found for r in sink.reports] == [()] * 3, "real servers not read are not taken as missing"
    assert {(r.desired_digest, r.observed_digest) for r in sink.reports} == {(core.desired.digest(),) * 2}
    assert core.desired.digest() == digest(core.desired.state())
    vip = ("TCP", "10.96.0.7", 80)
    del kernel.ipvs[vip].reals[("10.64.0.7", 8080)]
    kernel.ipvs[("TCP", "10.96.0.9", 80)].scheduler = "wrr"
    kernel.addresses.discard("10.96.0.11")
    kernel.ipsets["KUBE-CLUSTER-IP"].add("10.96.9.9,tcp:80")
    sink.reports.clear()
    await drift.check()
    first = set(sink.reports[0].found)
    assert {"EditService ('TCP', '10.96.0.9', 80) rr 0", "AddAddress 10.96.0.11",
            "DelEntry KUBE-CLUSTER-IP 10.96.9.9,tcp:80"} <= first, "all but real servers: at the next check"
    for _ in range(2):
        await drift.check()
    found = [line for r in sink.reports for line in r.found if line.startswith("AddReal")]
    assert found == ["AddReal ('TCP', '10.96.0.7', 80) ('10.64.0.7', 8080) 1"], "its slice's turn: within 3"
    del kernel.ipvs[("TCP", "10.96.0.20", 80)]
    sink.reports.clear()
    await drift.check()
    assert "AddService ('TCP', '10.96.0.20', 80) rr 0" in sink.reports[0].found
    assert kernel.ipvs[("TCP", "10.96.0.20", 80)].reals == core.desired.services[("TCP", "10.96.0.20", 80)].reals
    assert sink.reports[0].observed_digest == core.desired.digest()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kipvs-drift-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


class _CountedRules(NftRules):
    """kipvs's real nftables table in a test netns; counts the listings (each an ``nft`` process)."""

    listings = 0

    async def listed(self) -> Listed | None:
        self.listings += 1
        return await super().listed()


async def test_the_nftables_table_is_listed_only_after_an_nf_tables_transaction(netns: str) -> None:
    core, kernel = await _programmed(20)
    rules = _CountedRules(RulesConfig(), netns=netns)
    want = core.desired.state().ipsets
    await rules.install(want)
    sink = _Collected()
    drift = DriftCheck(core, kernel, rules, sink, sink, per_check=100)  # type: ignore[arg-type]
    for _ in range(3):
        await drift.check()
    assert rules.listings == 1, "listed once, then the generation said nothing changed"
    before = await rules.generation()
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "element", "inet", "kipvs",
                    SETS["KUBE-CLUSTER-IP"].name, "{ 10.96.0.3 . tcp . 80 }"], check=True)
    assert await rules.generation() != before
    await drift.check()
    assert sink.reports[-1].found == ("nftables table inet kipvs: set members differed; table rewritten",)
    assert (await rules.members())["KUBE-CLUSTER-IP"] == want["KUBE-CLUSTER-IP"]
    await drift.check()
    await drift.check()
    assert sink.reports[-1].found == () and rules.listings == 4, "after the rewrite: listed once, then not"


def _in_netns(netns: str, *nft: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", *nft], check=True)


async def test_a_changed_chain_or_a_deleted_table_is_rewritten(netns: str) -> None:
    """Another program flushing one of kipvs's chains (masquerade gone), adding a rule, or deleting the whole
    table (``nft flush ruleset``, as Debian's nftables.service runs) is drift: the next check rewrites it."""
    core, kernel = await _programmed(20)
    rules = NftRules(RulesConfig(), netns=netns)
    want = core.desired.state().ipsets
    await rules.install(want)
    shape = rules.installed_shape
    sink = _Collected()
    drift = DriftCheck(core, kernel, rules, sink, sink, per_check=100)  # type: ignore[arg-type]
    await drift.check()
    assert sink.reports[-1].found == ()
    chain = "nat_postrouting"  # the masquerade
    for change, why in ((("flush", "chain", "inet", "kipvs", chain), "chains or rules differed"),
                        (("add", "rule", "inet", "kipvs", chain, "accept"), "chains or rules differed"),
                        (("flush", "ruleset"), "missing")):
        _in_netns(netns, *change)
        await drift.check()
        assert sink.reports[-1].found == (f"nftables table inet kipvs: {why}; table rewritten",), change
        listed = await rules.listed()
        assert listed is not None and listed.shape == shape and listed.members == {**listed.members, **want}
        await drift.check()
        assert sink.reports[-1].found == (), "rewritten once, then it matches"
