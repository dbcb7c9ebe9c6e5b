"""The applier's pure core against the memory kernel: incremental operations reach exactly the desired
state, a full diff of a converged kernel is empty, foreign services survive; and the capability check
against this host's real kernel, which has no IPVS."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.applier.kernel.backend import CapabilityError, MemoryKernel
from services.applier.kernel.netlink_writer import NetlinkKernel
from services.applier.ops import AddService, DesiredState, diff, digest
from shared.plan.node_state import VirtualService
from shared.plan.resolve import resolve_node, resolve_service
from tests import kube
from tests.test_planner_properties import Driver, step

NODE = "node-a"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=40))
async def test_incremental_ops_reach_the_desired_state(steps) -> None:
    driver = Driver()
    kernel = MemoryKernel()
    await kernel.setup()
    desired = DesiredState()
    node_seen = None
    for s in steps:
        driver.play([s])
        facts = driver.planner.nodes.get(NODE)
        if facts != node_seen:  # the node's own facts changed: every Service is re-resolved
            keys = set(desired.contributions) | set(driver.planner.plans)
            node_seen = facts
        else:
            keys = set(desired.contributions) ^ set(driver.planner.plans) | set(driver.planner.plans)
        ops = []
        for key in sorted(keys):
            plan = driver.planner.plans.get(key)
            ops += desired.update(key, resolve_service(plan, facts) if plan else None)
        await kernel.apply(ops)  # raises on EEXIST / ENOENT: every op must fit the kernel's state
    observed = await kernel.observe()
    want = desired.state()
    assert observed.state.ipvs == want.ipvs
    assert observed.state.addresses == want.addresses
    assert observed.state.ipsets == want.ipsets
    assert diff(want, observed.state, observed.owned) == []
    assert desired.digest() == digest(want) == digest(observed.state), "the incremental digest drifted"
    # ... and it is what `kipvs plan` computes from scratch, even when two Services claim one VIP:port and
    # the holder lets go (the next claimant takes it over at once).
    scratch = resolve_node(driver.planner.plans.values(), driver.planner.nodes.get(NODE))
    assert want.ipvs == scratch.ipvs and want.addresses == scratch.addresses and want.ipsets == scratch.ipsets
    # A bootstrap's DesiredState.of (built without the per-change operations) is the same state and digest,
    # and its diff against an empty kernel programs exactly that state.
    whole = DesiredState.of(driver.planner.plans, driver.planner.nodes.get(NODE))
    assert whole.digest() == desired.digest() and whole.owners == desired.owners
    fresh = MemoryKernel()
    await fresh.setup()
    await fresh.apply(diff(whole.state(), (await fresh.observe()).state, set()))
    assert (await fresh.observe()).state.ipvs == want.ipvs
    # Its digest, computed when first asked, follows the changes made before and after that.
    for key in sorted(whole.contributions)[:2]:
        whole.update(key, None)
        assert whole.digest() == digest(whole.state())


async def test_diff_leaves_foreign_services_alone_and_removes_stale_owned_ones() -> None:
    kernel = MemoryKernel()
    await kernel.setup()
    kernel.ipvs[("TCP", "192.0.2.9", 443)] = VirtualService("TCP", "192.0.2.9", 443, "wlc")  # foreign
    await kernel.apply([AddService(("TCP", "10.96.0.1", 80), "rr", 0)])  # ours, no longer planned
    observed = await kernel.observe()
    desired = DesiredState().state()
    ops = diff(desired, observed.state, observed.owned)
    assert [type(op).__name__ for op in ops] == ["DelService"] and ops[0].key == ("TCP", "10.96.0.1", 80)


async def test_service_change_is_one_in_place_edit() -> None:
    driver = Driver()
    driver.put(kube.service("web", cluster_ip="10.96.0.10"))
    plan = driver.planner.plans["default/web"]
    desired = DesiredState()
    desired.update("default/web", resolve_service(plan, None))
    ops = desired.update("default/web", resolve_service(msgspec.structs.replace(plan, scheduler="lc"), None))
    assert [type(op).__name__ for op in ops] == ["EditService"]


async def test_capability_check_on_a_kernel_without_ipvs_says_so() -> None:
    # This host's kernel has no IPVS (CONFIG_IP_VS unset): the real check against the real kernel.
    kernel = NetlinkKernel()
    with pytest.raises(CapabilityError, match=r"the kernel has no IPVS.*modprobe ip_vs.*--backend memory"):
        await kernel.check()
    await kernel.close()


async def test_two_services_on_one_vip_port_hand_over_at_once() -> None:
    from shared.contract.events import Endpoint, PortPlan, ServicePlan

    def svc(name: str, pod_ip: str) -> ServicePlan:
        return ServicePlan(key=f"default/{name}", cluster_ips=("10.96.0.50",),
                           ports=(PortPlan(port=80, endpoints=(Endpoint(ip=pod_ip, port=8080),)),))

    a, b = svc("a", "10.244.1.1"), svc("b", "10.244.1.2")
    kernel = MemoryKernel()
    await kernel.setup()
    desired = DesiredState()
    plans: dict[str, ServicePlan] = {}

    async def step(plan: ServicePlan, gone: bool = False) -> None:
        if gone:
            plans.pop(plan.key)
        else:
            plans[plan.key] = plan
        await kernel.apply(desired.update(plan.key, None if gone else resolve_service(plan, None)))
        assert desired.state().ipvs == resolve_node(plans.values(), None).ipvs, "as kipvs plan computes it"
        assert (await kernel.observe()).state.ipvs == desired.state().ipvs

    await step(b)
    await step(a)  # a arrives second but has the smaller key: it holds the VIP:port, as resolve_node says
    assert set(desired.state().ipvs[("TCP", "10.96.0.50", 80)].reals) == {("10.244.1.1", 8080)}
    await step(a, gone=True)  # a lets go: b takes over in the same update, not on its next change
    assert set(desired.state().ipvs[("TCP", "10.96.0.50", 80)].reals) == {("10.244.1.2", 8080)}
    await step(b, gone=True)
    assert desired.state().ipvs == {}
