"""Runs INSIDE the QEMU guest (tests/bench/applier.py boots it): the applier's netlink writer
against ``ipvsadm -R`` on the same kernel, the same work. Prints one JSON line of figures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from services.applier.kernel.netlink_writer import NetlinkKernel
from services.applier.ops import AddReal, AddService, DelReal, Op

SERVICES, REALS, CHANGES = 2000, 5, 1000


def vip(i: int) -> tuple[str, str, int]:
    return ("TCP", f"10.96.{i // 250}.{i % 250 + 1}", 80)


def real(i: int, r: int) -> tuple[str, int]:
    return (f"10.{64 + i // 250}.{i % 250}.{r + 1}", 8080)


def build_ops() -> list[Op]:
    ops: list[Op] = []
    for i in range(SERVICES):
        ops.append(AddService(vip(i), "rr", 0))
        ops += [AddReal(vip(i), real(i, r), 1) for r in range(REALS)]
    return ops


def change_ops() -> list[list[Op]]:
    """1,000 single real-server changes, each its own batch as one delta would be: a real server leaves,
    then comes back."""
    out: list[list[Op]] = []
    for c in range(CHANGES):
        i, k = ((c // 2) * 7) % SERVICES, (c // 2) % REALS
        out.append([DelReal(vip(i), real(i, k))] if c % 2 == 0 else [AddReal(vip(i), real(i, k), 1)])
    return out


def restore_text(ops: list[Op]) -> str:
    lines = []
    for op in ops:
        if isinstance(op, AddService):
            lines.append(f"-A -t {op.key[1]}:{op.key[2]} -s {op.scheduler}")
        elif isinstance(op, AddReal):
            lines.append(f"-a -t {op.service[1]}:{op.service[2]} -r {op.real[0]}:{op.real[1]} -m -w {op.weight}")
        elif isinstance(op, DelReal):
            lines.append(f"-d -t {op.service[1]}:{op.service[2]} -r {op.real[0]}:{op.real[1]}")
    return "\n".join(lines) + "\n"


def ipvsadm_restore(text: str) -> float:
    started = time.perf_counter()
    subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True)
    return time.perf_counter() - started


async def main() -> None:
    subprocess.run("ip route add 10.64.0.0/10 dev lo", shell=True, check=True)  # real servers need a route
    build, changes = build_ops(), change_ops()
    kernel = NetlinkKernel()
    await kernel.check()
    await kernel.setup()
    subprocess.run(["ipvsadm", "-C"], check=True)
    started = time.perf_counter()
    await kernel.apply(build)
    kipvs_build = time.perf_counter() - started
    started = time.perf_counter()
    for batch in changes:
        await kernel.apply(batch)
    kipvs_changes = time.perf_counter() - started
    table_kipvs = subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, text=True, check=True).stdout
    await kernel.cleanup()
    subprocess.run(["ipvsadm", "-C"], check=True)
    ipvsadm_build = ipvsadm_restore(restore_text(build))
    started = time.perf_counter()
    for batch in changes:
        subprocess.run(["ipvsadm", "-R"], input=restore_text(batch), text=True, check=True)
    ipvsadm_changes_each = time.perf_counter() - started
    table_ipvsadm = subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, text=True, check=True).stdout
    subprocess.run(["ipvsadm", "-C"], check=True)
    subprocess.run(["ipvsadm", "-R"], input=restore_text(build), text=True, check=True)
    ipvsadm_changes_one = ipvsadm_restore("".join(restore_text(b) for b in changes))
    subprocess.run(["ipvsadm", "-C"], check=True)
    print("KIPVS-BENCH " + json.dumps({
        "build_ops": len(build), "change_ops": len(changes),
        "kipvs_build_ops_s": len(build) / kipvs_build, "ipvsadm_build_ops_s": len(build) / ipvsadm_build,
        "kipvs_change_ops_s": len(changes) / kipvs_changes,
        "ipvsadm_change_ops_s_one_process_each": len(changes) / ipvsadm_changes_each,
        "ipvsadm_change_ops_s_one_restore": len(changes) / ipvsadm_changes_one,
        "same_table": sorted(table_kipvs.splitlines()) == sorted(table_ipvsadm.splitlines()),
    }))


if __name__ == "__main__":
    asyncio.run(main())
