"""The netlink writer: kipvs's kernel objects through pyroute2, async.

- IPVS virtual services and real servers (generic netlink): masquerade forwarding, scheduler, persistence;
  changed in place with ``set`` (never pyroute2's ``update``, which the kernel executes as a delete);
- the ``kube-ipvs0`` dummy link and its /32 and /128 addresses (rtnetlink);
- the ipsets the plan names, and kipvs's ownership sets (ipset netlink).

Reads back everything it owns in one dump per object kind, for drift checks; it never dumps after a write.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute, AsyncIPVS
from pyroute2.ipset import AsyncIPSet
from pyroute2.netlink.exceptions import NetlinkError

from shared.plan.node_state import ALL_IPSETS, RealKey, VSKey, family_of

from ..node_facts import LINK_ALIAS
from ..node_settings import Timeouts
from ..ops import (
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
from . import address_wire, conntrack_netlink, ipset_wire, ipvs_wire
from .backend import LINK, OWNED_SETS, CapabilityError, KernelError, owned_entry, parse_owned_entry
from .ipvs_wire import PROTOCOL_NUMBERS
from .kernel_readback import KernelReader
from .netlink_batch import NETLINK_GENERIC, NETLINK_NETFILTER, BatchSocket
from .netlink_dump import NETLINK_ROUTE
from .netlink_read_back import NetlinkReadBack, service_of, set_family, set_type

log = logging.getLogger("kipvs.applier")

# The sysctls kube-proxy sets in IPVS mode: conntrack for IPVS connections (needed for masquerade), expire
# connections to removed real servers and quiescent persistence templates, and forwarding.
SYSCTLS = {"net.ipv4.vs.conntrack": "1", "net.ipv4.vs.expire_nodest_conn": "1",
           "net.ipv4.vs.expire_quiescent_template": "1", "net.ipv4.ip_forward": "1"}

IPSET_ERR_EXIST = ipset_wire.IPSET_ERR_EXIST  # "element already exists" / "element does not exist"
IPSET_BENIGN = frozenset({errno.EEXIST, errno.ENOENT, IPSET_ERR_EXIST})

_KINDS: dict[type, str] = {AddAddress: "address", DelAddress: "address", AddEntry: "ipset", DelEntry: "ipset"}


def _kind(op: Op) -> str:
    return _KINDS.get(type(op), "ipvs")


_GENL = {cmd: ipvs_wire.body(cmd, b"") for cmd in (ipvs_wire.CMD_NEW_SERVICE, ipvs_wire.CMD_SET_SERVICE,
                                                    ipvs_wire.CMD_DEL_SERVICE, ipvs_wire.CMD_NEW_DEST,
                                                    ipvs_wire.CMD_SET_DEST, ipvs_wire.CMD_DEL_DEST)}


@functools.lru_cache(maxsize=65536)
def _service_key(key: VSKey) -> bytes:
    return ipvs_wire.service_key(PROTOCOL_NUMBERS[key[0]], key[1], key[2])


def _service(cmd: int, op: AddService | EditService) -> bytes:
    key = op.key
    return _GENL[cmd] + ipvs_wire.service_full(PROTOCOL_NUMBERS[key[0]], key[1], key[2], op.scheduler,
                                                op.persistence_timeout)


# One encoder per operation type, a dictionary look-up away: a cold start encodes ~110,000 of these, and a
# ``match`` on class patterns tried each case in turn (with the attribute-by-attribute real server, ~3 us an
# operation on the host, ~100 us in the QEMU guest; now ~1 us on the host).
_IPVS: dict[type, Any] = {
    AddService: lambda op: _service(ipvs_wire.CMD_NEW_SERVICE, op),
    EditService: lambda op: _service(ipvs_wire.CMD_SET_SERVICE, op),
    DelService: lambda op: _GENL[ipvs_wire.CMD_DEL_SERVICE] + _service_key(op.key),
    AddReal: lambda op: _GENL[ipvs_wire.CMD_NEW_DEST] + _service_key(op.service) + ipvs_wire.dest(*op.real, op.weight),
    EditReal: lambda op: _GENL[ipvs_wire.CMD_SET_DEST] + _service_key(op.service) + ipvs_wire.dest(*op.real, op.weight),
    DelReal: lambda op: (_GENL[ipvs_wire.CMD_DEL_DEST] + _service_key(op.service)
                         + ipvs_wire.dest(op.real[0], op.real[1], None)),
}


REFUSALS_SHOWN = 5  # refused operations named in a KernelError's message; the rest are counted


def refusal(op: object, code: int) -> str:
    """Why the kernel refused ``op`` with errno ``code``, in one line: the errno's name, ipset's own codes
    by their names (include/uapi/linux/netfilter/ipset/ip_set.h, ip_set_hash.h), and for a virtual
    service the scheduler module the kernel lacks (``ip_vs_scheduler_get`` fails with ENOENT)."""
    if code == errno.ENOENT and isinstance(op, AddService | EditService):
        return f"{op}: the kernel has no IPVS scheduler {op.scheduler!r} (modprobe ip_vs_{op.scheduler})"
    name = ipset_wire.ERROR_NAMES.get(code) or errno.errorcode.get(code, str(code))
    reason = ipset_wire.ERROR_TEXTS.get(code) or os.strerror(code)
    return f"{op}: {reason} ({name})"


class Refused(KernelError):
    """The kernel refused operations of a write (the others were applied): ``lines``, one ``refusal``
    each; the message names the first ``REFUSALS_SHOWN`` and counts the others."""

    def __init__(self, lines: list[str]) -> None:
        shown = "; ".join(lines[:REFUSALS_SHOWN])
        more = f"; and {len(lines) - REFUSALS_SHOWN} more" if len(lines) > REFUSALS_SHOWN else ""
        super().__init__(f"the kernel refused {len(lines)} operation(s): {shown}{more}")
        self.lines = lines


ENCODE_CHUNK = 8192  # IPVS operations encoded per step of a write: a few sends' worth, ~1.5 MiB


def ipvs_requests(family: int, ops: list[Op]) -> list[tuple[int, bytes]]:
    """:func:`ipvs_request` of each of ``ops``. A run of real servers added to one service (a cold start
    is ~100,000 of them, ten or so per service) reuses the service's encoded header: the operations share
    the key object, so an identity test replaces hashing it (a third of each one's encoding)."""
    out = []
    last: VSKey | None = None
    head = b""
    new_dest = _GENL[ipvs_wire.CMD_NEW_DEST]
    dest = ipvs_wire.dest
    for op in ops:
        if type(op) is AddReal:
            if op.service is not last:
                last, head = op.service, new_dest + _service_key(op.service)
            out.append((family, head + dest(*op.real, op.weight)))
        else:
            out.append(ipvs_request(family, op))
    return out


def ipvs_request(family: int, op: Op) -> tuple[int, bytes]:
    """The generic-netlink (family, body) request that performs one IPVS operation; KernelError for an
    operation that is not one."""
    encode = _IPVS.get(type(op))
    if encode is None:
        raise KernelError(f"{op} is not an IPVS operation")
    return family, encode(op)


class BatchedWrites:
    """NetlinkKernel's writes of one run of operations of a kind (IPVS, kube-ipvs0 addresses, ipset
    members) on its batch sockets; each raises ``Refused`` naming every operation the kernel refused."""

    writer: BatchSocket | None  # IPVS (generic netlink)
    ipset_writer: BatchSocket | None
    address_writer: BatchSocket | None
    ipvs_family: int
    link_index: int

    async def _flush(self, kind: str, ops: list[Op]) -> None:
        if kind == "ipvs":
            await self._ipvs_batch(ops)
        elif kind == "ipset":
            await self._ipset_batch(ops)  # type: ignore[arg-type]
        else:
            await self._address_batch(ops)  # type: ignore[arg-type]

    async def _address_batch(self, ops: list[AddAddress | DelAddress]) -> None:
        """kube-ipvs0 address changes, many per send; an address already as wanted is not an error."""
        bodies, kept, unfit = [], [], []
        for op in ops:
            try:
                bodies.append(address_wire.request(isinstance(op, AddAddress), op.ip, self.link_index))
                kept.append(op)
            except (ValueError, OSError) as exc:
                unfit.append(f"{op}: not an IP address ({exc})")  # the others are still written
        try:
            if bodies:
                await self._send(self.address_writer, bodies, kept, address_wire.BENIGN)
        except Refused as exc:
            unfit += exc.lines
        if unfit:
            raise Refused(unfit)

    async def _ipvs_batch(self, ops: list[Op]) -> None:
        """IPVS operations, encoded ``ENCODE_CHUNK`` at a time: a cold start's 110,000 requests encoded at
        once were ~20 MiB of the applier's peak memory at 10,000 Services. Every operation is run;
        KernelError naming the first the kernel refused."""
        refused: list[str] = []
        for start in range(0, len(ops), ENCODE_CHUNK):
            chunk = ops[start:start + ENCODE_CHUNK]
            try:
                await self._send(self.writer, ipvs_requests(self.ipvs_family, chunk), chunk, frozenset())
            except Refused as exc:
                refused += exc.lines
        if refused:
            raise Refused(refused)

    async def _send(self, writer: BatchSocket | None, bodies: list[tuple[int, bytes]], ops: list[Any],
                    tolerated: frozenset[int]) -> None:
        """Execute (kind, body) requests, ``ops[i]`` the operation of ``bodies[i]``: every one is run;
        KernelError naming each the kernel refused with an errno not in ``tolerated`` (``refusal``)."""
        assert writer is not None
        refused = [refusal(ops[index], code) for index, code in await writer.write(bodies) if code not in tolerated]
        if refused:
            raise Refused(refused)

    async def _ipset_batch(self, ops: list[AddEntry | DelEntry]) -> None:
        """Member changes, many members per request (``ipset_wire.requests``) and many requests per send.
        Adding a present member or deleting an absent one is not an error (the member is as wanted);
        anything else is.

        A refused request was stopped by the kernel at its refused member, the members after it not
        applied (``ipset_wire``). Every change from the first refused request on is then replayed one
        member per request, in order (harmless for the ones already applied: IPSET_FLAG_EXIST), which is
        exactly the one-member-per-request outcome: every other change applied, each refused member (and
        each that is no entry of its set) named by ``Refused``."""
        changes, kept, unfit = [], [], []
        for op in ops:
            try:
                data = ipset_wire.data(set_type(op.set), op.entry)
            except (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error) as exc:
                unfit.append(f"{op}: not an entry of {op.set} ({exc})")  # the others are still written
                continue
            changes.append((type(op) is AddEntry, op.set, set_family(op.set), data))
            kept.append(op)
        requests, starts = ipset_wire.requests(changes)
        refused = await self._ipset_writer().write(requests) if requests else []
        if refused:
            first = starts[refused[0][0]]
            log.info("ipset request of %s refused (%s): replaying %d member changes one by one",
                     kept[first].set, errno.errorcode.get(refused[0][1], refused[0][1]), len(kept) - first)
            singles = [ipset_wire.request(*change) for change in changes[first:]]
            try:
                await self._send(self.ipset_writer, singles, kept[first:], IPSET_BENIGN)
            except Refused as exc:
                unfit += exc.lines
        if unfit:
            raise Refused(unfit)

    def _ipset_writer(self) -> BatchSocket:
        assert self.ipset_writer is not None, "setup() opens the writers"
        return self.ipset_writer


class NetlinkKernel(BatchedWrites, NetlinkReadBack):
    """The netlink writer (see the module docstring); the read-back half is ``NetlinkReadBack``."""

    label = "netlink (this host's kernel)"

    def __init__(self) -> None:
        self.ipvs: AsyncIPVS | None = None
        self.ipr: AsyncIPRoute | None = None
        self.ipset: AsyncIPSet | None = None
        self.writer: BatchSocket | None = None  # IPVS writes
        self.ipset_writer: BatchSocket | None = None  # ipset member writes
        self.address_writer: BatchSocket | None = None  # kube-ipvs0 address writes
        self.reader: KernelReader | None = None  # every read-back (hand-decoded dumps)
        self.ipvs_family = 0
        self.link_index = 0

    async def _open(self) -> None:
        if self.ipvs is None:
            self.ipvs = AsyncIPVS()
            await self.ipvs.setup_endpoint()  # binds the generic-netlink family; fails when ip_vs is not loaded
            self.ipvs_family = self.ipvs.prid
            self.writer = BatchSocket(NETLINK_GENERIC)
            self.ipset_writer = BatchSocket(NETLINK_NETFILTER)
            self.address_writer = BatchSocket(NETLINK_ROUTE)
            self.reader = KernelReader(self.ipvs_family)
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
        await create_sets(self.ipset)

    async def apply(self, ops: list[Op]) -> None:
        """Write ``ops`` in order, batched: each run of IPVS operations, of kube-ipvs0 address changes and
        of ipset member changes goes out as multi-message netlink sends, ipset members many per request.

        A service's ownership marker is written before the service exists and removed after it is gone,
        so a crash in between never leaves a kipvs service that kipvs would not recognise as its own.

        Every operation the kernel accepts is applied, whatever it refuses; ``Refused`` (a KernelError)
        naming each refused operation and why, after the whole write."""
        owned_first = [AddEntry(OWNED_SETS[family_of(op.key[1])], owned_entry(op.key))
                       for op in ops if type(op) is AddService]
        owned_last = [DelEntry(OWNED_SETS[family_of(op.key[1])], owned_entry(op.key))
                      for op in ops if type(op) is DelService]
        runs: list[tuple[str, list[Op]]] = [("ipset", owned_first)] if owned_first else []
        for op in ops:
            op_kind = _kind(op)
            if not runs or runs[-1][0] != op_kind:
                runs.append((op_kind, []))
            runs[-1][1].append(op)
        if owned_last:
            runs.append(("ipset", owned_last))
        refused: list[str] = []
        for kind, run in runs:  # a refusal in one run does not keep the next from the kernel
            try:
                await self._flush(kind, run)
            except Refused as exc:
                refused += exc.lines
            except KernelError as exc:  # an operation that cannot be encoded: its run's others are not sent
                refused.append(str(exc))
        if refused:
            raise Refused(refused)

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
                await self.ipvs.service("del", service=service_of(key))
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

    async def set_link_alias(self, alias: str) -> None:
        """kube-ipvs0's alias (who owns the link, ``node_facts.link_owner``); nothing if there is no link."""
        await self._open()
        assert self.ipr is not None
        found = await self.ipr.link_lookup(ifname=LINK)
        if found:
            await self.ipr.link("set", index=found[0], ifalias=alias)

    async def forget_ownership(self) -> None:
        """Destroy the ownership sets only (``--hand-back``): kipvs's services become foreign, for kube-proxy
        to adopt; nothing that forwards is touched."""
        await self._open()
        assert self.ipset is not None
        for name in OWNED_SETS.values():
            try:
                await self.ipset.destroy(name)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise

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
        return await conntrack_netlink.clear_conntrack(flows)

    async def close(self) -> None:
        for sock in (self.ipvs, self.ipr, self.ipset, self.writer, self.ipset_writer, self.address_writer,
                     self.reader):
            if sock is not None:
                sock.close()
        self.ipvs = self.ipr = self.ipset = self.writer = self.ipset_writer = self.address_writer = None
        self.reader = None


async def create_sets(ipset: AsyncIPSet) -> None:
    """Create every ipset the plan names and the ownership sets; one that exists with the same type is used
    as it is. CapabilityError, naming the modules to load, for any other failure.

    kube-proxy's sets are made with kube-proxy's options (pkg/proxy/ipvs/ipset/ipset.go ``createSet``:
    ``family``, ``hashsize 1024``, ``maxelem 65536`` or ``range 0-65535``, and ``comment``): kube-proxy
    creates them with ``-exist``, which the kernel accepts only for a set made with the same options
    (ip_set_core.c ``ip_set_create``, ``same_set``), and otherwise fails every sync. So a node handed back
    to kube-proxy (``--hand-back``) after kipvs made its sets (a reboot, a node kube-proxy never ran on)
    is synced by kube-proxy at once."""
    revisions: dict[tuple[str, int], int] = {}
    for name in (*ALL_IPSETS, *OWNED_SETS.values()):
        kind = set_type(name)
        extra: dict = {"bitmap_ports_range": (0, 65535)} if kind == "bitmap:port" else {}
        if name in ALL_IPSETS:
            extra["comment"] = True
            if kind.startswith("hash:"):
                extra |= {"hashsize": 1024, "maxelem": 65536}
        family = set_family(name)
        try:
            # pyroute2 asks the kernel for the newest revision of a type for IPv4 only; ask for the set's
            # own family (IPv6 revisions can differ, and the wrong one is EINVAL). Asked once per type and
            # family: 36 sets share about a dozen (each question a round trip through pyroute2).
            if (kind, family) not in revisions:
                revisions[kind, family] = (await ipset.get_supported_revisions(kind, family=family))[1]
            ipset._attr_revision = revisions[kind, family]
            await ipset.create(name, stype=kind, family=family, exclusive=False, **extra)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and await _set_type_of(ipset, name) == kind:
                # The same set made with other options: kube-proxy's (ipset.go adds "comment" and its own
                # hashsize/maxelem). Members are what count; used as it is (a takeover, takeover.py).
                log.info("ipset %s exists already (%s, other options): kipvs uses it", name, kind)
                continue
            raise CapabilityError(f"cannot create ipset {name} ({kind}): {exc}; load ip_set and "
                                  f"ip_set_{kind.replace(':', '_').replace(',', '')}") from None
        finally:
            ipset._attr_revision = None


async def _set_type_of(ipset: AsyncIPSet, name: str) -> str:
    """The type of the existing ipset ``name`` ("hash:ip,port"), "" if there is none."""
    kinds = [msg.get_attr("IPSET_ATTR_TYPENAME") async for msg in await ipset.list(name)]  # read it all
    return next((kind for kind in kinds if kind), "")
