"""Parity, third round (issue 23), the applier's part that needs no kernel: the mh scheduler's port flag,
conn_reuse_mode by kernel version, source ranges on the output path, ``--ipvs-exclude-cidrs``. The same
behaviours in a real kernel, with packets: tests/guest/kernel_applier.py and kernel_datapath.py."""

from __future__ import annotations

import argparse
import ipaddress
import struct

import pytest

from services.applier import exclude
from services.applier.kernel import ipvs_wire, rules
from services.applier.kernel.backend import MemoryKernel, Observed
from services.applier.kernel.ipvs_wire import observed_scheduler
from services.applier.main import ApplierConfig, settings_of
from services.applier.node_settings import (
    CONN_REUSE_MODE,
    OSRELEASE,
    NodeSettings,
    Timeouts,
    conn_reuse_mode,
    sysctls_to_set,
)
from services.applier.ops import AddService, DelAddress, DelService, DesiredState, EditService, diff
from shared.contract.events import KernelTable
from shared.plan.divergence import divergences
from shared.plan.node_state import Contribution, NodeState, VirtualService
from shared.service import config
from shared.service.cli import main as kipvs

# --- 5. the mh scheduler's port flag ------------------------------------------------------------------


def _flags(body: bytes) -> int:
    """IPVS_SVC_ATTR_FLAGS of an encoded IPVS_CMD_ATTR_SERVICE."""
    offset = 4  # the nested service attribute's header
    while offset < len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if kind == ipvs_wire.SVC_FLAGS:
            return struct.unpack_from("=I", body, offset + 4)[0]
        offset += (length + 3) & ~3
    raise AssertionError("no flags attribute")


@pytest.mark.parametrize(("scheduler", "timeout", "flags"), [
    ("mh", 0, 0x10), ("mh", 10800, 0x11), ("rr", 0, 0), ("sh", 10800, 0x1)])
def test_mh_is_always_written_with_mh_port(scheduler: str, timeout: int, flags: int) -> None:
    assert _flags(ipvs_wire.service_full(6, "10.96.0.10", 80, scheduler, timeout)) == flags


def test_an_mh_service_without_mh_port_reads_back_as_different_and_is_repaired() -> None:
    assert observed_scheduler("mh", 0x10) == "mh" and observed_scheduler("rr", 0) == "rr"
    desired, observed = NodeState(), NodeState()
    desired.ipvs[("TCP", "10.96.0.10", 80)] = VirtualService("TCP", "10.96.0.10", 80, "mh")
    observed.ipvs[("TCP", "10.96.0.10", 80)] = VirtualService("TCP", "10.96.0.10", 80, observed_scheduler("mh", 0))
    assert diff(desired, observed, set(observed.ipvs)) == [EditService(("TCP", "10.96.0.10", 80), "mh", 0)]


# --- 6. conn_reuse_mode by kernel version ---------------------------------------------------------------


@pytest.mark.parametrize(("release", "want"), [
    ("4.18.0-305.el8.x86_64", "0"), ("5.4.0-42-generic", "0"), ("4.1.0", "0"), ("5.8.18", "0"),
    ("5.9.0", None), ("6.1.0-13-amd64", None), ("4.0.9", None), ("3.10.0-1160.el7.x86_64", None), ("", None)])
def test_conn_reuse_mode_is_set_to_0_from_4_1_to_5_8_as_kube_proxy_does(release: str, want: str | None) -> None:
    assert conn_reuse_mode(release) == want
    current = {OSRELEASE: release, CONN_REUSE_MODE: "1"}
    assert sysctls_to_set(False, current) == ({CONN_REUSE_MODE: "0"} if want else {})
    assert sysctls_to_set(False, {**current, CONN_REUSE_MODE: "0"}) == {}, "already right: nothing written"


@pytest.mark.parametrize(("release", "written"), [("5.4.0-42-generic", "0"), ("6.1.0-13-amd64", "1")])
async def test_the_applier_writes_conn_reuse_mode_by_the_kernels_release(release: str, written: str) -> None:
    kernel = MemoryKernel(sysctl_values={OSRELEASE: release, CONN_REUSE_MODE: "1"})
    await NodeSettings(kernel, Timeouts(), strict_arp=False).sync()
    assert kernel.sysctl_values[CONN_REUSE_MODE] == written


# --- 7. source ranges on the output path ------------------------------------------------------------------


def test_source_ranges_are_checked_on_output_before_ipvs() -> None:
    table = rules.ruleset(rules.RulesConfig(), {})
    chain = table.split("chain filter_output {")[1].split("}")[0]
    assert "type filter hook output priority -110;" in chain and "jump source_ranges" in chain
    assert rules.OUTPUT_PRIORITY < -99, "before IPVS's LOCAL_OUT hook (NF_IP_PRI_NAT_DST + 1)"


# --- 8. --ipvs-exclude-cidrs ----------------------------------------------------------------------------

EXCLUDED = exclude.ExcludeCIDRs(exclude.parse(["10.97.0.0/16,fd00:97::/64", "203.0.113.0/24"]))


def _contribution(ip: str, port: int = 80) -> Contribution:
    c = Contribution()
    c.virtual_services.append(VirtualService("TCP", ip, port, "rr", service="default/x"))
    c.addresses.add(ip)
    c.ipset_entries |= {("KUBE-CLUSTER-IP", f"{ip},tcp:{port}"), ("KUBE-NODE-PORT-TCP", "30080")}
    return c


def test_a_service_in_the_excluded_ranges_is_never_programmed_nor_bound() -> None:
    desired = DesiredState(only=EXCLUDED.contribution)
    assert desired.update("default/x", _contribution("10.97.0.5")) == [
        __import__("services.applier.ops", fromlist=["AddEntry"]).AddEntry("KUBE-NODE-PORT-TCP", "30080")]
    state = desired.state()
    assert not state.ipvs and not state.addresses and state.ipsets["KUBE-CLUSTER-IP"] == set()
    ops = desired.update("default/y", _contribution("10.96.0.5"))
    assert AddService(("TCP", "10.96.0.5", 80), "rr", 0) in ops, "outside the ranges: as always"


def test_nothing_in_the_excluded_ranges_is_deleted_edited_or_unbound_even_if_kipvs_made_it() -> None:
    observed = NodeState()
    for ip in ("10.97.0.5", "fd00:97::5", "10.96.0.9"):
        observed.ipvs[("TCP", ip, 80)] = VirtualService("TCP", ip, 80, "wlc")
        observed.addresses.add(ip)
    seen = EXCLUDED.hide(Observed(observed, owned=set(observed.ipvs)))
    ops = diff(DesiredState(only=EXCLUDED.contribution).state(), seen.state, seen.owned)
    assert set(ops) >= {DelService(("TCP", "10.96.0.9", 80)), DelAddress("10.96.0.9")}
    assert not [op for op in ops if "10.97.0.5" in repr(op) or "fd00:97::5" in repr(op)], ops
    taken = DesiredState(only=EXCLUDED.contribution)
    taken.update("default/x", _contribution("10.97.0.5"))
    assert not [op for op in diff(taken.state(), seen.state, seen.owned) if "10.97.0.5" in repr(op)], \
        "a planned Service on another program's service does not take it over"


def test_excluded_pod_ranges_keep_the_hairpin_entries() -> None:
    """--ipvs-exclude-cidrs covering the pod network: only entries keyed by a virtual address go; the
    KUBE-LOOP-BACK entry (podIP,proto:port,podIP) of a pod reaching itself through its Service stays, in
    the applier's filter and in shadow mode's comparison."""
    pods = exclude.ExcludeCIDRs(exclude.parse(["10.244.0.0/16", "fd00:244::/64"]))
    c = _contribution("10.244.9.9")  # a virtual service on a pod address is still excluded
    c.ipset_entries |= {("KUBE-LOOP-BACK", "10.244.1.5,tcp:8080,10.244.1.5"),
                        ("KUBE-6-LOOP-BACK", "fd00:244::5,tcp:8080,fd00:244::5"),
                        ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "10.244.9.9,tcp:80,10.0.0.0/8")}
    kept = pods.contribution(c)
    assert kept is not None and kept.ipset_entries == {
        ("KUBE-LOOP-BACK", "10.244.1.5,tcp:8080,10.244.1.5"), ("KUBE-6-LOOP-BACK", "fd00:244::5,tcp:8080,fd00:244::5"),
        ("KUBE-NODE-PORT-TCP", "30080")}
    want = NodeState()
    want.add(kept)
    table = KernelTable(ipsets={"KUBE-LOOP-BACK": (), "KUBE-6-LOOP-BACK": (), "KUBE-NODE-PORT-TCP": ("30080",)})
    assert divergences(table, want.finish(), ["10.244.0.0/16", "fd00:244::/64"]) == [
        "ipset KUBE-LOOP-BACK entry 10.244.1.5,tcp:8080,10.244.1.5 missing",
        "ipset KUBE-6-LOOP-BACK entry fd00:244::5,tcp:8080,fd00:244::5 missing"]


def test_exclude_cidrs_flag_is_kube_proxys_and_a_bad_range_is_one_line(capsys) -> None:
    assert ApplierConfig(node="n", ipvs_exclude_cidrs=["10.97.0.0/16,fd00::/8"]).ipvs_exclude_cidrs
    with pytest.raises(ValueError, match=r"ipvs_exclude_cidrs: '10.97.0.0/33' is not a CIDR"):
        ApplierConfig(node="n", ipvs_exclude_cidrs=["10.97.0.0/33"])
    with pytest.raises(SystemExit):
        kipvs(["applier", "--help"])
    assert "--ipvs-exclude-cidrs" in capsys.readouterr().out


def test_legacy_cidrs_in_the_applier_flags_are_read_as_kube_proxy_reads_them() -> None:
    """kube-proxy validates and reads --ipvs-exclude-cidrs, --nodeport-addresses and --cluster-cidr with
    ParseCIDRSloppy (pkg/proxy/apis/config/validation ``validateIPVSExcludeCIDRs``,
    ``validateKubeProxyNodePortAddress``; proxier.go ``parseExcludedCIDRs``): leading zeros decimal,
    ``::ffff:a.b.c.d/120`` IPv4. kipvs refused them. A bare address is no CIDR to either."""
    flags = _cli(ApplierConfig, ["--node", "n", "--ipvs-exclude-cidrs", "10.097.0.0/16, ::ffff:203.0.113.0/120",
                                   "--nodeport-addresses", "192.000.2.0/24", "--cluster-cidr", "10.244.000.0/16"])
    cfg = config.load(ApplierConfig, flags, {})
    assert exclude.parse(cfg.ipvs_exclude_cidrs) == (ipaddress.ip_network("10.97.0.0/16"),
                                                     ipaddress.ip_network("203.0.113.0/24"))
    assert settings_of(cfg).exclude.covers("10.97.0.5") and not settings_of(cfg).exclude.covers("10.96.0.5")
    assert (cfg.nodeport_cidrs, settings_of(cfg).nodeport_cidrs) == (["192.0.2.0/24"], ("192.0.2.0/24",))
    assert cfg.cluster_cidr == ["10.244.0.0/16"]
    with pytest.raises(ValueError, match=r"ipvs_exclude_cidrs: '10.97.0.1' is not a CIDR"):
        ApplierConfig(node="n", ipvs_exclude_cidrs=["10.97.0.1"])
    with pytest.raises(ValueError, match=r"nodeport_cidrs: '192.0.2.256/24' is not a CIDR"):
        ApplierConfig(node="n", nodeport_cidrs=["192.0.2.256/24"])


def test_the_applier_core_keeps_out_of_the_excluded_ranges_at_bootstrap_and_drift() -> None:
    from services.applier.core import ApplierCore
    from shared.contract.events import PortPlan, ServicePlan
    from shared.plan.plan_state import SharedPlan

    plan = SharedPlan()
    plan.services["default/other"] = ServicePlan(key="default/other", cluster_ips=("10.97.0.5",),
                                                 ports=(PortPlan(name="http", port=80),))
    plan.services["default/web"] = ServicePlan(key="default/web", cluster_ips=("10.96.0.5",),
                                               ports=(PortPlan(name="http", port=80),))
    core = ApplierCore("node-a", exclude=EXCLUDED)
    core.reset(plan)
    foreign = NodeState()
    foreign.ipvs[("TCP", "10.97.0.5", 80)] = VirtualService("TCP", "10.97.0.5", 80, "wlc")
    foreign.addresses.add("10.97.0.5")
    observed = Observed(foreign, owned={("TCP", "10.97.0.5", 80)})
    for ops in (core.converge(observed, 0.0), core.repair(core.desired.state(), observed)):
        assert AddService(("TCP", "10.96.0.5", 80), "rr", 0) in ops
        assert not [op for op in ops if "10.97.0.5" in repr(op)], ops


def _cli(cls: type, argv: list[str]) -> dict:
    """Command-line flags as ``kipvs applier`` parses them (kube-proxy's names included)."""
    parser = argparse.ArgumentParser()
    config.add_flags(parser, cls)
    return vars(parser.parse_args(argv))
