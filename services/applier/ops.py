"""Kernel operations and how to compute them. Pure: no netlink here.

Two ways to get operations:

- :func:`diff` compares a whole desired state with what was read back from the kernel (bootstrap and
  drift repair). Only IPVS services kipvs owns are removed: ``owned`` is the set kipvs recorded in the
  kernel when it created them (the KIPVS-OWNED-VS ipsets), so a foreign service is never touched.
- :class:`DesiredState` keeps the desired state per Service (contributions, with reference counts for
  addresses and ipset entries several Services share) and turns one Service's change into the few
  operations it needs: work per delta is proportional to the change, not to the node's table.

Operations are ordered so the data path never points at something missing: addresses and services
before real servers and set entries that use them; removals in the reverse order.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from shared.contract.events import NodeFacts, ServicePlan
from shared.plan.node_state import Contribution, NodeState, RealKey, VirtualService, VSKey, family_of, ipset_name
from shared.plan.resolve import resolve_service


# Operations are msgspec Structs: six times cheaper to create than frozen dataclasses (a cold start makes
# ~14 per Service), and gc=False since they hold only strings, ints and tuples of them (no cycle can
# form): the 140,000 of a 10,000 x 10 cold start set off 40% fewer collections (442 -> 261 young ones).
class AddAddress(msgspec.Struct, frozen=True, gc=False):
    ip: str


class DelAddress(msgspec.Struct, frozen=True, gc=False):
    ip: str


class AddService(msgspec.Struct, frozen=True, gc=False):
    key: VSKey
    scheduler: str
    persistence_timeout: int


class EditService(msgspec.Struct, frozen=True, gc=False):
    key: VSKey
    scheduler: str
    persistence_timeout: int


class DelService(msgspec.Struct, frozen=True, gc=False):
    key: VSKey


class AddReal(msgspec.Struct, frozen=True, gc=False):
    service: VSKey
    real: RealKey
    weight: int


class EditReal(msgspec.Struct, frozen=True, gc=False):
    service: VSKey
    real: RealKey
    weight: int


class DelReal(msgspec.Struct, frozen=True, gc=False):
    service: VSKey
    real: RealKey


class AddEntry(msgspec.Struct, frozen=True, gc=False):
    set: str
    entry: str


class DelEntry(msgspec.Struct, frozen=True, gc=False):
    set: str
    entry: str


Op = (AddAddress | DelAddress | AddService | EditService | DelService | AddReal | EditReal | DelReal
      | AddEntry | DelEntry)

K = TypeVar("K")

_ORDER = {AddAddress: 0, AddService: 1, EditService: 2, AddReal: 3, EditReal: 4, AddEntry: 5,
          DelEntry: 6, DelReal: 7, DelService: 8, DelAddress: 9}


def ordered(ops: list[Op]) -> list[Op]:
    """``ops`` stably grouped in ``_ORDER``: one pass into ten buckets (a cold start orders ~14 ops per
    Service: a sort with a Python key function was a fifth of its resolve + diff)."""
    buckets: list[list[Op]] = [[] for _ in _ORDER]
    for op in ops:
        buckets[_ORDER[type(op)]].append(op)
    return [op for bucket in buckets for op in bucket]


def _hash(item: str) -> int:
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")


def _vs_item(vs: VirtualService) -> str:
    reals = ",".join(f"{ip}:{port}={w}" for (ip, port), w in sorted(vs.reals.items()))
    return f"vs {vs.protocol} {vs.ip} {vs.port} {vs.scheduler} {vs.persistence_timeout} {reals}"


def _derived(name: str) -> bool:
    return name in ("KUBE-IPVS-IPS", "KUBE-6-IPVS-IPS")  # derived from the addresses: hashed through them


def digest(state: NodeState) -> str:
    """A short hash of a node state: equal digests, equal kernels (for what kipvs owns). An XOR of one hash
    per object, so ``DesiredState`` keeps its digest up to date per change instead of rehashing the table."""
    acc = 0
    for vs in state.ipvs.values():
        acc ^= _hash(_vs_item(vs))
    for ip in state.addresses:
        acc ^= _hash(f"addr {ip}")
    for name, entries in state.ipsets.items():
        if not _derived(name):
            for entry in entries:
                acc ^= _hash(f"set {name} {entry}")
    return f"{acc:016x}"


def _service_ops(want: VirtualService | None, have: VirtualService | None) -> list[Op]:
    ops: list[Op] = []
    if want is None and have is not None:
        return [DelService(have.key)]
    assert want is not None
    if have is None:
        key = want.key
        return [AddService(key, want.scheduler, want.persistence_timeout),
                *[AddReal(key, real, weight) for real, weight in want.reals.items()]]
    if (have.scheduler, have.persistence_timeout) != (want.scheduler, want.persistence_timeout):
        ops.append(EditService(want.key, want.scheduler, want.persistence_timeout))
    have_reals = have.reals
    for real, weight in want.reals.items():
        if real not in have_reals:
            ops.append(AddReal(want.key, real, weight))
        elif have_reals[real] != weight:
            ops.append(EditReal(want.key, real, weight))
    for real in have_reals:
        if real not in want.reals:
            ops.append(DelReal(want.key, real))
    return ops


def diff(desired: NodeState, observed: NodeState, owned: set[VSKey],
         reals_read: Callable[[VSKey], bool] | None = None) -> list[Op]:
    """Everything that must change for the kernel to hold ``desired``; foreign services are left alone.
    With ``reals_read``, the real servers of a service present on both sides are compared only where it
    accepts the key (the others were not read back: drift_slices.py); a missing service gets them all."""
    ops: list[Op] = []
    for key, want in desired.ipvs.items():
        have = observed.ipvs.get(key)
        if have is not None and reals_read is not None and not reals_read(key):
            if (have.scheduler, have.persistence_timeout) != (want.scheduler, want.persistence_timeout):
                ops.append(EditService(key, want.scheduler, want.persistence_timeout))
            continue
        ops.extend(_service_ops(want, have))
    for key in observed.ipvs:
        if key not in desired.ipvs and key in owned:
            ops.append(DelService(key))
    ops.extend(AddAddress(ip) for ip in sorted(desired.addresses - observed.addresses))
    ops.extend(DelAddress(ip) for ip in sorted(observed.addresses - desired.addresses))
    for name, entries in desired.ipsets.items():
        have = observed.ipsets.get(name, set())
        ops.extend(AddEntry(name, e) for e in sorted(entries - have))
        ops.extend(DelEntry(name, e) for e in sorted(have - entries))
    return ordered(ops)


def _refcount(refs: Counter[K], old: set[K], new: set[K], removed: bool, order: bool = True) -> list[K]:
    """Move one holder's references from ``old`` to ``new``; the keys that lost their last holder
    (``removed``) or gained their first (not ``removed``), sorted if ``order``. Shared by addresses and
    set entries."""
    if removed:
        gone = []
        for key in old - new:
            refs[key] -= 1
            if refs[key] <= 0:
                del refs[key]
                gone.append(key)
        return sorted(gone, key=str) if order else gone
    came = []
    for key in new - old:
        refs[key] += 1
        if refs[key] == 1:
            came.append(key)
    return sorted(came, key=str) if order else came


def _vs_keys(contribution: Contribution | None) -> set[VSKey]:
    return {vs.key for vs in contribution.virtual_services} if contribution else set()


def _vs_of(contribution: Contribution, key: VSKey) -> VirtualService:
    """The contribution's virtual service at ``key`` (the first, as ``NodeState.add`` keeps the first)."""
    return next(vs for vs in contribution.virtual_services if vs.key == key)


@dataclass
class DesiredState:
    """The node's desired state, kept per Service so a change costs only what it touches."""

    contributions: dict[str, Contribution] = field(default_factory=dict)
    services: dict[VSKey, VirtualService] = field(default_factory=dict)
    owners: dict[VSKey, str] = field(default_factory=dict)
    claimants: dict[VSKey, set[str]] = field(default_factory=dict)  # every Service that programs the key
    address_refs: Counter[str] = field(default_factory=Counter)
    entry_refs: Counter[tuple[str, str]] = field(default_factory=Counter)
    # XOR of the hashes of every desired object (see digest()); None: not computed yet (a build defers it)
    _digest: int | None = 0
    # what of a contribution this node programs (--ipvs-exclude-cidrs: exclude.ExcludeCIDRs.contribution)
    only: Callable[[Contribution | None], Contribution | None] | None = None

    @classmethod
    def of(cls, services: dict[str, ServicePlan], facts: NodeFacts | None,
           only: Callable[[Contribution | None], Contribution | None] | None = None) -> DesiredState:
        """A node's desired state from the shared plan's Services (resolved with the node's facts). Its
        digest is computed when first asked (after the bootstrap's write: a tenth of the resolve)."""
        desired = cls(only=only, _digest=None)
        for key in sorted(services):
            desired._replace(key, resolve_service(services[key], facts), build=False)
        return desired

    def digest(self) -> str:
        """``digest(self.state())``, kept up to date per change once computed."""
        if self._digest is None:
            self._digest = int(digest(self.state()), 16)
        return f"{self._digest:016x}"

    def _rehash(self, item: str) -> None:
        if self._digest is not None:
            self._digest ^= _hash(item)

    def update(self, service: str, new: Contribution | None) -> list[Op]:
        """Replace one Service's contribution; the operations that turns the old into the new.

        Two Services on one VIP:port: the smallest Service key holds it (as ``resolve_node`` decides), and
        when the holder lets go, the next claimant takes it over in the same update."""
        changed, ops = self._replace(service, new)
        for want, have in changed:
            ops.extend(_service_ops(want, have))
        return ordered(ops)

    def _replace(self, service: str, new: Contribution | None, build: bool = True
                 ) -> tuple[list[tuple[VirtualService | None, VirtualService | None]], list[Op]]:
        """:meth:`update`'s bookkeeping: the virtual services that changed, as (want, have) pairs, and the
        address and set-entry operations (none without ``build``). :meth:`of` builds a whole node this way
        without computing operations it would throw away (the bootstrap diffs against the kernel instead:
        the address and entry operations were a fifth of a cold start's resolve)."""
        old = self.contributions.pop(service, None)
        if self.only is not None:
            new = self.only(new)
        if new is not None:
            self.contributions[service] = new
        old_keys, new_keys = _vs_keys(old), _vs_keys(new)
        for key in old_keys - new_keys:
            self.claimants[key].discard(service)
            if not self.claimants[key]:
                del self.claimants[key]
        for key in new_keys - old_keys:
            self.claimants.setdefault(key, set()).add(service)
        changed = [pair for key in sorted(old_keys | new_keys) if (pair := self._hold(key)) is not None]
        return changed, self._references(old, new, build)

    def _hold(self, key: VSKey) -> tuple[VirtualService | None, VirtualService | None] | None:
        """Give ``key`` to its smallest claimant; (want, have) when the virtual service changed, else None."""
        holders = self.claimants.get(key)
        owner = min(holders) if holders else None
        want = _vs_of(self.contributions[owner], key) if owner is not None else None
        have = self.services.get(key)
        if want is not None:
            self.owners[key] = owner  # type: ignore[assignment]
        if want == have:  # the same virtual service (its holder may have changed: nothing to write)
            if want is not None:
                self.services[key] = want
            return None
        if have is not None:
            self._rehash(_vs_item(have))
        if want is not None:
            self.services[key] = want
            self._rehash(_vs_item(want))
        else:
            del self.services[key]
            del self.owners[key]
        return want, have

    def _references(self, old: Contribution | None, new: Contribution | None, build: bool = True) -> list[Op]:
        """The address and set-entry operations of one Service's contribution going from ``old`` to ``new``
        (the reference counts and digest moved; no operations without ``build``), in a stable order."""
        ops: list[Op] = []
        old_addresses, new_addresses = (old.addresses if old else set()), (new.addresses if new else set())
        for ip in _refcount(self.address_refs, old_addresses, new_addresses, removed=True, order=build):
            self._rehash(f"addr {ip}")
            if build:
                ops += [DelAddress(ip), DelEntry(ipset_name("KUBE-IPVS-IPS", family_of(ip)), ip)]
        for ip in _refcount(self.address_refs, old_addresses, new_addresses, removed=False, order=build):
            self._rehash(f"addr {ip}")
            if build:
                ops += [AddAddress(ip), AddEntry(ipset_name("KUBE-IPVS-IPS", family_of(ip)), ip)]
        old_entries, new_entries = (old.ipset_entries if old else set()), (new.ipset_entries if new else set())
        for name, entry in _refcount(self.entry_refs, old_entries, new_entries, removed=True, order=build):
            self._rehash(f"set {name} {entry}")
            if build:
                ops.append(DelEntry(name, entry))
        for name, entry in _refcount(self.entry_refs, old_entries, new_entries, removed=False, order=build):
            self._rehash(f"set {name} {entry}")
            if build:
                ops.append(AddEntry(name, entry))
        return ops

    def state(self) -> NodeState:
        """The whole desired state (for drift checks and digests)."""
        out = NodeState()
        out.ipvs = dict(self.services)
        out.addresses = set(self.address_refs)
        for name, entry in self.entry_refs:
            out.ipsets[name].add(entry)
        return out.finish()


def describe_changes(descriptions: list[str]) -> str:
    """What a bootstrap's kernel operations were, for its log line: ``descriptions`` as ``describe_op``
    gives them (the op's type name first). Additions, changes and removals are counted apart: a fresh
    node's first programming is all additions, not "repairs" of anything."""
    if not descriptions:
        return "the kernel already matched it"
    kinds = Counter(d.split(" ", 1)[0][:3] for d in descriptions)
    parts = [f"{kinds[k]} {word}" for k, word in (("Add", "added"), ("Edi", "changed"), ("Del", "removed"))
             if kinds[k]]
    return f"{len(descriptions)} kernel changes to reach it ({', '.join(parts)})"
