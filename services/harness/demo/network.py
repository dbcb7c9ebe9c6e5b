"""The demo's network inside the QEMU guest: every node a network namespace with real IPVS,
every pod a namespace behind a veth with Calico's interface name, the nodes on one bridge.

    root namespace: bridge kipvs-br 192.168.50.1/24 (NATS listens here for the appliers)
    node-a (netns): eth0 192.168.50.11/24; routes 10.244.2.0/24 via node-b, 10.244.3.0/24 via node-c
      cali<hash> <-> pod-web-1 (netns): eth0 10.244.1.11/32, default via 169.254.1.1 (proxy ARP, as Calico)

Only the guest's addresses, made here; nothing leaves the guest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from dataclasses import dataclass

from services.harness.guest.vm import GUEST_NIC, time_scale
from services.planner.endpoint_marks import interface_name

BRIDGE = "kipvs-br"
BRIDGE_IP = "192.168.50.1"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str  # its InternalIP
    pod_cidr: str


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str
    ip: str

    @property
    def netns(self) -> str:
        return f"pod-{self.name}"

    @property
    def host_interface(self) -> str:
        return interface_name(self.namespace, self.name)


class NetworkError(Exception):
    pass


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def build_nodes(nodes: list[NodeSpec]) -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for i, node in enumerate(nodes):
        sh("ip", "netns", "add", node.name)
        sh("ip", "-n", node.name, "link", "set", "lo", "up")
        peer = f"vn{i}"
        sh("ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", node.name)
        sh("ip", "link", "set", peer, "master", BRIDGE, "up")
        sh("ip", "-n", node.name, "addr", "add", f"{node.address}/24", "dev", "eth0")
        sh("ip", "-n", node.name, "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", node.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # a default route, as every node has (Calico's proxy ARP for 169.254.1.1 needs one to answer)
        sh("ip", "-n", node.name, "route", "add", "default", "via", BRIDGE_IP)
        sh("ip", "route", "add", node.pod_cidr, "via", node.address)
    for node in nodes:
        for other in nodes:
            if other is not node:
                sh("ip", "-n", node.name, "route", "add", other.pod_cidr, "via", other.address)


def host_link(address: str) -> None:
    """The guest's end of the link from the host (its virtio NIC, a tap device on the host)."""
    sh("ip", "addr", "add", address, "dev", GUEST_NIC)
    sh("ip", "link", "set", GUEST_NIC, "up")


def add_pod(pod: PodSpec) -> None:
    """A pod as the CNI would make it: its namespace, a veth named as Calico names it, proxy ARP."""
    sh("ip", "netns", "add", pod.netns)
    sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
    sh("ip", "-n", pod.node, "link", "add", pod.host_interface, "type", "veth", "peer", "name", "eth0",
       "netns", pod.netns)
    sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
    sh("ip", "-n", pod.netns, "link", "set", "eth0", "up")
    sh("ip", "-n", pod.netns, "route", "add", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", pod.netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "netns", "exec", pod.node, "sysctl", "-qw", f"net.ipv4.conf.{pod.host_interface}.proxy_arp=1")
    sh("ip", "-n", pod.node, "link", "set", pod.host_interface, "up")
    sh("ip", "-n", pod.node, "route", "add", f"{pod.ip}/32", "dev", pod.host_interface)


def remove_pod(pod: PodSpec) -> None:
    subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True)  # its veth goes with it


def teardown(nodes: list[NodeSpec], pods: list[PodSpec]) -> None:
    for pod in pods:
        remove_pod(pod)
    for node in nodes:
        subprocess.run(["ip", "netns", "del", node.name], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def pod_cidr(ip: str) -> str:
    return str(ipaddress.ip_network(f"{ip}/24", strict=False))


async def in_node(node: str, *argv: str, within: float = 10) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec("ip", "netns", "exec", node, *argv,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within * time_scale())
    except TimeoutError:
        process.kill()
        await process.wait()
        return 124, "timed out"
    return process.returncode or 0, out.decode(errors="replace")
