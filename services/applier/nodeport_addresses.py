"""Which of the node's addresses serve NodePorts (and health-check node ports): kube-proxy's
``--nodeport-addresses`` / ``nodePortAddresses`` given as CIDRs (kipvs's ``--nodeport-cidrs``).

Followed: kubernetes pkg/proxy/util/nodeport_addresses.go (``NodePortAddresses.GetNodeIPs``: the node's
addresses inside any of the CIDRs; no CIDR: all of them). kube-proxy's keywords are translated before
this (shared/service/kube_proxy_config.py): ``primary`` is ``--node-addresses node``, ``all`` no CIDR.
"""

from __future__ import annotations

import ipaddress

import msgspec

from shared.contract import events


def within(addresses: tuple[str, ...], cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """``addresses`` inside any of ``cidrs``, in their order; all of them when ``cidrs`` is empty.
    ValueError for a malformed CIDR (the configuration is checked before)."""
    if not cidrs:
        return addresses
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    kept = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if any(ip.version == net.version and ip in net for net in nets):
            kept.append(address)
    return tuple(kept)


def filtered(facts: events.NodeFacts | None, cidrs: tuple[str, ...]) -> events.NodeFacts | None:
    """The node's facts with only the addresses that serve NodePorts."""
    if facts is None or not cidrs:
        return facts
    return msgspec.structs.replace(facts, addresses=within(facts.addresses, cidrs))
