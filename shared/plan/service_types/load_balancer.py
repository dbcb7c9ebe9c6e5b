"""LoadBalancer: one virtual service per ingress IP (ipMode Proxy entries were dropped when parsing),
bound to kube-ipvs0 unless the node owns the address (an ingress IP equal to a node's InternalIP, as with
k3s's service load balancer: binding it would put the node's own address in KUBE-IPVS-IPS and the VIP
port filter would refuse ssh and the kubelet on it; kube-proxy checks every external address against the
node's before binding, kubernetes issue 114815); loadBalancerSourceRanges become the -FW / -SOURCE-CIDR /
-SOURCE-IP sets the applier's firewall rules match, exactly as kube-proxy fills them.

Source ranges are per family (kubernetes#33035): each of kube-proxy's per-family proxiers gets the ranges
of its own family only (pkg/proxy/serviceport.go ``newBaseServiceInfo``, ``MapCIDRsByIPFamily``), and
``syncProxyRules`` (pkg/proxy/ipvs/proxier.go) firewalls a load-balancer IP only ``if
len(svcInfo.LoadBalancerSourceRanges()) != 0``. So a dual-stack Service with IPv4 ranges only is filtered
on IPv4 and open on IPv6; the node may reach the address (-SOURCE-IP) when *its family's* node IP is in a
range. That is kube-proxy's one ``proxier.nodeIP`` per family (``syncProxyRules``: ``cidr.Contains(proxier.nodeIP)``),
per family the Node's first InternalIP, else its first ExternalIP (pkg/util/node ``GetNodeHostIPs``:
``NodeFacts.host_ips``), not any of its addresses: a second InternalIP in a range does not let the node in."""

from __future__ import annotations

import ipaddress

from shared.contract.events import Endpoint, NodeFacts, PortPlan, ServicePlan

from ..node_state import Contribution, family_of, ipset_name
from .common import external_address


def program(plan: ServicePlan, port: PortPlan, family: int, node: NodeFacts | None,
            endpoints: tuple[Endpoint, ...], out: Contribution) -> None:
    if not plan.load_balancer_ips:
        return  # most Services: nothing to parse (a node's cold start resolves every Service)
    ranges = [net for net in map(ipaddress.ip_network, plan.load_balancer_source_ranges) if net.version == family]
    node_ip = _node_ip(node, family) if ranges else None
    allow_from_node = node_ip is not None and any(node_ip in net for net in ranges)
    for ip in plan.load_balancer_ips:
        if family_of(ip) != family:
            continue
        e = external_address(plan, port, ip, node, endpoints, out, "KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-LOCAL")
        if ranges:
            out.ipset_entries.add((ipset_name("KUBE-LOAD-BALANCER-FW", family), e))
            for net in ranges:
                out.ipset_entries.add((ipset_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", family), f"{e},{net}"))
            if allow_from_node:
                out.ipset_entries.add((ipset_name("KUBE-LOAD-BALANCER-SOURCE-IP", family), f"{e},{ip}"))


def _node_ip(node: NodeFacts | None, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """kube-proxy's ``nodeIP`` of the family (``NodeFacts.host_ips``; facts published before that field:
    the first address of the family)."""
    ips = (node.host_ips or node.addresses) if node else ()
    return next((ipaddress.ip_address(ip) for ip in ips if family_of(ip) == family), None)
