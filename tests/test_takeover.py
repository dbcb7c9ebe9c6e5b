"""Taking a node over from kube-proxy in place (services/applier/takeover.py), fast: the adoption rule
against the memory kernel, and the order of kube-proxy's chain removal. The proof with traffic through a
real kernel is tests/test_disruption.py."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

from services.applier import node_facts, takeover
from services.applier.exclude import ExcludeCIDRs, parse
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, settings_of
from services.applier.ops import AddService, DelService, diff
from services.tools.status import NodeStatus, render
from shared.plan.node_state import NodeState, VirtualService
from tests.guest import kube_proxy

WEB, DNS, API = ("TCP", "10.96.0.10", 80), ("UDP", "10.96.0.53", 53), ("TCP", "10.96.0.20", 8080)
OTHER = ("TCP", "192.0.2.9", 443)  # someone else's (a keepalived VIP): not in kipvs's plan
EXCLUDED = ("TCP", "10.200.0.5", 80)  # in the plan, but inside an excluded CIDR
EXCLUDE = ExcludeCIDRs(parse(["10.200.0.0/16"]))


def vs(key: tuple[str, str, int], *reals: str) -> VirtualService:
    service = VirtualService(key[0], key[1], key[2], "rr")
    service.reals = {(ip, 8080): 1 for ip in reals}
    return service


async def kube_proxy_node() -> MemoryKernel:
    """A kernel as kube-proxy left it: its services (no kipvs ownership records), one of them missing a
    real server kipvs plans, and a service that is nobody's business."""
    kernel = MemoryKernel()
    await kernel.setup()
    for service in (vs(WEB, "10.244.1.11"), vs(DNS, "10.244.1.12"), vs(API, "10.244.1.13"), vs(EXCLUDED),
                    vs(OTHER, "192.0.2.10")):
        kernel.ipvs[service.key] = service
    return kernel


def plan() -> NodeState:
    state = NodeState()
    for service in (vs(WEB, "10.244.1.11", "10.244.2.11"), vs(DNS, "10.244.1.12"), vs(API, "10.244.1.13"),
                    vs(EXCLUDED)):
        state.ipvs[service.key] = service
    return state


async def test_adoption_owns_the_planned_services_as_they_are_and_writes_only_differences() -> None:
    kernel, desired = await kube_proxy_node(), plan()
    assert await takeover.adopt(kernel, desired, EXCLUDE) == 3
    observed = await kernel.observe()
    assert observed.owned == {WEB, DNS, API}, "the planned services outside the excluded CIDRs"
    ops = diff(desired, observed.state, observed.owned)
    assert not [op for op in ops if isinstance(op, AddService | DelService)], ops  # nothing re-created
    await kernel.apply(ops)
    assert kernel.ipvs[WEB].reals == {("10.244.1.11", 8080): 1, ("10.244.2.11", 8080): 1}
    assert await takeover.adopt(kernel, desired, EXCLUDE) == 0, "adopting again is a no-op"


async def test_an_adopted_service_leaving_the_plan_is_deleted_a_foreign_one_never() -> None:
    kernel, desired = await kube_proxy_node(), plan()
    await takeover.adopt(kernel, desired)
    del desired.ipvs[API]  # its Service is deleted later
    observed = await kernel.observe()
    ops = diff(desired, observed.state, observed.owned)
    assert DelService(API) in ops
    assert DelService(OTHER) not in ops and OTHER in kernel.ipvs
    assert takeover.foreign(desired, observed) == [OTHER]


async def test_without_adoption_kube_proxys_services_are_never_kipvss_to_delete() -> None:
    kernel, desired = await kube_proxy_node(), plan()  # what a switch without --adopt leaves behind
    del desired.ipvs[API]
    observed = await kernel.observe()
    assert DelService(API) not in diff(desired, observed.state, observed.owned)


def test_kube_proxy_chains_are_removed_as_kube_proxy_cleans_them_up() -> None:
    commands = takeover.removal_commands("iptables")
    verbs = [argv[5] for argv in commands]
    jumps, chains = len(takeover.KUBE_PROXY_JUMPS), len(takeover.KUBE_PROXY_CHAINS)
    assert verbs == ["-D"] * jumps + ["-F"] * chains + ["-X"] * chains  # unlink, flush all, then delete
    assert commands[0] == ["iptables", "-w", "5", "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment",
                           "kubernetes service portals", "-j", "KUBE-SERVICES"]
    assert {(argv[4], argv[6]) for argv in commands if argv[5] == "-X"} == set(takeover.KUBE_PROXY_CHAINS)


async def test_the_takeover_is_recorded_on_the_link_and_shown_by_node_facts() -> None:
    kernel = await kube_proxy_node()
    await takeover.adopt(kernel, plan())
    owner, when = node_facts.link_owner(kernel.link_alias)
    assert owner == "kipvs" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when), kernel.link_alias
    assert node_facts.link_owner(node_facts.LINK_ALIAS) == ("kipvs", "")
    assert node_facts.link_owner(None) == node_facts.link_owner("") == ("other", "")
    observation = node_facts.Observation(ipvs_available=True, kube_ipvs0=owner, taken_over=when)
    assert node_facts.report("node-a", observation, "off", "").taken_over == when
    shown = render([NodeStatus("node-a", applied_seq=3, behind=0, report_age_s=1.0, taken_over=when)], 3)
    assert f"taken over from kube-proxy in place at {when}" in shown


async def test_adopt_reads_a_comma_separated_exclude_flag_as_the_applier_does() -> None:
    """`--adopt --ipvs-exclude-cidrs "10.200.0.0/16, fd00:97::/64"`: one parsed value serves both the
    takeover and the exclusion (it crashed on ip_network of the raw flag string)."""
    settings = settings_of(ApplierConfig(node="n", adopt=True,
                                         ipvs_exclude_cidrs=["10.200.0.0/16, fd00:97::/64", "10.201.0.0/16"]))
    kernel, desired = await kube_proxy_node(), plan()
    assert await takeover.adopt(kernel, desired, settings.exclude) == 3
    assert (await kernel.observe()).owned == {WEB, DNS, API}


CREATE_SETS = """
import asyncio
from pyroute2 import AsyncIPSet
from services.applier.kernel.netlink_writer import create_sets
async def main():
    async with AsyncIPSet() as ipset:  # as the applier's writer opens it (NetlinkWriter._open)
        await create_sets(ipset)
asyncio.run(main())
"""


def test_kube_proxy_syncs_over_the_ipsets_kipvs_made() -> None:
    """A node handed back to kube-proxy after kipvs made its ipsets (a reboot under kipvs, or a node kube-proxy
    never ran on): kube-proxy's ``ipset create NAME TYPE ... comment -exist`` (ipset.go ``createSet``, as
    tests/guest/kube_proxy.py writes it) must accept each set, or every kube-proxy sync fails. Real ipsets,
    in a fresh network namespace (found by the disruption test's reboot then hand back)."""
    netns = f"kipvs-sets-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CREATE_SETS], check=True, timeout=60,
                       cwd=Path(__file__).parent.parent)
        kube_proxy.write_ipsets(netns, NodeState())  # raises, naming the set, when the kernel refuses one
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)


def test_a_node_behind_only_by_its_paced_report_says_so() -> None:
    shown = render([NodeStatus("node-a", applied_seq=3, behind=2, report_age_s=1.0),
                    NodeStatus("node-b", applied_seq=5, behind=0, report_age_s=1.0)], 5)
    rows = shown.splitlines()
    assert rows[2].endswith("ok (behind by its last report, within the limits)") and rows[3].endswith(" ok"), shown
