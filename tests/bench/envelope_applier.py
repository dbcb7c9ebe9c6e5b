"""Runs INSIDE the QEMU guest, in a process of its own (tests/bench/envelope_guest.py starts it): what one
node's applier holds at S Services x E endpoints, for issue 22's "RSS < 150 MiB" goal. The applier's own
path: the plan held (``ApplierCore.reset``, as a bootstrap's snapshot leaves it), the empty kernel read
back, converged and written, the heap frozen as the bootstrap does (``heap.py``), then one drift check
(``DriftCheck.check``: one slice of real servers read back, compared, repaired). The nftables table is
left out: ``nft`` is a process of its own, not the applier's memory. Prints one line
``KIPVS-APPLIER {json}``: VmHWM (peak RSS, MiB) after each step and VmRSS at the end. S and E: argv[1],
argv[2]."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from services.applier import heap
from services.applier.core import ApplierCore
from services.applier.drift import DriftCheck
from services.applier.kernel.netlink_writer import NetlinkKernel
from shared.plan.plan_state import SharedPlan
from tests.bench.envelope_guest import FACTS, plan


class _Sink:
    def report(self, record: object) -> None:
        pass

    def inc(self, n: int) -> None:
        pass


def status_mib(field: str) -> float:
    """One ``VmHWM`` / ``VmRSS`` line of /proc/self/status, MiB (proc(5))."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


async def main(services: int, endpoints: int) -> dict[str, float]:
    out = {"rss_imports_mib": status_mib("VmHWM")}
    core = ApplierCore(FACTS.name)
    core.reset(SharedPlan(services={f"bench/svc-{i}": plan(i, endpoints) for i in range(services)},
                          nodes={FACTS.name: FACTS}))
    out["rss_plan_mib"] = status_mib("VmHWM")
    kernel = NetlinkKernel()
    await kernel.check()
    await kernel.setup()
    heap.hold()
    ops = core.converge(await kernel.observe(), time.monotonic())
    await kernel.apply(ops)
    del ops
    heap.settle()
    out["rss_cold_start_mib"] = status_mib("VmHWM")
    await DriftCheck(core, kernel, None, _Sink(), _Sink()).check()  # type: ignore[arg-type]
    out["rss_drift_mib"] = status_mib("VmHWM")
    out["rss_now_mib"] = status_mib("VmRSS")
    await kernel.close()
    return out


if __name__ == "__main__":
    print("KIPVS-APPLIER " + json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))), flush=True)
