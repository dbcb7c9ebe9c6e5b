"""The node features kube-proxy users rely on (issue 15), the parts that need no IPVS kernel: the health
servers over real HTTP on loopback, the settings logic, the netlink encoding, and the applier's wiring on
the memory kernel. With real packets in the guest: tests/guest/kernel_datapath.py."""

from __future__ import annotations

import socket
import struct

import aiohttp
import pytest

from services.applier.health_check import HealthServers, local_endpoints, wanted_ports
from services.applier.kernel import ipvs_wire
from services.applier.node_settings import STRICT_ARP, Timeouts, sysctls_to_set
from shared.contract.events import Endpoint, PortPlan, ServicePlan
from shared.messaging.embedded_nats import free_loopback_port
from shared.service.metrics import Registry


def _plan(node_of_endpoints: list[tuple[str, str, bool]], port: int = 32210) -> ServicePlan:
    endpoints = tuple(Endpoint(ip=ip, port=8080, node=node, ready=ready) for ip, node, ready in node_of_endpoints)
    return ServicePlan(key="default/shop", health_check_node_port=port,
                       ports=(PortPlan(name="http", port=80, endpoints=endpoints),
                              PortPlan(name="https", port=443, endpoints=endpoints)))


def test_local_endpoints_count_ready_pods_on_the_node_once() -> None:
    plan = _plan([("10.0.0.1", "a", True), ("10.0.0.2", "a", False), ("10.0.0.3", "b", True)])
    assert local_endpoints(plan, "a") == 1 and local_endpoints(plan, "c") == 0
    assert wanted_ports({"default/shop": plan, "default/web": ServicePlan(key="default/web")}, "b") == {
        "default/shop": (32210, 1)}


async def _get(port: int) -> tuple[int, dict] | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status, await r.json()
    except aiohttp.ClientConnectorError:
        return None


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


async def test_health_check_servers_open_answer_follow_and_close() -> None:
    port = free_loopback_port()
    errors = Counter()
    servers = HealthServers(lambda: True, errors)
    await servers.sync({"default/shop": (port, 2)}, ("127.0.0.1",))
    assert await _get(port) == (200, {"service": {"namespace": "default", "name": "shop"}, "localEndpoints": 2,
                                      "serviceProxyHealthy": True})
    await servers.sync({"default/shop": (port, 0)}, ("127.0.0.1",))
    status, body = await _get(port)
    assert status == 503 and body["localEndpoints"] == 0
    await servers.sync({}, ("127.0.0.1",))
    assert await _get(port) is None, "closed when the Service goes"
    # A port someone else holds: reported, counted, never fatal; the others are served.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy, free = taken.getsockname()[1], free_loopback_port()
    await servers.sync({"default/a": (busy, 1), "default/b": (free, 1)}, ("127.0.0.1",))
    assert errors.value == 1 and "cannot listen on port" in servers.problems[busy]
    assert (await _get(free))[0] == 200
    await servers.close()
    taken.close()


async def test_node_health_server_says_whether_the_applier_keeps_up() -> None:
    port = free_loopback_port()
    healthy = [True]
    servers = HealthServers(lambda: healthy[0])
    await servers.serve_node_health(f"127.0.0.1:{port}")
    status, body = await _get(port)
    assert status == 200 and body["nodeEligible"] is True
    healthy[0] = False
    assert (await _get(port))[0] == 503
    await servers.close()


def test_timeouts_and_strict_arp_decisions() -> None:
    kernel = Timeouts(900, 120, 300)
    assert not Timeouts().differs(kernel), "0 leaves the kernel's value"
    assert Timeouts(tcp=901).differs(kernel) and not Timeouts(udp=300).differs(kernel)
    assert sysctls_to_set(False, {}) == {}
    assert sysctls_to_set(True, {"net.ipv4.conf.all.arp_ignore": "1"}) == {"net.ipv4.conf.all.arp_announce": "2"}
    assert set(STRICT_ARP) == {"net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce"}


def test_ipvs_config_encoding_round_trips() -> None:
    body = ipvs_wire.set_timeouts(901, 121, 301)
    assert body[0] == ipvs_wire.CMD_SET_CONFIG
    assert ipvs_wire.parse_timeouts(body) == (901, 121, 301)
    assert ipvs_wire.parse_timeouts(struct.pack("=BBH", 13, 1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("protocol", ["UDP", "TCP"])
async def test_applier_clears_udp_flows_of_a_real_server_that_left(protocol: str) -> None:
    from services.applier.kernel.backend import MemoryKernel
    from services.applier.ops import DelReal, DelService
    from services.applier.shell import Applier, ApplierSettings

    class Ctx:
        metrics = Registry("applier")
        queued_since = None
        js = None

    kernel = MemoryKernel()
    applier = Applier(Ctx(), "node-a", kernel,  # type: ignore[arg-type]
                      settings=ApplierSettings(timeouts=Timeouts(tcp=901), strict_arp=True))
    vip = (protocol, "10.96.0.53", 53)
    await applier.conntrack.on_applied([DelReal(vip, ("10.244.1.5", 8053)), DelService((protocol, "10.96.0.54", 53))],
                                       applier.core.desired.services)
    expected = [(vip, ("10.244.1.5", 8053)), ((protocol, "10.96.0.54", 53), None)] if protocol == "UDP" else []
    assert kernel.conntrack_cleared == expected, "TCP connections end by themselves; UDP flows do not"
    await applier.node_settings.sync()
    assert kernel.timeouts == Timeouts(901, 120, 300)
    assert kernel.sysctl_values == {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}


async def test_a_port_is_opened_once_the_node_has_addresses() -> None:
    """An applier that bootstrapped before its Node was planned has no address yet: the port opens later."""
    port = free_loopback_port()
    servers = HealthServers(lambda: True)
    await servers.sync({"default/shop": (port, 1)}, ())
    assert await _get(port) is None
    await servers.sync({"default/shop": (port, 1)}, ("127.0.0.1",))
    assert (await _get(port))[0] == 200
    await servers.close()


def test_a_bad_health_address_is_a_config_error() -> None:
    from services.applier.main import ApplierConfig
    from shared.service import config

    for bad in ("nonsense", "127.0.0.1:99999", ":abc"):
        with pytest.raises(config.ConfigError, match="healthz_bind_address must be host:port"):
            config.load(ApplierConfig, {"node": "n", "healthz_bind_address": bad}, {})
