"""The hand-written dump decoders (services/applier/kernel/kernel_decode.py, kernel_readback.py) against the
kernel's own tools, INSIDE the QEMU guest (driven by tests/test_kernel.py, one boot for every guest test).

The kernel is written with ``ipvsadm -R``, ``ip addr`` and ``ipset restore`` (every IPVS scheduler, TCP,
UDP, SCTP, IPv6, persistence with netmasks, firewall-mark services, one-packet scheduling, scheduler
flags, every forwarding method; every ipset type kube-proxy uses, IPv4 and IPv6), then read back by
kipvs and printed in the tools' syntax: it must be what ``ipvsadm -Sn``, ``ipvsadm -Ln``, ``ip addr`` and
``ipset save`` print for the same kernel, line for line. A service with more real servers and a set with
more members than one netlink reply buffer holds prove that multi-buffer dumps are read to the end.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from services.applier.kernel.backend import KernelError
from services.applier.kernel.kernel_decode import Dest, Service
from services.applier.kernel.kernel_read import read_table
from services.applier.kernel.kernel_readback import KernelReader
from services.applier.kernel.netlink_writer import NetlinkKernel
from services.applier.ops import AddAddress, DelAddress
from services.tools.ipvsadm_format import render
from shared.plan.node_state import ALL_IPSETS, IPSET_TYPES, ipset_name

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
FORWARD = {0: "-m", 1: "-m", 2: "-i", 3: "-g"}  # ipvsadm -S: Local (1) is printed as masquerade too
TUNNELS = {0: "ipip", 1: "gue", 2: "gre"}
PROTOCOL_FLAGS = {6: "-t", 17: "-u", 132: "--sctp-service"}
BIG_SERVICE = "10.97.0.1:443"
BIG_REALS = 300  # about 100 kB of replies: several netlink reply buffers (each at most 32 kB)
BIG_SET_MEMBERS = 1500  # about 60 kB: two or more reply buffers


def sh(command: str, stdin: str | None = None) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True, input=stdin).stdout


def ipvs_rules() -> str:
    lines = []
    for n, scheduler in enumerate(SCHEDULERS):
        vip = f"10.96.1.{n + 1}:80"
        lines.append(f"-A -t {vip} -s {scheduler}")
        lines += [f"-a -t {vip} -r 10.244.1.{r}:8080 -m -w {r}" for r in range(1, 4)]
    lines += [
        "-A -u 10.96.2.1:53 -s rr", "-a -u 10.96.2.1:53 -r 10.244.2.1:53 -m -w 1",
        "-A --sctp-service 10.96.2.2:3868 -s rr", "-a --sctp-service 10.96.2.2:3868 -r 10.244.2.2:3868 -m -w 1",
        "-A -t 10.96.2.3:443 -s rr -p 10800", "-a -t 10.96.2.3:443 -r 10.244.2.3:8443 -m -w 0",
        "-A -t 10.96.2.4:443 -s rr -p 300 -M 255.255.255.0", "-a -t 10.96.2.4:443 -r 10.244.2.4:8443 -g -w 1",
        "-A -u 10.96.2.5:5000 -s rr -o", "-a -u 10.96.2.5:5000 -r 10.244.2.5:5000 -i -w 1",
        "-A -t 10.96.2.6:80 -s sh -b sh-fallback,sh-port", "-a -t 10.96.2.6:80 -r 10.244.2.6:80 -m -w 1",
        "-A -t 10.96.2.7:80 -s mh -b mh-port -p 60", "-a -t 10.96.2.7:80 -r 10.244.2.7:80 -m -w 1",
        "-A -f 5 -s wlc", "-a -f 5 -r 10.244.3.1:0 -m -w 1",
        "-A -f 6 -6 -s rr -p 60", "-a -f 6 -6 -r [fd00::3:1]:0 -m -w 2",
        "-A -t [fd00::96:1]:80 -s rr", "-a -t [fd00::96:1]:80 -r [fd00::244:1]:8080 -m -w 1",
        "-a -t [fd00::96:1]:80 -r [fd00::244:2]:8080 -m -w 3",
        "-A -u [fd00::96:2]:53 -s wrr -p 600 -M 64", "-a -u [fd00::96:2]:53 -r [fd00::244:3]:53 -m -w 1",
        "-A --sctp-service [fd00::96:3]:3868 -s rr",
        "-a --sctp-service [fd00::96:3]:3868 -r [fd00::244:4]:3868 -m -w 1",
        f"-A -t {BIG_SERVICE} -s rr",
    ]
    lines += [f"-a -t {BIG_SERVICE} -r 10.245.{r // 250}.{r % 250 + 1}:8443 -m -w 1" for r in range(BIG_REALS)]
    return "\n".join(lines) + "\n"


def ipset_restore() -> str:
    """Every kube-proxy set (both families), each with a member or two of its type's syntax."""
    lines = []
    for base, kind in IPSET_TYPES.items():
        for family in (4, 6):
            name = ipset_name(base, family)
            option = " range 0-65535" if kind == "bitmap:port" else (" family inet6" if family == 6 else "")
            lines.append(f"create {name} {kind}{option}")
            lines += [f"add {name} {member}" for member in members(kind, family)]
    lines += [f"add KUBE-CLUSTER-IP 10.{100 + i // 250}.{i % 250}.1,tcp:{1000 + i % 60000}"
              for i in range(BIG_SET_MEMBERS)]
    return "\n".join(lines) + "\n"


def members(kind: str, family: int) -> list[str]:
    ip, ip2, net = ("10.96.0.10", "10.244.1.5", "192.0.2.0/24") if family == 4 else \
        ("fd00::10", "fd00::244:5", "2001:db8::/64")
    return {"hash:ip": [ip, ip2],
            "hash:ip,port": [f"{ip},tcp:80", f"{ip},udp:53", f"{ip},sctp:3868"],
            "hash:ip,port,ip": [f"{ip},tcp:80,{ip2}"],
            "hash:ip,port,net": [f"{ip},tcp:80,{net}"],
            "bitmap:port": ["30080", "31000"]}[kind]


@pytest.fixture(scope="module")
def loaded() -> None:
    sh("ipvsadm -C; ip link del kube-ipvs0 2>/dev/null || true")
    for name in sh("ipset list -n").split():
        if name.startswith(("KUBE-", "KIPVS-")):
            sh(f"ipset destroy {name}")
    sh("ipvsadm -R", ipvs_rules())
    sh("ip link add kube-ipvs0 type dummy")
    for ip in ("10.96.0.10/32", "10.96.0.11/32", "fd00::10/128", "fd00::11/128"):
        sh(f"ip addr add {ip} dev kube-ipvs0")
    sh("ipset restore", ipset_restore())
    yield
    sh("ipvsadm -C; ip link del kube-ipvs0")
    sh("ipset restore", "".join(f"destroy {name}\n" for name in ALL_IPSETS))


async def reader() -> tuple[NetlinkKernel, KernelReader]:
    kernel = NetlinkKernel()
    await kernel.check()
    assert kernel.reader is not None
    return kernel, kernel.reader


def save_lines(table: list[tuple[Service, list[Dest]]]) -> list[str]:
    """What ``ipvsadm -Sn`` prints (ipvsadm.c ``print_service_entry`` with FMT_RULE), from our decoding."""
    out = []
    for svc, dests in table:
        v6 = svc.family == socket.AF_INET6
        if svc.fwmark:
            name = f"-f {svc.fwmark}" + (" -6" if v6 else "")
        else:
            host = f"[{svc.address}]" if v6 else svc.address
            name = f"{PROTOCOL_FLAGS[svc.protocol]} {host}:{svc.port}"
        line = f"-A {name} -s {svc.scheduler}"
        if svc.flags & 0x1:
            line += f" -p {svc.timeout}"
            mask = str(int.from_bytes(svc.netmask, "little")) if v6 else socket.inet_ntoa(svc.netmask)
            if mask not in ("255.255.255.255", "128"):
                line += f" -M {mask}"
        if svc.flags & 0x4:
            line += " -o"
        sched_flags = [f"{svc.scheduler}-{name}" for bit, name in ((0x8, "fallback"), (0x10, "port"))
                       if svc.flags & bit and svc.scheduler in ("sh", "mh")]
        if sched_flags:
            line += " -b " + ",".join(sched_flags)
        out.append(line)
        for d in dests:
            host = f"[{d.address}]" if ":" in d.address else d.address
            tunnel = f" --tun-type {TUNNELS[d.tunnel]}" if d.forward & 7 == 2 else ""
            out.append(f"-a {name} -r {host}:{d.port} {FORWARD[d.forward & 7]} -w {d.weight}{tunnel}")
    return out


def test_ipvs_dump_decodes_as_ipvsadm_prints_it(loaded: None) -> None:
    async def read() -> list[tuple[Service, list[Dest]]]:
        kernel, r = await reader()
        try:
            return await r.table()
        finally:
            await kernel.close()

    table = asyncio.run(read())
    assert sorted(save_lines(table)) == sorted(sh("ipvsadm -S -n").splitlines())
    big = [dests for svc, dests in table if f"{svc.address}:{svc.port}" == BIG_SERVICE]
    assert len(big) == 1 and len(big[0]) == BIG_REALS


def test_kernel_table_renders_as_ipvsadm_ln(loaded: None) -> None:
    async def read():
        kernel, _ = await reader()
        try:
            return await read_table(kernel)
        finally:
            await kernel.close()

    table = asyncio.run(read())
    printed = sh("ipvsadm -L -n")
    assert " sh (sh-fallback,sh-port)\n" in printed and " mh (mh-port) persistent 60\n" in printed, printed
    assert render(table) == printed, "scheduler flags included (KernelVirtualServer.sched_flags)"
    assert render(table, "stats") == sh("ipvsadm -L -n --stats")
    assert table.link and set(table.addresses) == {"10.96.0.10", "10.96.0.11", "fd00::10", "fd00::11"}


def test_addresses_are_those_ip_addr_prints(loaded: None) -> None:
    async def read() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        kernel, r = await reader()
        try:
            index = socket.if_nametoindex("kube-ipvs0")
            return await r.addresses(index), await r.addresses()
        finally:
            await kernel.close()

    link, every = asyncio.run(read())
    printed = {word.split("/")[0] for line in sh("ip -o addr show dev kube-ipvs0").splitlines()
               for word in line.split()[3:4]}
    assert {ip for _, ip in link} == printed
    every_printed = {line.split()[3].split("/")[0] for line in sh("ip -o addr show").splitlines()}
    assert {ip for _, ip in every} == every_printed


def test_ipset_members_are_those_ipset_save_prints(loaded: None) -> None:
    kinds = {ipset_name(base, family): kind for base, kind in IPSET_TYPES.items() for family in (4, 6)}

    async def read() -> dict[str, list[str] | None]:
        kernel, r = await reader()
        try:
            return {name: await r.members(name, kind) for name, kind in [*kinds.items(), ("KUBE-NO-SUCH", "hash:ip")]}
        finally:
            await kernel.close()

    found = asyncio.run(read())
    assert found.pop("KUBE-NO-SUCH") is None
    ours = sorted(f"add {name} {member}" for name, got in found.items() for member in got or ())
    saved = sorted(line for line in sh("ipset save").splitlines() if line.startswith("add KUBE-"))
    assert ours == saved
    assert len(found["KUBE-CLUSTER-IP"] or ()) == BIG_SET_MEMBERS + 3


def link_addresses() -> set[str]:
    return {line.split()[3].split("/")[0] for line in sh("ip -o addr show dev kube-ipvs0").splitlines()}


def test_addresses_are_written_in_batches(loaded: None) -> None:
    ips = [f"10.98.{i // 250}.{i % 250 + 1}" for i in range(600)] + [f"fd00::98:{i:x}" for i in range(1, 301)]
    before = link_addresses()

    async def write() -> tuple[set[str], set[str]]:
        kernel = NetlinkKernel()
        await kernel.check()
        kernel.link_index = socket.if_nametoindex("kube-ipvs0")
        try:
            await kernel.apply([AddAddress(ip) for ip in ips])
            added = link_addresses()
            await kernel.apply([AddAddress(ips[0]), DelAddress("10.99.0.1")])  # already as wanted: no error
            await kernel.apply([DelAddress(ip) for ip in ips])
            with pytest.raises(KernelError, match=r"10\.98\.0\.300.*not an IP address"):
                await kernel.apply([AddAddress("10.98.0.300")])
            kernel.link_index = 999_999
            with pytest.raises(KernelError, match=r"10\.98\.9\.9.*No such device"):
                await kernel.apply([AddAddress("10.98.9.9")])
            return added, link_addresses()
        finally:
            await kernel.close()

    added, after = asyncio.run(write())
    assert added == before | set(ips)
    assert after == before
