"""Node-envelope benchmark (issue 22), inside the QEMU guest: one node at S Services x E endpoints through
the applier's code path, against ``ipvsadm -R`` / ``ipvsadm -Sn`` / ``ip -batch`` / ``ipset restore`` doing
the same work in the same guest run. ``make bench`` runs 1,000 x 10; by hand:
``python -m tests.bench envelope --services 10000 --endpoints 10``. Figures and goals are printed, never
asserted. The guest runs under TCG: its pure-Python slowdown against this host is printed so that a reader
can estimate a real node (guest seconds / slowdown)."""

from __future__ import annotations

import argparse
import json
import re

from services.harness.guest.vm import run_in_guest
from tests.bench.envelope_guest import IDLE_CHECKS, python_loop

DEFAULT_SERVICES, DEFAULT_ENDPOINTS = 1000, 10
DRIFT_PERIOD_S = 60.0  # --drift-period's default


def run(services: int = DEFAULT_SERVICES, endpoints: int = DEFAULT_ENDPOINTS, verbose: bool = False
        ) -> dict[str, float]:
    host_loop = python_loop()
    result = run_in_guest(f"python -m tests.bench.envelope_guest {services} {endpoints}",
                          timeout=600 + services * 0.5, memory="1536M",
                          on_line=(lambda line: print(line, flush=True)) if verbose else None)
    match = re.search(r"KIPVS-ENVELOPE (\{.*\})", result.output)
    if result.status != 0 or not match:
        raise RuntimeError(f"the envelope benchmark failed in the guest:\n{result.output[-3000:]}")
    figures = json.loads(match.group(1))
    figures["slowdown"] = figures["python_loop_s"] / host_loop
    return figures


def _goal(name: str, reached: bool, detail: str) -> str:
    return f"  goal {name}: {'reached' if reached else 'NOT reached'} ({detail})"


def report(f: dict[str, float]) -> None:
    s, e, slow = int(f["services"]), int(f["endpoints"]), f["slowdown"]
    baseline = f["ipvsadm_R_s"] + f["ip_batch_s"] + f["ipset_restore_s"] + f["nft_f_s"]
    read_ratio = f["ipvsadm_Sn_s"] / f["drift_clean_wall_s"]
    idle = f["drift_idle_cpu_s"] / slow / DRIFT_PERIOD_S * 100
    change_ratio = f["change_p50_s"] / f["change_100_p50_s"]
    print(f"== node envelope: {s:,} Services x {e} endpoints, {f['ops']:,.0f} kernel objects (Debian's kernel in "
          f"QEMU; guest pure Python x{slow:.1f} slower than this host) ==")
    print(f"cold start (observe, resolve, diff, write IPVS + kube-ipvs0 + ipsets + the nftables table) "
          f"{f['cold_start_s']:.1f} s; baselines ipvsadm -R {f['ipvsadm_R_s']:.1f} s + ip -batch "
          f"{f['ip_batch_s']:.1f} s + ipset restore {f['ipset_restore_s']:.1f} s + nft -f {f['nft_f_s']:.1f} s = "
          f"{baseline:.1f} s (x{baseline / f['cold_start_s']:.2f})")
    if "cold_setup_s" in f:
        print(f"  cold start's parts: setup (link, 36 ipsets, sysctls) {f['cold_setup_s']:.1f} s, read back "
              f"{f['cold_observe_s']:.1f} s, resolve + diff {f['cold_resolve_s']:.1f} s, "
              f"write {f['cold_write_s']:.1f} s, nftables table (nft -f) {f['cold_nft_s']:.1f} s")
    if "cold_write_ipvs_s" in f:
        print(f"  the write's parts: IPVS services and real servers {f['cold_write_ipvs_s']:.1f} s, kube-ipvs0 "
              f"addresses {f['cold_write_addresses_s']:.1f} s, ipset members {f['cold_write_ipsets_s']:.1f} s")
    print(f"drift check, nothing drifted: {f['drift_clean_wall_s']:.2f} s wall, {f['drift_clean_cpu_s']:.2f} s CPU;"
          f" one object drifted: {f['drift_one_wall_s']:.2f} s wall, {f['drift_one_cpu_s']:.2f} s CPU, "
          f"{f['drift_one_repairs']:.0f} repair(s)")
    print(f"drift check as the applier runs it (real servers of 1 slice of {f['drift_slices']:.0f}): "
          f"{f['drift_slice_wall_s']:.2f} s wall, {f['drift_slice_cpu_s']:.2f} s CPU")
    print(f"the applier's DriftCheck on an idle node (slice, read back, compare, nftables; CPU with nft's): "
          f"first {f['drift_first_wall_s']:.2f} s wall, {f['drift_first_cpu_s']:.2f} s CPU; then (memo, nf_tables "
          f"generation) {f['drift_idle_wall_s']:.2f} s wall, {f['drift_idle_cpu_s']:.2f} s CPU per check")
    print(f"read back: ipvsadm -Sn {f['ipvsadm_Sn_s']:.2f} s vs observe (IPVS + addresses + ipsets) "
          f"{f['drift_clean_wall_s']:.2f} s (x{read_ratio:.2f}); shadow comparison / kipvs ipvs read "
          f"(kernel_table, with counters) {f['kernel_table_wall_s']:.2f} s wall, {f['kernel_table_cpu_s']:.2f} s CPU")
    if "read_ipvs_s" in f:
        print(f"  IPVS alone, the same work, one after the other: ipvsadm -Sn {f['ipvsadm_Sn_s']:.2f} s "
              f"({f['ipvsadm_Sn_user_s']:.2f} s user, {f['ipvsadm_Sn_sys_s']:.2f} s system) vs kipvs "
              f"{f['read_ipvs_s']:.2f} s ({f['read_ipvs_user_s']:.2f} s user, {f['read_ipvs_sys_s']:.2f} s system)"
              f" (x{f['ipvsadm_Sn_s'] / f['read_ipvs_s']:.2f})")
    print(f"one endpoint change: p50 {f['change_p50_s'] * 1e3:.1f} ms p99 {f['change_p99_s'] * 1e3:.1f} ms; at 100 "
          f"Services (its own netns, measured side by side) p50 {f['change_100_p50_s'] * 1e3:.1f} ms "
          f"p99 {f['change_100_p99_s'] * 1e3:.1f} ms "
          f"(x{change_ratio:.2f})")
    print(f"idle CPU, estimated for a real node: steady drift-check CPU / slowdown / {DRIFT_PERIOD_S:.0f} s = "
          f"{idle:.2f}% of a core (mean of {IDLE_CHECKS - 1} checks)")
    rss = f.get("rss_drift_mib", f["rss_peak_mib"])
    if "rss_drift_mib" in f:
        print(f"peak RSS of the applier's own work (a process of its own: plan, cold start, one drift check) "
              f"{rss:.0f} MiB (imports {f['rss_imports_mib']:.0f}, + plan and desired state "
              f"{f['rss_plan_mib']:.0f}, + cold start {f['rss_cold_start_mib']:.0f}; {f['rss_now_mib']:.0f} "
              f"at the end); of the benchmark process (both nodes' plans, a whole read-back) "
              f"{f['rss_peak_mib']:.0f} MiB")
    else:
        print(f"peak RSS of the benchmark process {rss:.0f} MiB")
    print(f"goals (issue 22, meant at 10,000 x 10; this run {s:,} x {e}):")
    print(_goal("read back >= ipvsadm -Sn", read_ratio >= 1.0, f"x{read_ratio:.2f}, aim x2"))
    print(_goal("cold start >= 5x the baselines and < 60 s", baseline / f["cold_start_s"] >= 5
                and f["cold_start_s"] < 60, f"x{baseline / f['cold_start_s']:.2f}, {f['cold_start_s']:.1f} s"))
    print(_goal("idle CPU < 1% of a core", idle < 1.0, f"{idle:.2f}%"))
    print(_goal("endpoint change within 2x of 100 Services", change_ratio <= 2.0, f"x{change_ratio:.2f}"))
    print(_goal("RSS < 150 MiB", rss < 150, f"{rss:.0f} MiB, the applier's own"
                if "rss_drift_mib" in f else f"{rss:.0f} MiB, the benchmark process's"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench envelope", description=__doc__)
    parser.add_argument("--services", type=int, default=DEFAULT_SERVICES)
    parser.add_argument("--endpoints", type=int, default=DEFAULT_ENDPOINTS)
    parser.add_argument("--verbose", action="store_true", help="print the guest's output as it comes")
    args = parser.parse_args(argv)
    report(run(args.services, args.endpoints, args.verbose))
    return 0
