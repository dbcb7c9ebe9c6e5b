"""kube-proxy's conntrack settings (``--conntrack-max-per-core``, ``--conntrack-min``,
``--conntrack-tcp-timeout-established``, ``--conntrack-tcp-timeout-close-wait``, ``--conntrack-tcp-be-liberal``,
``--conntrack-udp-timeout``, ``--conntrack-udp-timeout-stream``; KubeProxyConfiguration ``conntrack.*``) as the
``net.netfilter.nf_conntrack_*`` sysctls they set. Pure: what the sysctls must be; the applier writes
those that differ (at start and at every drift check, like strict ARP).

Followed: kubernetes pkg/proxy/conntrack/sysctls.go (``setSysctls``, ``getConntrackMax``): the maximum is
max-per-core x CPUs, or the minimum when that is larger, and only when max-per-core is above 0; each
timeout only when above 0, in whole seconds; be-liberal only when true (never set back to 0). Unlike
kube-proxy, whose defaults set a maximum (32768 per core, at least 131072) and the TCP timeouts (24h
established, 1h close-wait) on every node, kipvs leaves each sysctl as the node has it unless told; and it
does not raise ``/sys/module/nf_conntrack/parameters/hashsize`` with the maximum (docs/kube-proxy.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PREFIX = "net.netfilter."
CPUS = os.cpu_count() or 1  # kube-proxy's detectNumCPU


@dataclass(frozen=True)
class Conntrack:
    """The wish, 0 (False) meaning "leave the node's value"; timeouts in seconds."""

    max_per_core: int = 0
    min: int = 0
    tcp_established_timeout: int = 0
    tcp_close_wait_timeout: int = 0
    tcp_be_liberal: bool = False
    udp_timeout: int = 0
    udp_stream_timeout: int = 0

    def conntrack_max(self, cpus: int) -> int:
        """nf_conntrack_max to set (0: none), as kube-proxy's getConntrackMax."""
        if self.max_per_core <= 0:
            return 0
        return max(self.max_per_core * cpus, self.min)

    def sysctls(self, cpus: int) -> dict[str, str]:
        """Every sysctl this wish sets, key -> value."""
        wanted = {"nf_conntrack_max": self.conntrack_max(cpus),
                  "nf_conntrack_tcp_timeout_established": self.tcp_established_timeout,
                  "nf_conntrack_tcp_timeout_close_wait": self.tcp_close_wait_timeout,
                  "nf_conntrack_tcp_be_liberal": int(self.tcp_be_liberal),
                  "nf_conntrack_udp_timeout": self.udp_timeout,
                  "nf_conntrack_udp_timeout_stream": self.udp_stream_timeout}
        return {PREFIX + key: str(value) for key, value in wanted.items() if value > 0}


def to_set(wish: Conntrack, cpus: int, current: dict[str, str]) -> dict[str, str]:
    """The sysctls that differ from the wish (``current``: the node's values of ``wish.sysctls``' keys)."""
    return {key: value for key, value in wish.sysctls(cpus).items() if current.get(key) != value}
