"""Applier benchmark, inside the QEMU guest (Debian's kernel; the host has no IPVS): 2,000 services x 5
real servers from empty, then 1,000 single real-server changes; kipvs's netlink writer against
``ipvsadm -R`` doing the same work on the same kernel. The guest is slow at system calls: compare ratios,
never absolute times against the host."""

from __future__ import annotations

import json
import re

from services.harness.guest.vm import run_in_guest


def run() -> dict[str, float]:
    result = run_in_guest("python -m tests.bench.applier_guest", timeout=1200)
    match = re.search(r"KIPVS-BENCH (\{.*\})", result.output)
    if result.status != 0 or not match:
        raise RuntimeError(f"the applier benchmark failed in the guest:\n{result.output[-3000:]}")
    return json.loads(match.group(1))


def report(f: dict[str, float]) -> None:
    print("== applier: 2,000 services x 5 real servers, then 1,000 single changes (Debian's kernel in QEMU) ==")
    print(f"build   kipvs {f['kipvs_build_ops_s']:,.0f} ops/s   ipvsadm -R {f['ipvsadm_build_ops_s']:,.0f} ops/s"
          f"   ratio x{f['kipvs_build_ops_s'] / f['ipvsadm_build_ops_s']:.2f}  (target >= 1.0)")
    print(f"changes kipvs {f['kipvs_change_ops_s']:,.0f} ops/s (one batch per change)   ipvsadm -R one process per "
          f"change {f['ipvsadm_change_ops_s_one_process_each']:,.0f} ops/s (x"
          f"{f['kipvs_change_ops_s'] / f['ipvsadm_change_ops_s_one_process_each']:.2f}), all in one restore "
          f"{f['ipvsadm_change_ops_s_one_restore']:,.0f} ops/s (x"
          f"{f['kipvs_change_ops_s'] / f['ipvsadm_change_ops_s_one_restore']:.2f})")
    print(f"same resulting table: {f['same_table']}")
