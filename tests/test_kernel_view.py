"""Pure parts of the kernel view and shadow mode: ipvsadm -Ln rendering and the kernel-vs-plan comparison.
(The kernel read itself runs in the QEMU guest, tests/guest/kernel_shadow.py; the request/reply path over
a real nats-server in tests/test_inspect_service.py.)"""

from __future__ import annotations

import msgspec

from services.applier.drift_slices import DriftSlices
from services.applier.kernel.backend import MemoryKernel
from services.tools.ipvsadm_format import largenum, render
from shared.contract.events import IpvsStats, KernelRealServer, KernelTable, KernelVirtualServer
from shared.plan.divergence import divergences
from shared.plan.node_state import NodeState, VirtualService

DNS = KernelVirtualServer(protocol="UDP", address="10.96.0.10", port=53, scheduler="rr", real_servers=(
    KernelRealServer(address="10.244.2.7", port=53, weight=1, inactive_conns=3,
                     stats=IpvsStats(conns=12, inpkts=24, outpkts=24, inbytes=1_500, outbytes=3_000)),
    KernelRealServer(address="10.244.1.5", port=53, weight=1, active_conns=1),
), stats=IpvsStats(conns=150_000_000, inpkts=2_000_000_000, outpkts=7, inbytes=123_456_789_012_345,
                   outbytes=10**15, cps=3, inpps=40, outpps=41, inbps=5_000, outbps=6_000))
WEB = KernelVirtualServer(protocol="TCP", address="10.96.0.20", port=80, scheduler="rr", persistence_timeout=10800,
                          netmask="255.255.255.255",
                          real_servers=(KernelRealServer(address="10.244.1.6", port=8080, weight=0),))
V6 = KernelVirtualServer(family=6, protocol="TCP", address="fd00::20", port=80, scheduler="rr")
MARK = KernelVirtualServer(fwmark=7, scheduler="wlc",
                           real_servers=(KernelRealServer(address="10.0.0.9", port=0, forward="Route"),))
TABLE = KernelTable(ipvs_version="1.2.1", conn_table_size=4096, virtual_servers=(MARK, V6, DNS, WEB))


def test_the_table_reads_like_ipvsadm_ln() -> None:
    assert render(TABLE) == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        "TCP  10.96.0.20:80 rr persistent 10800\n"
        "  -> 10.244.1.6:8080              Masq    0      0          0         \n"
        "UDP  10.96.0.10:53 rr\n"
        "  -> 10.244.1.5:53                Masq    1      1          0         \n"
        "  -> 10.244.2.7:53                Masq    1      0          3         \n"
        "TCP  [fd00::20]:80 rr\n"
        "FWM  7 wlc\n"
        "  -> 10.0.0.9:0                   Route   1      0          0         \n")


def test_stats_and_rates_use_ipvsadm_columns_and_abbreviations() -> None:
    table = KernelTable(ipvs_version="1.2.1", conn_table_size=4096, virtual_servers=(DNS,))
    assert render(table, "stats").splitlines() == [
        "IP Virtual Server version 1.2.1 (size=4096)",
        "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes",
        "  -> RemoteAddress:Port",
        "UDP  10.96.0.10:53                 150000K    2000M        7     123T    1000T",
        "  -> 10.244.1.5:53                       0        0        0        0        0",
        "  -> 10.244.2.7:53                      12       24       24     1500     3000",
    ]
    assert render(table, "rate").splitlines()[1:4] == [
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS",
        "  -> RemoteAddress:Port",
        "UDP  10.96.0.10:53                       3       40       41     5000     6000",
    ]


def test_largenum_switches_units_where_ipvsadm_does() -> None:
    assert [largenum(v) for v in (99_999_999, 100_000_000, 999_999_999, 1_000_000_000)] == [
        " 99999999", "  100000K", "  999999K", "    1000M"]


def plan(*services: VirtualService, addresses: set[str] = frozenset(), **ipsets: set[str]) -> NodeState:
    state = NodeState()
    state.ipvs = {vs.key: vs for vs in services}
    state.addresses = set(addresses)
    for name, entries in ipsets.items():
        state.ipsets[name.replace("_", "-")] = set(entries)
    return state


def kernel(*services: KernelVirtualServer, addresses: tuple[str, ...] = (), link: bool = True,
           **ipsets: tuple[str, ...]) -> KernelTable:
    return KernelTable(virtual_servers=services, link=link, addresses=addresses,
                       ipsets={name.replace("_", "-"): entries for name, entries in ipsets.items()})


def dns_plan(**reals: int) -> VirtualService:
    return VirtualService("UDP", "10.96.0.10", 53, "rr", 0, {(ip, 53): w for ip, w in
                                                             (reals or {"10.244.1.5": 1, "10.244.2.7": 1}).items()})


def test_the_same_state_has_no_divergence() -> None:
    want = plan(dns_plan(), addresses={"10.96.0.10"}, KUBE_CLUSTER_IP={"10.96.0.10,udp:53"},
                KUBE_IPVS_IPS={"10.96.0.10"})
    have = kernel(DNS, MARK, addresses=("10.96.0.10",), KUBE_CLUSTER_IP=("10.96.0.10,udp:53",),
                  KUBE_IPVS_IPS=("10.96.0.10",))
    assert divergences(have, want) == []


def test_every_kind_of_divergence_is_one_precise_line() -> None:
    want = plan(VirtualService("UDP", "10.96.0.10", 53, "sh", 0, {("10.244.1.5", 53): 2, ("10.244.3.3", 53): 1}),
                VirtualService("TCP", "10.96.0.30", 443, "rr", 0, {("10.244.1.9", 8443): 1}),
                addresses={"10.96.0.10", "10.96.0.30"},
                KUBE_CLUSTER_IP={"10.96.0.10,udp:53", "10.96.0.30,tcp:443"},
                KUBE_6_CLUSTER_IP={"fd00::30,tcp:443"})
    odd = KernelVirtualServer(protocol="TCP", address="10.96.0.40", port=80, scheduler="rr",
                              real_servers=(KernelRealServer(address="10.244.1.9", port=80, forward="Route"),))
    have = kernel(DNS, odd, addresses=("10.96.0.10", "10.96.0.40"),
                  KUBE_CLUSTER_IP=("10.96.0.10,udp:53", "10.96.0.40,tcp:80"))
    assert divergences(have, want) == [
        "virtual server TCP 10.96.0.30:443 missing (planned rr, 1 real servers)",
        "virtual server TCP 10.96.0.40:80 extra (rr, 1 real servers)",
        "virtual server UDP 10.96.0.10:53 scheduler rr, planned sh",
        "real server 10.244.1.5:53 of UDP 10.96.0.10:53 weight 1, planned 2",
        "real server 10.244.2.7:53 of UDP 10.96.0.10:53 extra (weight 1)",
        "real server 10.244.3.3:53 of UDP 10.96.0.10:53 missing (planned weight 1)",
        "address 10.96.0.30 missing on kube-ipvs0",
        "address 10.96.0.40 extra on kube-ipvs0",
        "ipset KUBE-CLUSTER-IP entry 10.96.0.30,tcp:443 missing",
        "ipset KUBE-CLUSTER-IP entry 10.96.0.40,tcp:80 extra",
        "ipset KUBE-6-CLUSTER-IP missing (1 entries planned)",
    ]


def test_persistence_and_forwarding_differences() -> None:
    want = plan(VirtualService("TCP", "10.96.0.20", 80, "rr", 10800, {("10.244.1.6", 8080): 1}))
    have = kernel(KernelVirtualServer(protocol="TCP", address="10.96.0.20", port=80, scheduler="rr",
                                      real_servers=(KernelRealServer(address="10.244.1.6", port=8080,
                                                                     forward="Tunnel"),)))
    assert divergences(have, want) == [
        "virtual server TCP 10.96.0.20:80 persistence 0s, planned 10800s",
        "real server 10.244.1.6:8080 of TCP 10.96.0.20:80 forward Tunnel, planned Masq",
    ]


def test_what_legitimately_differs_is_not_reported() -> None:
    """A draining real server (weight 0, not planned), a firewall-mark service, an absent ipset the plan
    leaves empty: two correct proxies differ there, so none is a divergence."""
    draining = KernelRealServer(address="10.244.9.9", port=53, weight=0, active_conns=4)
    have = kernel(KernelVirtualServer(protocol="UDP", address="10.96.0.10", port=53, scheduler="rr",
                                      real_servers=(*DNS.real_servers, draining)), MARK)
    assert divergences(have, plan(dns_plan())) == []


def test_a_missing_link_is_one_line_not_one_per_address() -> None:
    want = plan(addresses={"10.96.0.10", "10.96.0.11"})
    assert divergences(kernel(link=False), want) == ["link kube-ipvs0 missing (2 addresses planned)"]


def test_order_is_ipvsadms_even_where_its_comparison_wraps_around() -> None:
    """libipvs compares addresses by subtracting u32s into an int: 192.168.50.11 - 10.96.0.10 is negative,
    so ipvsadm lists the NodePort on the node's address first (seen in the guest against ipvsadm itself)."""
    cluster_ip = KernelVirtualServer(protocol="TCP", address="10.96.0.10", port=80, scheduler="rr")
    node_port = KernelVirtualServer(protocol="TCP", address="192.168.50.11", port=30080, scheduler="rr")
    udp = KernelVirtualServer(protocol="UDP", address="10.96.0.1", port=53, scheduler="rr")
    for dump_order in ((cluster_ip, node_port, udp), (udp, node_port, cluster_ip)):
        heads = render(KernelTable(virtual_servers=dump_order)).splitlines()[3:]
        assert heads == ["TCP  192.168.50.11:30080 rr", "TCP  10.96.0.10:80 rr", "UDP  10.96.0.1:53 rr"]


async def test_kipvs_ipvs_shows_the_scheduler_flags_as_ipvsadm_does() -> None:
    """The memory kernel's mh service, read into the kernel view, prints ``mh (mh-port)`` as ipvsadm -Ln
    does (checked against the real ipvsadm in the guest: tests/guest/kernel_readback.py)."""
    kernel = MemoryKernel()
    await kernel.setup()
    kernel.ipvs[("TCP", "10.96.0.30", 80)] = VirtualService("TCP", "10.96.0.30", 80, "mh", 60)
    (line,) = [line for line in render(await kernel.kernel_table()).splitlines() if "10.96.0.30" in line]
    assert line == "TCP  10.96.0.30:80 mh (mh-port) persistent 60"


async def test_a_sliced_comparison_reads_real_servers_in_turns_and_keeps_the_last_lines() -> None:
    """Shadow mode's comparison as the drift check's: real servers of one slice per comparison; a service's
    real-server lines stay as last read until its slice comes round again, and an unread service's (absent)
    real servers are never reported missing."""
    want = NodeState()
    for i in range(1, 7):
        vs = VirtualService("TCP", f"10.96.0.{i}", 80, "rr", reals={(f"10.244.0.{i}", 8080): 1})
        want.ipvs[vs.key] = vs
    kernel = MemoryKernel()
    await kernel.setup()
    kernel.ipvs = {k: VirtualService(v.protocol, v.ip, v.port, v.scheduler, reals=dict(v.reals))
                   for k, v in want.ipvs.items()}
    kernel.ipvs[("TCP", "10.96.0.4", 80)].reals[("10.244.0.4", 8080)] = 5
    line = "real server 10.244.0.4:8080 of TCP 10.96.0.4:80 weight 5, planned 1"
    slices, last = DriftSlices(per_check=2), {}
    seen = []
    for turn in range(6):
        if turn == 3:
            kernel.ipvs[("TCP", "10.96.0.4", 80)].reals[("10.244.0.4", 8080)] = 1  # fixed by hand
        checked, parts = slices.next(len(want.ipvs))
        table = await kernel.kernel_table()
        table = msgspec.structs.replace(table, virtual_servers=tuple(  # what read_table(reals_of) reads
            vs if checked((vs.protocol, vs.address, vs.port)) else msgspec.structs.replace(vs, real_servers=())
            for vs in table.virtual_servers))
        seen.append((checked(("TCP", "10.96.0.4", 80)), divergences(table, want, reals_read=checked, last=last)))
    assert parts == 3
    first = next(t for t, (read, _) in enumerate(seen) if read)
    assert all(lines == [] for _, lines in seen[:first]), "not read yet: nothing, and no false 'missing'"
    assert all(lines == [line] for _, lines in seen[first:first + 3]), "found in its turn, kept until the next"
    assert seen[first + 3] == (True, []) and seen[first + 3:] == [(True, [])] + [(False, [])] * (2 - first)
