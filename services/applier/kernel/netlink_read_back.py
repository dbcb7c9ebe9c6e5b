"""The netlink writer's read-back half: what the applier diffs against (bootstrap, drift), the connections of
draining real servers, this host's addresses, and the whole table for ``kipvs ipvs`` (``kernel_read``).
pyroute2 dumps; nothing is written here. Also the naming both halves share: which ipset type and family a set
name has, the pyroute2 service of a virtual-service key.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from pyroute2 import AsyncIPRoute, AsyncIPVS
from pyroute2.ipset import AsyncIPSet
from pyroute2.ipvs import IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from kipvs.shared import events
from kipvs.shared.plan.node_state import (
    ALL_IPSETS,
    IPSET_TYPES,
    NodeState,
    RealKey,
    VirtualService,
    VSKey,
    family_of,
    ipset_name,
)

from .backend import OWNED_SETS, KernelError, Observed, parse_owned_entry
from .ipvs_wire import PERSISTENT, PROTOCOL_NAMES, PROTOCOL_NUMBERS, observed_scheduler, service_flags
from .kernel_read import read_table

# The kernel reads the netmask attribute's raw bytes as a host-order prefix length for IPv6 (see ipvs_wire).
V6_NETMASK = socket.inet_ntoa(struct.pack("=I", 128))
SET_TYPES = dict(IPSET_TYPES)


TYPES_BY_NAME = {ipset_name(base, fam): kind for base, kind in SET_TYPES.items() for fam in (4, 6)}
TYPES_BY_NAME.update({OWNED_SETS[4]: "hash:ip,port", OWNED_SETS[6]: "hash:ip,port"})


def set_type(name: str) -> str:
    return TYPES_BY_NAME[name]


def set_family(name: str) -> int:
    return socket.AF_INET6 if name.startswith(("KUBE-6-", "KIPVS-6-")) else socket.AF_INET


def service_of(key: VSKey, scheduler: str = "rr", timeout: int = 0) -> IPVSService:
    protocol, ip, port = key
    v6 = family_of(ip) == 6
    # af first: pyroute2 encodes the address according to the family attribute it has already seen.
    return IPVSService(af=socket.AF_INET6 if v6 else socket.AF_INET, protocol=PROTOCOL_NUMBERS[protocol], addr=ip,
                       port=port, sched_name=scheduler, timeout=timeout,
                       flags={"flags": service_flags(scheduler, timeout), "mask": 0xFFFFFFFF},
                       netmask=V6_NETMASK if v6 else "255.255.255.255")



def _attrs(msg: Any) -> dict[str, Any]:
    return dict(msg["attrs"])



class NetlinkReadBack:
    """Read-back over the sockets ``NetlinkKernel`` opens."""

    ipvs: AsyncIPVS | None
    ipr: AsyncIPRoute | None
    ipset: AsyncIPSet | None
    link_index: int

    async def observe(self) -> Observed:
        assert self.ipvs is not None and self.ipr is not None and self.ipset is not None
        state = NodeState()
        connections = {}
        for msg in await self.ipvs.service("dump"):
            svc = _attrs(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
            if svc.get("IPVS_SVC_ATTR_FWMARK"):
                continue  # fwmark services are never kipvs's
            protocol = PROTOCOL_NAMES.get(svc["IPVS_SVC_ATTR_PROTOCOL"])
            if protocol is None:
                continue
            key = (protocol, svc["IPVS_SVC_ATTR_ADDR"], svc["IPVS_SVC_ATTR_PORT"])
            flags = svc["IPVS_SVC_ATTR_FLAGS"]["flags"]
            vs = VirtualService(protocol, key[1], key[2], observed_scheduler(svc["IPVS_SVC_ATTR_SCHED_NAME"], flags),
                                svc["IPVS_SVC_ATTR_TIMEOUT"] if flags & PERSISTENT else 0)
            for dmsg in await self.ipvs.dest("dump", service=service_of(key)):
                d = _attrs(dmsg.get_attr("IPVS_CMD_ATTR_DEST"))
                real = (d["IPVS_DEST_ATTR_ADDR"], d["IPVS_DEST_ATTR_PORT"])
                vs.reals[real] = d["IPVS_DEST_ATTR_WEIGHT"]
                active, inactive = d.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0), d.get("IPVS_DEST_ATTR_INACT_CONNS", 0)
                connections[(key, real)] = active + inactive
            state.ipvs[key] = vs
        async for addr in await self.ipr.addr("dump", index=self.link_index):
            state.addresses.add(addr.get_attr("IFA_ADDRESS"))
        owned: set[VSKey] = set()
        for name in (*ALL_IPSETS, *OWNED_SETS.values()):
            entries = await self._members(name)
            if name in OWNED_SETS.values():
                owned |= {parse_owned_entry(e) for e in entries}
            else:
                state.ipsets[name] = entries
        return Observed(state, owned, connections)

    async def kernel_table(self) -> events.KernelTable:
        """Everything the kernel holds, read-only, with IPVS's counters (``kernel_read``)."""
        return await read_table(self)  # type: ignore[arg-type]  # self is the NetlinkKernel

    async def connections(self, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]:
        """Active + inactive connections per real server of the given services (one dump per service)."""
        assert self.ipvs is not None
        out = {}
        for key in services:
            try:
                dests = await self.ipvs.dest("dump", service=service_of(key))
            except NetlinkError:
                continue  # the service is gone: nothing left to drain
            for dmsg in dests:
                d = _attrs(dmsg.get_attr("IPVS_CMD_ATTR_DEST"))
                real = (d["IPVS_DEST_ATTR_ADDR"], d["IPVS_DEST_ATTR_PORT"])
                out[(key, real)] = d.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0) + d.get("IPVS_DEST_ATTR_INACT_CONNS", 0)
        return out

    async def node_addresses(self) -> tuple[str, ...]:
        """This node's own addresses, as kube-proxy takes them for NodePorts: every local address except
        those on kube-ipvs0, loopback and IPv6 link-local."""
        assert self.ipr is not None
        out = []
        async for addr in await self.ipr.addr("dump"):
            ip = addr.get_attr("IFA_ADDRESS")
            if not ip or addr["index"] == self.link_index:
                continue
            parsed = ipaddress.ip_address(ip)
            if parsed.is_loopback or (parsed.version == 6 and parsed.is_link_local):
                continue
            out.append(str(parsed))
        return tuple(sorted(set(out), key=lambda a: (":" in a, a)))

    async def _members(self, name: str) -> set[str]:
        assert self.ipset is not None
        kind = set_type(name)
        out: set[str] = set()
        async for msg in await self.ipset.list(name):
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if not adt:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                out.add(_format_member(kind, data))
        return out


def _format_member(kind: str, data: Any) -> str:
    """An ipset member in kube-proxy's entry syntax."""
    attrs = dict(data["attrs"])
    if kind == "bitmap:port":
        return str(attrs["IPSET_ATTR_PORT_FROM"] if "IPSET_ATTR_PORT_FROM" in attrs else attrs["IPSET_ATTR_PORT"])
    ip = _ip(attrs["IPSET_ATTR_IP_FROM"])
    if kind == "hash:ip":
        return ip
    port = attrs.get("IPSET_ATTR_PORT_FROM", attrs.get("IPSET_ATTR_PORT"))
    protocol = PROTOCOL_NAMES[attrs["IPSET_ATTR_PROTO"]].lower()
    out = f"{ip},{protocol}:{port}"
    if kind == "hash:ip,port,ip":
        out += "," + _ip(attrs["IPSET_ATTR_IP2"])
    elif kind == "hash:ip,port,net":
        out += f",{_ip(attrs['IPSET_ATTR_IP2'])}/{attrs['IPSET_ATTR_CIDR2']}"
    return out


def _ip(nested: Any) -> str:
    for _, value in nested["attrs"]:
        return str(value)
    raise KernelError("ipset member without an address")

