"""The netlink writer: kipvs's kernel objects through pyroute2, async.

- IPVS virtual services and real servers (generic netlink): masquerade forwarding, scheduler, persistence;
  changed in place with ``set`` (never pyroute2's ``update``, which the kernel executes as a delete);
- the ``kube-ipvs0`` dummy link and its /32 and /128 addresses (rtnetlink);
- the ipsets the plan names, and kipvs's ownership sets (ipset netlink).

Reads back everything it owns in one dump per object kind, for drift checks; it never dumps after a write.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute, AsyncIPVS
from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple
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

from . import ipset_wire, ipvs_wire
from .backend import LINK, OWNED_SETS, CapabilityError, KernelError, Observed, owned_entry, parse_owned_entry
from .netlink_batch import NETLINK_GENERIC, NETLINK_NETFILTER, BatchError, BatchSocket, header
from .node_facts import LINK_ALIAS
from .node_settings import Timeouts
from .ops import (
    AddAddress,
    AddEntry,
    AddReal,
    AddService,
    DelAddress,
    DelEntry,
    DelReal,
    DelService,
    EditReal,
    EditService,
    Op,
)

log = logging.getLogger("kipvs.applier")

# The sysctls kube-proxy sets in IPVS mode: conntrack for IPVS connections (needed for masquerade), expire
# connections to removed real servers and quiescent persistence templates, and forwarding.
SYSCTLS = {"net.ipv4.vs.conntrack": "1", "net.ipv4.vs.expire_nodest_conn": "1",
           "net.ipv4.vs.expire_quiescent_template": "1", "net.ipv4.ip_forward": "1"}

# The kernel reads the netmask attribute's raw bytes as a host-order prefix length for IPv6 (see ipvs_wire).
V6_NETMASK = socket.inet_ntoa(struct.pack("=I", 128))
IPSET_ERR_EXIST = ipset_wire.IPSET_ERR_EXIST  # "element already exists" / "element does not exist"
IPSET_BENIGN = frozenset({errno.EEXIST, errno.ENOENT, IPSET_ERR_EXIST})

PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items()}
PERSISTENT = ipvs_wire.PERSISTENT
SET_TYPES = dict(IPSET_TYPES)


_TYPES_BY_NAME = {ipset_name(base, fam): kind for base, kind in SET_TYPES.items() for fam in (4, 6)}
_TYPES_BY_NAME.update({OWNED_SETS[4]: "hash:ip,port", OWNED_SETS[6]: "hash:ip,port"})


def _set_type(name: str) -> str:
    return _TYPES_BY_NAME[name]


def _set_family(name: str) -> int:
    return socket.AF_INET6 if name.startswith(("KUBE-6-", "KIPVS-6-")) else socket.AF_INET


def _service(key: VSKey, scheduler: str = "rr", timeout: int = 0) -> IPVSService:
    protocol, ip, port = key
    v6 = family_of(ip) == 6
    # af first: pyroute2 encodes the address according to the family attribute it has already seen.
    return IPVSService(af=socket.AF_INET6 if v6 else socket.AF_INET, protocol=PROTOCOL_NUMBERS[protocol], addr=ip,
                       port=port, sched_name=scheduler, timeout=timeout,
                       flags={"flags": ipvs_wire.service_flags(scheduler, timeout), "mask": 0xFFFFFFFF},
                       netmask=V6_NETMASK if v6 else "255.255.255.255")


def observed_scheduler(name: str, flags: int) -> str:
    """The scheduler as read back, compared with the plan's: an ``mh`` service without ``mh-port`` (written
    by an older kipvs, or by hand) reads as ``mh without mh-port``, so a read-back (bootstrap, drift check)
    repairs its flags with an EditService."""
    if name == "mh" and not flags & ipvs_wire.MH_PORT:
        return "mh without mh-port"
    return name


def netlink_message(kind: int, seq: int, body: bytes) -> bytes:
    return header(len(body), kind, seq) + body


def _kind(op: Op) -> str:
    if isinstance(op, AddAddress | DelAddress):
        return "address"
    if isinstance(op, AddEntry | DelEntry):
        return "ipset"
    return "ipvs"


def _attrs(msg: Any) -> dict[str, Any]:
    return dict(msg["attrs"])


class NetlinkKernel:
    label = "netlink (this host's kernel)"

    def __init__(self) -> None:
        self.ipvs: AsyncIPVS | None = None
        self.ipr: AsyncIPRoute | None = None
        self.ipset: AsyncIPSet | None = None
        self.writer: BatchSocket | None = None  # IPVS writes
        self.ipset_writer: BatchSocket | None = None  # ipset member writes
        self.ipvs_family = 0
        self.link_index = 0

    async def _open(self) -> None:
        if self.ipvs is None:
            self.ipvs = AsyncIPVS()
            await self.ipvs.setup_endpoint()  # binds the generic-netlink family; fails when ip_vs is not loaded
            self.ipvs_family = self.ipvs.prid
            self.writer = BatchSocket(NETLINK_GENERIC)
            self.ipset_writer = BatchSocket(NETLINK_NETFILTER)
            self.ipr = AsyncIPRoute()
            await self.ipr.__aenter__()
            self.ipset = AsyncIPSet()
            await self.ipset.__aenter__()

    async def check(self) -> None:
        """Fail with the reason and the fix, before touching anything."""
        try:
            await self._open()
            assert self.ipvs is not None
            await self.ipvs.service("dump")
        except NetlinkError as exc:
            if exc.code == errno.EPERM:
                raise CapabilityError(
                    "no permission to program IPVS: run as root or with CAP_NET_ADMIN "
                    "(in Kubernetes: securityContext.capabilities.add: [NET_ADMIN], hostNetwork)") from None
            if exc.code != errno.ENOENT:  # ENOENT: the generic-netlink family IPVS is not registered
                raise CapabilityError(f"IPVS is not usable: {exc}") from None
            raise self._no_ipvs(exc) from None
        except (OSError, ValueError) as exc:
            raise self._no_ipvs(exc) from None

    @staticmethod
    def _no_ipvs(exc: Exception) -> CapabilityError:
        return CapabilityError(f"the kernel has no IPVS ({exc}): load it with 'modprobe ip_vs' and the scheduler "
                               "modules (ip_vs_rr, ...), or run with --backend memory")

    async def setup(self) -> None:
        await self._open()
        for key, value in SYSCTLS.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value)
            except OSError as exc:
                log.warning("could not set %s=%s (%s); kube-proxy sets it for IPVS mode", key, value, exc.strerror)
        assert self.ipr is not None and self.ipset is not None
        found = await self.ipr.link_lookup(ifname=LINK)
        if not found:
            try:
                await self.ipr.link("add", ifname=LINK, kind="dummy")
            except NetlinkError as exc:
                raise CapabilityError(f"cannot create the {LINK} dummy link ({exc}): load the dummy module") from None
            found = await self.ipr.link_lookup(ifname=LINK)
            # The alias records who created the link (the kernel ignores an alias given at creation).
            await self.ipr.link("set", index=found[0], ifalias=LINK_ALIAS)
        else:
            log.info("%s exists already: kipvs uses it (its node facts say who created it)", LINK)
        self.link_index = found[0]
        for name in (*ALL_IPSETS, *OWNED_SETS.values()):
            kind = _set_type(name)
            extra = {"bitmap_ports_range": (0, 65535)} if kind == "bitmap:port" else {}
            family = _set_family(name)
            try:
                # pyroute2 asks the kernel for the newest revision of a type for IPv4 only; ask for the set's
                # own family (IPv6 revisions can differ, and the wrong one is EINVAL).
                self.ipset._attr_revision = (await self.ipset.get_supported_revisions(kind, family=family))[1]
                await self.ipset.create(name, stype=kind, family=family, exclusive=False, **extra)
            except NetlinkError as exc:
                raise CapabilityError(f"cannot create ipset {name} ({kind}): {exc}; load ip_set and "
                                      f"ip_set_{kind.replace(':', '_').replace(',', '')}") from None
            finally:
                self.ipset._attr_revision = None

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
            for dmsg in await self.ipvs.dest("dump", service=_service(key)):
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
        from .kernel_read import read_table

        return await read_table(self)

    async def connections(self, services: set[VSKey]) -> dict[tuple[VSKey, RealKey], int]:
        """Active + inactive connections per real server of the given services (one dump per service)."""
        assert self.ipvs is not None
        out = {}
        for key in services:
            try:
                dests = await self.ipvs.dest("dump", service=_service(key))
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
        kind = _set_type(name)
        out: set[str] = set()
        async for msg in await self.ipset.list(name):
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if not adt:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                out.add(_format_member(kind, data))
        return out

    async def apply(self, ops: list[Op]) -> None:
        """Write ``ops`` in order, batched: each run of IPVS operations goes out as multi-message netlink
        sends, each run of ipset member changes likewise; addresses one by one (there are few).

        A service's ownership marker is written before the service exists and removed after it is gone,
        so a crash in between never leaves a kipvs service that kipvs would not recognise as its own."""
        owned_first = [AddEntry(OWNED_SETS[family_of(op.key[1])], owned_entry(op.key))
                       for op in ops if isinstance(op, AddService)]
        owned_last = [DelEntry(OWNED_SETS[family_of(op.key[1])], owned_entry(op.key))
                      for op in ops if isinstance(op, DelService)]
        if owned_first:
            await self._ipset_batch(owned_first)
        run: list[Op] = []
        kind = ""
        for op in ops:
            op_kind = _kind(op)
            if op_kind != kind and run:
                await self._flush(kind, run)
                run = []
            kind = op_kind
            run.append(op)
        if run:
            await self._flush(kind, run)
        if owned_last:
            await self._ipset_batch(owned_last)

    async def _flush(self, kind: str, ops: list[Op]) -> None:
        if kind == "ipvs":
            await self._ipvs_batch(ops)
        elif kind == "ipset":
            await self._ipset_batch(ops)  # type: ignore[arg-type]
        else:
            for op in ops:
                try:
                    await self._address(op)
                except NetlinkError as exc:
                    raise KernelError(f"{op}: {exc}") from None

    async def _address(self, op: Op) -> None:
        assert self.ipr is not None
        if isinstance(op, AddAddress | DelAddress):
            command = "add" if isinstance(op, AddAddress) else "del"
            await self.ipr.addr(command, index=self.link_index, address=op.ip, prefixlen=128 if ":" in op.ip else 32)

    async def _ipvs_batch(self, ops: list[Op]) -> None:
        await self._send(self.writer, [self._ipvs_message(op) for op in ops], ops, frozenset())

    async def _send(self, writer: BatchSocket | None, bodies: list[tuple[int, bytes]], ops: list[Any],
                    tolerated: frozenset[int]) -> None:
        """Send (kind, body) requests in batches the socket's buffer can acknowledge, numbering them."""
        assert writer is not None
        for start in range(0, len(bodies), writer.batch_limit):
            chunk = bodies[start:start + writer.batch_limit]
            first = writer.reserve(len(chunk))
            messages = [netlink_message(kind, (first + i) & 0xFFFFFFFF, body) for i, (kind, body) in enumerate(chunk)]
            try:
                await writer.send(messages, first, tolerated)
            except BatchError as exc:
                raise KernelError(f"{ops[start + exc.index]}: {exc}") from None

    def _ipvs_message(self, op: Op) -> tuple[int, bytes]:
        match op:
            case AddService(key, scheduler, timeout) | EditService(key, scheduler, timeout):
                cmd = ipvs_wire.CMD_NEW_SERVICE if isinstance(op, AddService) else ipvs_wire.CMD_SET_SERVICE
                svc = ipvs_wire.service_full(PROTOCOL_NUMBERS[key[0]], key[1], key[2], scheduler, timeout)
                return self.ipvs_family, ipvs_wire.body(cmd, svc)
            case DelService(key):
                svc = ipvs_wire.service_key(PROTOCOL_NUMBERS[key[0]], key[1], key[2])
                return self.ipvs_family, ipvs_wire.body(ipvs_wire.CMD_DEL_SERVICE, svc)
            case AddReal(service, (ip, port), weight) | EditReal(service, (ip, port), weight):
                cmd = ipvs_wire.CMD_NEW_DEST if isinstance(op, AddReal) else ipvs_wire.CMD_SET_DEST
                svc = ipvs_wire.service_key(PROTOCOL_NUMBERS[service[0]], service[1], service[2])
                return self.ipvs_family, ipvs_wire.body(cmd, svc, ipvs_wire.dest(ip, port, weight))
            case DelReal(service, (ip, port)):
                svc = ipvs_wire.service_key(PROTOCOL_NUMBERS[service[0]], service[1], service[2])
                return self.ipvs_family, ipvs_wire.body(ipvs_wire.CMD_DEL_DEST, svc, ipvs_wire.dest(ip, port, None))
        raise KernelError(f"{op} is not an IPVS operation")

    async def _ipset_batch(self, ops: list[AddEntry | DelEntry]) -> None:
        """Member changes, many per send. Adding a present member or deleting an absent one is not an
        error (the member is as wanted); anything else is."""
        bodies = []
        for op in ops:
            try:
                data = ipset_wire.data(_set_type(op.set), op.entry)
            except (ValueError, KeyError, IndexError, OSError) as exc:
                raise KernelError(f"{op}: not an entry of {op.set} ({exc})") from None
            bodies.append(ipset_wire.request(isinstance(op, AddEntry), op.set, _set_family(op.set), data))
        await self._send(self.ipset_writer, bodies, ops, IPSET_BENIGN)

    async def cleanup(self) -> None:
        """Remove everything kipvs owns (its services, link and sets) and nothing else."""
        await self._open()
        assert self.ipvs is not None and self.ipr is not None and self.ipset is not None
        owned: set[VSKey] = set()
        for name in OWNED_SETS.values():
            try:
                owned |= {parse_owned_entry(e) for e in await self._members(name)}
            except NetlinkError:
                continue
        for key in sorted(owned):
            try:
                await self.ipvs.service("del", service=_service(key))
            except NetlinkError as exc:
                if exc.code != errno.ESRCH and exc.code != errno.ENOENT:
                    raise
        if await self.ipr.link_lookup(ifname=LINK):
            await self.ipr.link("del", ifname=LINK)
        for name in (*ALL_IPSETS, *OWNED_SETS.values()):
            try:
                await self.ipset.destroy(name)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    log.warning("could not destroy ipset %s: %s", name, exc)

    async def ipvs_timeouts(self) -> Timeouts:
        await self._open()
        assert self.writer is not None
        payload = await self.writer.query(self.ipvs_family, ipvs_wire.get_timeouts())
        return Timeouts(*ipvs_wire.parse_timeouts(payload))

    async def set_ipvs_timeouts(self, wish: Timeouts) -> None:
        await self._open()
        try:
            await self._send(self.writer, [(self.ipvs_family, ipvs_wire.set_timeouts(wish.tcp, wish.tcp_fin,
                                                                                     wish.udp))],
                             [f"set IPVS timeouts {wish}"], frozenset())
        except KernelError as exc:
            raise CapabilityError(f"cannot set the IPVS timeouts: {exc}") from None

    def sysctls(self, keys: list[str]) -> dict[str, str]:
        out = {}
        for key in keys:
            try:
                out[key] = (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()
            except OSError:
                out[key] = ""
        return out

    def set_sysctls(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            try:
                (Path("/proc/sys") / key.replace(".", "/")).write_text(value)
            except OSError as exc:
                log.warning("could not set %s=%s (%s)", key, value, exc.strerror)

    async def clear_conntrack(self, flows: list[tuple[VSKey, RealKey | None]]) -> int:
        """Delete the conntrack entries of UDP/SCTP flows to a virtual service whose reply came from a real
        server that left it (real None: the whole virtual service left), as kube-proxy does after a sync:
        a client's next datagram is then load-balanced again instead of following the stale entry.
        Returns how many entries were deleted. Over netlink (pyroute2's conntrack), never the binary."""
        deleted = 0
        sockets: dict[int, AsyncConntrack] = {}
        try:
            for (protocol, vip, port), real in flows:
                number = PROTOCOL_NUMBERS[protocol]
                family = socket.AF_INET6 if ":" in vip else socket.AF_INET
                if family not in sockets:
                    sockets[family] = AsyncConntrack(nfgen_family=family)
                    await sockets[family].__aenter__()
                ct = sockets[family]
                orig = NFCTAttrTuple(family=family, proto=number, daddr=vip, dport=port)
                reply = NFCTAttrTuple(family=family, proto=number, saddr=real[0], sport=real[1]) if real else None
                entries = [entry async for entry in await ct.dump_entries(tuple_orig=orig, tuple_reply=reply)]
                for entry in entries:
                    try:
                        await ct.delete(entry)
                        deleted += 1
                    except NetlinkError as exc:
                        if exc.code != errno.ENOENT:  # gone by itself meanwhile: as wanted
                            log.warning("could not delete a conntrack entry of %s %s:%d: %s", protocol, vip, port, exc)
        finally:
            for ct in sockets.values():
                ct.close()
        return deleted

    async def close(self) -> None:
        for sock in (self.ipvs, self.ipr, self.ipset, self.writer, self.ipset_writer):
            if sock is not None:
                sock.close()
        self.ipvs = self.ipr = self.ipset = self.writer = self.ipset_writer = None


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

