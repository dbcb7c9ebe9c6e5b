"""The netlink writer's read-back half: what the applier diffs against (bootstrap, drift), the connections of
draining real servers, this host's addresses, and the whole table for ``kipvs ipvs`` (``kernel_read``).
Hand-decoded dumps (``kernel_readback.py``); nothing is written here.
Also the naming both halves share: which ipset type and family a set
name has, the pyroute2 service of a virtual-service key.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable

from pyroute2.ipvs import IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from shared.contract import events
from shared.plan.node_state import IPSET_TYPES, RealKey, VSKey, family_of, ipset_name

from . import kernel_readback
from .backend import OWNED_SETS, Observed
from .ipvs_wire import PROTOCOL_NUMBERS, service_flags
from .kernel_read import read_table
from .kernel_readback import KernelReader

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



class NetlinkReadBack:
    """Read-back over the sockets ``NetlinkKernel`` opens: hand-decoded dumps on its ``reader``
    (``kernel_readback.py``)."""

    reader: KernelReader | None
    link_index: int

    async def observe(self, checked: Callable[[VSKey], bool] | None = None) -> Observed:
        """kipvs's objects as the kernel holds them; with ``checked``, the real servers of the services it
        accepts only (the drift check's slice, ``drift_slices.py``)."""
        assert self.reader is not None
        return await kernel_readback.observe(self.reader, self.link_index, TYPES_BY_NAME,
                                             tuple(OWNED_SETS.values()), checked)

    async def kernel_table(self, reals_of: Callable[[VSKey], bool] | None = None) -> events.KernelTable:
        """Everything the kernel holds, read-only, with IPVS's counters (``kernel_read``); real servers
        only of the services ``reals_of`` accepts, if given."""
        return await read_table(self, reals_of)  # type: ignore[arg-type]  # self is the NetlinkKernel

    async def connections(self, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]:
        """Active + inactive connections per real server of the given services (one dump per service)."""
        assert self.reader is not None
        return await kernel_readback.connections(self.reader, services)

    async def node_addresses(self) -> tuple[str, ...]:
        """This node's own addresses, as kube-proxy takes them for NodePorts: every local address except
        those on kube-ipvs0, loopback and IPv6 link-local."""
        assert self.reader is not None
        out = []
        for index, ip in await self.reader.addresses():
            if index == self.link_index:
                continue
            parsed = ipaddress.ip_address(ip)
            if parsed.is_loopback or (parsed.version == 6 and parsed.is_link_local):
                continue
            out.append(str(parsed))
        return tuple(sorted(set(out), key=lambda a: (":" in a, a)))

    async def _members(self, name: str) -> set[str]:
        """ipset ``name``'s members in kube-proxy's syntax; NetlinkError ENOENT when there is no such set."""
        assert self.reader is not None
        found = await self.reader.members(name, set_type(name))
        if found is None:
            raise NetlinkError(errno.ENOENT, f"no ipset {name}")
        return set(found)
