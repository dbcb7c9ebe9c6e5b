"""kube-proxy's conntrack settings as the applier keeps them (pure, and through the applier's node-settings
step on the memory kernel; the real sysctls are read back in the guest: tests/guest/kernel_datapath.py)."""

from __future__ import annotations

import pytest

from services.applier.conntrack_settings import Conntrack, to_set
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, settings_of
from services.applier.node_settings import NodeSettings
from shared.service import config


@pytest.mark.parametrize(("wish", "cpus", "want"), [
    (Conntrack(), 4, 0),
    (Conntrack(max_per_core=32768, min=131072), 2, 131072),  # kube-proxy's defaults on 2 CPUs: the floor
    (Conntrack(max_per_core=32768, min=131072), 8, 262144),
    (Conntrack(min=131072), 8, 0),  # min alone sets nothing (getConntrackMax)
])
def test_conntrack_max_as_kube_proxy_computes_it(wish: Conntrack, cpus: int, want: int) -> None:
    assert wish.conntrack_max(cpus) == want


def test_only_what_is_asked_and_differs_is_set() -> None:
    wish = Conntrack(tcp_established_timeout=86400, tcp_be_liberal=True, udp_timeout=30)
    assert wish.sysctls(4) == {"net.netfilter.nf_conntrack_tcp_timeout_established": "86400",
                               "net.netfilter.nf_conntrack_tcp_be_liberal": "1",
                               "net.netfilter.nf_conntrack_udp_timeout": "30"}
    current = {"net.netfilter.nf_conntrack_tcp_timeout_established": "86400",
               "net.netfilter.nf_conntrack_udp_timeout": "60"}
    assert to_set(wish, 4, current) == {"net.netfilter.nf_conntrack_tcp_be_liberal": "1",
                                        "net.netfilter.nf_conntrack_udp_timeout": "30"}
    assert Conntrack().sysctls(4) == {}


async def test_the_applier_sets_them_and_repairs_them() -> None:
    """From the applier's flags (kube-proxy's spellings and durations) to the node-settings manager, which
    runs at start and at every drift check."""
    flags = {"node": "node-a", "backend": "memory", "http_listen": "", "healthz_bind_address": "",
             "conntrack_max_per_core": "1000", "conntrack_min": "5000",
             "conntrack_tcp_timeout_close_wait": "1h", "conntrack_udp_timeout_stream": "2m"}
    settings = settings_of(config.load(ApplierConfig, flags, {}))
    kernel = MemoryKernel()
    manager = NodeSettings(kernel, settings.timeouts, settings.strict_arp, settings.conntrack, cpus=2)
    await manager.sync()
    want = {"net.netfilter.nf_conntrack_max": "5000", "net.netfilter.nf_conntrack_tcp_timeout_close_wait": "3600",
            "net.netfilter.nf_conntrack_udp_timeout_stream": "120"}
    assert {k: v for k, v in kernel.sysctl_values.items() if "conntrack" in k} == want
    kernel.sysctl_values["net.netfilter.nf_conntrack_max"] = "65536"  # someone else changed it
    await manager.sync()  # the drift check's step
    assert kernel.sysctl_values["net.netfilter.nf_conntrack_max"] == "5000"
