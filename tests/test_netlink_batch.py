"""The batched netlink writes (services/applier/kernel/netlink_batch.py, ipset_wire.py) against this host's
real kernel, in a network namespace of their own: ipset members many per request, requests many per send,
only the last of a send acknowledged. (IPVS, which this host's kernel lacks, is written the same way: its
refused-request case runs in the guest, tests/guest/kernel_write.py.)"""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from pyroute2.netns import popns, pushns

from services.applier.kernel import address_wire, ipset_wire, ipvs_wire
from services.applier.kernel.backend import KernelError
from services.applier.kernel.netlink_batch import NETLINK_NETFILTER, BatchSocket, attr
from services.applier.kernel.netlink_dump import NETLINK_ROUTE
from services.applier.kernel.netlink_writer import NetlinkKernel
from services.applier.ops import AddEntry, DelEntry

CLUSTER_IP = "KUBE-CLUSTER-IP"  # hash:ip,port
NODE_PORTS = "KUBE-NODE-PORT-TCP"  # bitmap:port


def sh(netns: str, command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", command], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kipvs-batch-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    sh(name, f"ip link set lo up; ipset create {CLUSTER_IP} hash:ip,port; "
             f"ipset create {NODE_PORTS} bitmap:port range 0-40000")
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def members(netns: str, name: str) -> set[str]:
    return {line.split()[2] for line in sh(netns, f"ipset save {name}").splitlines() if line.startswith("add ")}


def kernel_in(netns: str) -> NetlinkKernel:
    """A NetlinkKernel whose ipset writer lives in ``netns`` (a socket keeps the namespace it was opened
    in); only the ipset half, this host has no IPVS for ``check``."""
    kernel = NetlinkKernel()
    pushns(netns)
    try:
        kernel.ipset_writer = BatchSocket(NETLINK_NETFILTER)
    finally:
        popns()
    return kernel


def entry(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1},tcp:80"


def test_many_members_go_in_few_requests() -> None:
    changes = [(True, CLUSTER_IP, socket.AF_INET, ipset_wire.data("hash:ip,port", entry(i))) for i in range(3000)]
    changes += [(False, CLUSTER_IP, socket.AF_INET, ipset_wire.data("hash:ip,port", entry(5000)))]
    changes += [(True, NODE_PORTS, socket.AF_INET, ipset_wire.data("bitmap:port", str(p))) for p in (30001, 30002)]
    requests, starts = ipset_wire.requests(changes)
    # 3,000 adds of 32 bytes in 32 KiB requests, then the lone delete, then the other set's two adds
    assert len(requests) == 5 and starts == [0, 1024, 2048, 3000, 3001]
    assert all(len(body) < 40_000 for _, body in requests)
    assert requests[3] == ipset_wire.request(False, CLUSTER_IP, socket.AF_INET, changes[3000][3])


@pytest.mark.parametrize("ip", ["10.244.1.5", "fd00::244:1"])
def test_a_real_server_packed_at_once_is_the_attributes_one_by_one(ip: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    name = attr(ipvs_wire.DEST_ADDR, raw) + attr(ipvs_wire.DEST_PORT, (8080).to_bytes(2, "big"))
    full = name + b"".join(attr(kind, value.to_bytes(4, sys.byteorder)) for kind, value in (
        (ipvs_wire.DEST_FWD, ipvs_wire.MASQUERADE), (ipvs_wire.DEST_WEIGHT, 7), (ipvs_wire.DEST_UTHRESH, 0),
        (ipvs_wire.DEST_LTHRESH, 0))) + attr(ipvs_wire.DEST_FAMILY, family.to_bytes(2, sys.byteorder))
    assert ipvs_wire.dest(ip, 8080, 7) == attr(ipvs_wire.ATTR_DEST, full)
    assert ipvs_wire.dest(ip, 8080, None) == attr(ipvs_wire.ATTR_DEST, name)


def test_members_written_many_per_request_and_a_refused_one_named(netns: str) -> None:
    kernel = kernel_in(netns)
    adds = [AddEntry(CLUSTER_IP, entry(i)) for i in range(2000)]
    ports = [AddEntry(NODE_PORTS, str(p)) for p in (30001, 30002, 50000, 30003, 30004)]  # 50000: out of range

    async def write() -> str:
        try:
            await kernel.apply(adds)
            await kernel.apply([*adds[:5], DelEntry(CLUSTER_IP, "10.99.9.9,tcp:80")])  # as wanted: no error
            with pytest.raises(KernelError) as refused:
                await kernel.apply([*ports, DelEntry(CLUSTER_IP, entry(0)), DelEntry(CLUSTER_IP, entry(1))])
            return str(refused.value)
        finally:
            await kernel.close()

    error = asyncio.run(write())
    assert "50000" in error and "30003" not in error, error
    for bad in ("10.96.0.1,tcp:99999", "10.96.0.1,tcp:-1", "10.96.0.300,tcp:80", "10.96.0.1,xyz:80"):
        with pytest.raises(KernelError, match="not an entry of KUBE-CLUSTER-IP"):  # a precise error, no crash
            asyncio.run(kernel.apply([AddEntry(CLUSTER_IP, bad)]))
    # every other change applied, in order, the ones after the refused member too
    assert members(netns, NODE_PORTS) == {"30001", "30002", "30003", "30004"}
    assert members(netns, CLUSTER_IP) == {entry(i) for i in range(2, 2000)}


def test_the_kernel_stops_a_request_at_its_refused_member(netns: str) -> None:
    """What the replay relies on (ip_set_core.c ip_set_ad): members before the refused one applied, after
    it not, and the refusal reported although the request did not ask for an acknowledgement."""
    pushns(netns)
    try:
        writer = BatchSocket(NETLINK_NETFILTER)
    finally:
        popns()
    changes = [(True, NODE_PORTS, socket.AF_INET, ipset_wire.data("bitmap:port", p)) for p in ("1", "2", "50000", "3")]
    requests, _ = ipset_wire.requests(changes)
    ok = [ipset_wire.request(True, NODE_PORTS, socket.AF_INET, ipset_wire.data("bitmap:port", "7"))]
    try:
        refused = asyncio.run(writer.write([*requests, *ok]))
    finally:
        writer.close()
    assert len(requests) == 1 and [index for index, _ in refused] == [0]
    assert members(netns, NODE_PORTS) == {"1", "2", "7"}


def test_only_refused_requests_are_answered_and_every_other_one_runs(netns: str) -> None:
    """Requests without NLM_F_ACK, the last of each send acknowledged: a refused request in the middle of
    3,000 (several sends) is reported exactly, with its errno; the others all ran."""
    pushns(netns)
    try:
        writer = BatchSocket(NETLINK_ROUTE)
        lo = socket.if_nametoindex("lo")
    finally:
        popns()
    ips = [f"10.98.{i // 250}.{i % 250 + 1}" for i in range(3000)]
    requests = [address_wire.request(True, ip, 999_999 if i in (1500, 2999) else lo) for i, ip in enumerate(ips)]
    try:
        assert writer.batch_limit < 1500  # several sends
        refused = asyncio.run(writer.write(requests))
        again = asyncio.run(writer.write(requests[:10]))  # present already: EEXIST each, nothing stale read
    finally:
        writer.close()
    assert refused == [(1500, errno.ENODEV), (2999, errno.ENODEV)]
    assert again == [(i, errno.EEXIST) for i in range(10)]
    present = {line.split()[3].split("/")[0] for line in sh(netns, "ip -o -4 addr show dev lo").splitlines()}
    assert present - {"127.0.0.1"} == set(ips) - {ips[1500], ips[2999]}
