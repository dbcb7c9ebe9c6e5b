"""The batched IPVS write (services/applier/kernel/netlink_batch.py) against the guest's real IPVS, INSIDE the
QEMU guest (driven by tests/test_kernel.py, one boot for every guest test): only the last request of each
send asks for an acknowledgement, and the kernel still reports a refused request in the middle of a batch,
exactly, while every other request runs (net/netlink/af_netlink.c netlink_rcv_skb). The ipset and address
halves of the same claim run on the host (tests/test_netlink_batch.py)."""

from __future__ import annotations

import errno
import subprocess
import uuid

import pytest
from pyroute2.netns import popns, pushns

from services.applier.kernel import netlink_writer
from services.applier.kernel.backend import KernelError
from services.applier.kernel.netlink_writer import NetlinkKernel, Refused
from services.applier.ops import AddAddress, AddEntry, AddReal, AddService, Op

REALS = 1500  # more than one send's requests (BatchSocket.batch_limit is at most 1,024)


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture
async def kernel():
    """A NetlinkKernel in a network namespace of its own (IPVS, links and ipsets are per namespace; its
    sockets keep the namespace they were opened in), with a route for the real servers' addresses."""
    name = f"kipvs-write-{uuid.uuid4().hex[:6]}"
    sh(f"ip netns add {name}; ip -n {name} link set lo up; ip -n {name} route add 10.244.0.0/16 dev lo")
    k = NetlinkKernel()
    pushns(name)
    try:
        await k.check()
        await k.setup()
    finally:
        popns()
    yield k, name
    await k.close()
    sh(f"ip netns del {name}")


def real(i: int) -> tuple[str, int]:
    return f"10.244.{i // 250}.{i % 250 + 1}", 8080


async def test_a_refused_request_mid_batch_is_named_and_the_rest_applied(kernel) -> None:
    k, netns = kernel
    service = ("TCP", "10.96.0.1", 80)
    missing = ("TCP", "10.96.0.2", 80)  # no such virtual service: the kernel refuses its real server (ESRCH)
    ops: list[Op] = [AddService(service, "rr", 0)]
    ops += [AddReal(service, real(i), 1) for i in range(REALS)]
    ops.insert(1100, AddReal(missing, real(0), 1))  # in the second send, not its last request (the barrier)
    with pytest.raises(KernelError) as refused:
        await k.apply(ops)
    assert "10.96.0.2" in str(refused.value) and errno.errorcode[errno.ESRCH] in str(refused.value), refused.value
    listed = sh(f"ip netns exec {netns} ipvsadm -Sn").splitlines()
    assert sum(line.startswith("-a -t 10.96.0.1:80 ") for line in listed) == REALS
    assert not [line for line in listed if "10.96.0.2" in line]

    # the barrier itself refused, after requests that all ran: named too, nothing left unread on the socket
    with pytest.raises(KernelError, match=r"10\.96\.0\.2"):
        await k.apply([AddReal(service, real(REALS + i), 1) for i in range(10)] + [AddReal(missing, real(1), 1)])
    await k.apply([AddReal(service, real(REALS + 20), 1)])  # the socket reads this batch's reply, not an old one
    listed = sh(f"ip netns exec {netns} ipvsadm -Sn").splitlines()
    assert sum(line.startswith("-a -t 10.96.0.1:80 ") for line in listed) == REALS + 11


async def test_a_write_encoded_in_chunks_runs_every_chunk_and_names_each_refusal(kernel, monkeypatch) -> None:
    """Operations are encoded a chunk at a time (memory); a refusal in one chunk does not stop the next."""
    monkeypatch.setattr(netlink_writer, "ENCODE_CHUNK", 500)
    k, netns = kernel
    service = ("TCP", "10.96.0.1", 80)
    ops: list[Op] = [AddService(service, "rr", 0)] + [AddReal(service, real(i), 1) for i in range(REALS)]
    ops.insert(300, AddReal(("TCP", "10.96.0.3", 80), real(0), 1))  # chunk 1
    ops.insert(1100, AddReal(("TCP", "10.96.0.2", 80), real(0), 1))  # chunk 3
    with pytest.raises(Refused) as refused:
        await k.apply(ops)
    assert ["10.96.0.3" in line for line in refused.value.lines] == [True, False], refused.value.lines
    listed = sh(f"ip netns exec {netns} ipvsadm -Sn").splitlines()
    assert sum(line.startswith("-a -t 10.96.0.1:80 ") for line in listed) == REALS


async def test_every_refusal_is_named_and_every_other_run_applied(kernel) -> None:
    """A scheduler the kernel has no module for (Debian 6.1 has no ip_vs_twos), a real server of a service
    someone deleted and a member of the wrong family: each named, with the scheduler's module; the address
    and ipset runs after the refused IPVS run still written."""
    k, netns = kernel
    good, odd = ("TCP", "10.96.1.1", 80), ("TCP", "10.96.1.2", 80)
    ops: list[Op] = [AddAddress("10.96.1.1"), AddService(good, "rr", 0), AddService(odd, "twos", 0),
                     AddReal(("TCP", "10.96.1.3", 80), real(0), 1), AddReal(good, real(1), 1),
                     AddEntry("KUBE-CLUSTER-IP", "10.96.1.1,tcp:80"), AddEntry("KUBE-CLUSTER-IP", "fd00::1,tcp:80"),
                     AddEntry("KUBE-CLUSTER-IP", "10.96.1.4,tcp:80")]
    with pytest.raises(Refused) as refused:
        await k.apply(ops)
    lines = refused.value.lines
    assert len(lines) == 3, lines
    assert "modprobe ip_vs_twos" in lines[0] and "10.96.1.3" in lines[1] and "fd00::1" in lines[2], lines
    listed = sh(f"ip netns exec {netns} ipvsadm -Sn")
    assert "-A -t 10.96.1.1:80 -s rr" in listed and "-a -t 10.96.1.1:80 -r 10.244.0.2:8080" in listed
    assert "10.96.1.2" not in listed
    members = sh(f"ip netns exec {netns} ipset list KUBE-CLUSTER-IP")
    assert "10.96.1.1,tcp:80" in members and "10.96.1.4,tcp:80" in members
    assert "10.96.1.1/32" in sh(f"ip -n {netns} addr show kube-ipvs0")
