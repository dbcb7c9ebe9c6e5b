"""Felix's mark bits, all of them: the layout for every FelixConfiguration setting that takes a bit and for
every mask Felix accepts, checked against hand-computed values and against a line-by-line model of Felix's
own code (felix/dataplane/driver.go, felix/markbits/mark_bits.go, felix/rules/epmark.go)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.calico import CalicoState
from services.planner.endpoint_marks import (
    BPF_MARKS,
    NON_CALICO,
    InvalidMask,
    MarkAllocator,
    MarkLayout,
    deposit,
    fnv1_32,
    layout,
)
from services.planner.felix_config import FelixSettings, effective
from tests import kube

# --- Felix, transliterated (the reference the layout is checked against) ---------------------------------


class FelixPanic(Exception):
    pass


class MarkBitsManager:
    """felix/markbits/mark_bits.go."""

    def __init__(self, mask: int) -> None:
        self.mask = mask
        self.allocated = 0
        self.free = bin(mask).count("1")

    def _nth(self, n: int) -> int | None:
        found = 0
        for shift in range(32):
            if self.mask & 1 << shift:
                if found == n:
                    return 1 << shift
                found += 1
        return None  # "no mark bit found"

    def next_single_bit_mark(self) -> int:
        mark = self._nth(self.allocated)
        if mark is None:
            return 0  # driver.go ignores the error and tests the mark for 0
        self.free -= 1
        self.allocated += 1
        return mark

    def next_block_bits_mark(self, size: int) -> tuple[int, int]:
        mark = 0
        for allocated in range(size):
            bit = self.next_single_bit_mark()
            if bit == 0:
                return mark, allocated  # logs "Not enough mark bits available." and returns what it has
            mark |= bit
        return mark, size

    def current_free_number_of_mark(self) -> int:
        return 1 << self.free if self.free > 0 else 0

    def map_number_to_mark(self, n: int) -> int:
        mark, found, shift = 0, 0, 0
        while shift < 32 and n > 0:
            if self.mask & 1 << shift:
                value = n & 1 << found
                if value:
                    mark |= 1 << shift
                    n -= value
                found += 1
            shift += 1
        if n > 0:
            raise ValueError("not enough mark bits available")
        return mark

    def map_mark_to_number(self, mark: int) -> int:
        assert mark & self.mask == mark
        number, found = 0, 0
        for shift in range(32):
            if self.mask & 1 << shift:
                if mark & 1 << shift:
                    number += 1 << found
                found += 1
        return number


def felix_driver(mask: int, wireguard: bool, bpf: bool) -> dict[str, int]:
    """StartDataplaneDriver's mark allocation (driver.go), on a node with kube-ipvs0 (IPVS support is on
    unless BPF mode is). Config parsing first: MarkBitmaskParam refuses masks with fewer than 2 bits."""
    if bin(mask).count("1") < 2:
        raise FelixPanic("invalid mark: needs to have 2 bits set")
    ipvs = not bpf
    allowed = mask
    if bpf:
        if allowed & BPF_MARKS != BPF_MARKS:
            raise FelixPanic("IptablesMarkMask/NftablesMarkMask doesn't cover bits that are used by eBPF mode.")
        allowed ^= allowed & BPF_MARKS
    m = MarkBitsManager(allowed)
    accept = m.next_single_bit_mark()
    pass_ = m.next_single_bit_mark()
    drop = m.next_single_bit_mark()
    scratch0 = m.next_single_bit_mark()
    scratch1 = m.next_single_bit_mark()
    wg = 0
    if wireguard:
        wg = m.next_single_bit_mark()
        if wg == 0:
            raise FelixPanic("Failed to allocate a mark bit for wireguard")
    if accept == 0 or scratch0 == 0 or pass_ == 0 or scratch1 == 0:
        raise FelixPanic("Not enough mark bits available.")
    endpoint, allocated = m.next_block_bits_mark(m.free)
    non_cali = 0
    if ipvs:
        if allocated == 0:
            raise FelixPanic("Not enough mark bits available for endpoint mark.")
        non_cali = endpoint & -endpoint
    return {"accept": accept, "pass": pass_, "drop": drop, "scratch0": scratch0, "scratch1": scratch1,
            "wireguard": wg, "endpoint_mask": endpoint, "non_calico": non_cali}


class EPMarkManager:
    """felix/rules/epmark.go's DefaultEPMarkManager."""

    PSEUDO = "/cali/Pseudo/NonCali/Endpoint/"

    def __init__(self, endpoint_mask: int, non_cali: int) -> None:
        self.bits = MarkBitsManager(endpoint_mask)
        self.max_position = self.bits.current_free_number_of_mark()
        self.position_of: dict[str, int] = {}
        self.owner: dict[int, str] = {}
        self._set(self.PSEUDO, self.bits.map_mark_to_number(non_cali))

    def _set(self, ep: str, pos: int) -> None:
        self.position_of[ep] = pos
        self.owner[pos] = ep

    def get(self, ep: str) -> int | None:
        if ep in self.position_of:
            return self.bits.map_number_to_mark(self.position_of[ep])
        total = fnv1_32(ep.encode())
        for i in range(self.max_position):
            prospect = (total + i) % self.max_position
            if prospect != 0 and prospect not in self.owner:
                self._set(ep, prospect)
                return self.bits.map_number_to_mark(prospect)
        return None  # "no mark left for endpoint"

    def release(self, ep: str) -> None:
        pos = self.position_of.pop(ep, None)
        if pos is not None:
            del self.owner[pos]


def as_dict(lay: MarkLayout) -> dict[str, int]:
    return lay.as_json()


# --- the layout, by hand ---------------------------------------------------------------------------------

E = dict  # expected layout fields

CASES = [
    # (mask, wireguard, bpf, expected layout, capacity)
    (0xFFFF0000, False, False, E(accept=0x10000, pass_=0x20000, drop=0x40000, scratch0=0x80000, scratch1=0x100000,
                                 wireguard=0, endpoint_mask=0xFFE00000), 2046),
    (0xFFFF0000, True, False, E(accept=0x10000, pass_=0x20000, drop=0x40000, scratch0=0x80000, scratch1=0x100000,
                                wireguard=0x200000, endpoint_mask=0xFFC00000), 1022),
    # 6 bits: the five single bits and one endpoint bit, which the non-Calico mark holds: Felix runs, marks nobody
    (0x3F, False, False, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0, endpoint_mask=0x20), 0),
    (0x7F, False, False, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0, endpoint_mask=0x60), 2),
    (0x7F, True, False, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0x20, endpoint_mask=0x40),
     0),
    (0xFF, False, False, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0, endpoint_mask=0xE0), 6),
    (0xFF, True, False, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0x20, endpoint_mask=0xC0),
     2),
    (0x0FF0, False, False, E(accept=0x10, pass_=0x20, drop=0x40, scratch0=0x80, scratch1=0x100, wireguard=0,
                             endpoint_mask=0xE00), 6),
    # non-contiguous masks: bits are taken lowest first wherever they are
    (0xAAAA0000, False, False, E(accept=0x20000, pass_=0x80000, drop=0x200000, scratch0=0x800000,
                                 scratch1=0x2000000, wireguard=0, endpoint_mask=0xA8000000), 6),
    (0x90111101, False, False, E(accept=0x1, pass_=0x100, drop=0x1000, scratch0=0x10000, scratch1=0x100000,
                                 wireguard=0, endpoint_mask=0x90000000), 2),
    (0x90111101, True, False, E(accept=0x1, pass_=0x100, drop=0x1000, scratch0=0x10000, scratch1=0x100000,
                                wireguard=0x10000000, endpoint_mask=0x80000000), 0),
    # eBPF: 0x1ff00000 leaves the mask first; no endpoint bit is needed (Felix's IPVS support is off)
    (0xFFFF0000, False, True, E(accept=0x10000, pass_=0x20000, drop=0x40000, scratch0=0x80000, scratch1=0x20000000,
                                wireguard=0, endpoint_mask=0xC0000000), 2),
    (0xFFFF0000, True, True, E(accept=0x10000, pass_=0x20000, drop=0x40000, scratch0=0x80000, scratch1=0x20000000,
                               wireguard=0x40000000, endpoint_mask=0x80000000), 0),
    (0x1FF0001F, False, True, E(accept=1, pass_=2, drop=4, scratch0=8, scratch1=0x10, wireguard=0, endpoint_mask=0),
     0),
]


@pytest.mark.parametrize(("mask", "wireguard", "bpf", "expected", "capacity"), CASES)
def test_layout_by_hand(mask: int, wireguard: bool, bpf: bool, expected: dict[str, int], capacity: int) -> None:
    lay = layout(mask, wireguard, bpf)
    assert lay == MarkLayout(**expected)
    assert lay.capacity == capacity
    assert lay.non_calico == (lay.endpoint_mask & -lay.endpoint_mask)
    want = felix_driver(mask, wireguard, bpf)
    got = as_dict(lay)
    if bpf:  # Felix sets no non-Calico mark in eBPF mode; kipvs's record keeps the lowest bit (unused there)
        got["non_calico"] = want["non_calico"]
    assert got == want


@pytest.mark.parametrize(("mask", "wireguard", "bpf", "match"), [
    (0, False, False, "fewer than 2 bits"),
    (0x1, False, False, "fewer than 2 bits"),
    (0x3, False, False, "has 2 bits; Felix needs 5 single bits"),  # parses, then driver.go panics
    (0xF, False, False, "has 4 bits"),
    (0x1F, False, False, "at least 1 for endpoint marks in IPVS mode"),
    (0x3F, True, False, "Felix needs 6 single bits (accept, pass, drop, scratch0, scratch1, wireguard)"),
    (0xFF000000, False, True, "does not cover 0x1ff00000"),
    (0x1FF0000F, False, True, "has 4 bits besides eBPF's"),
    (0x1FF0001F, True, True, "Felix needs 6 single bits"),
    (1 << 32, False, False, "not a 32-bit mask"),
    (-1, False, False, "not a 32-bit mask"),
])
def test_masks_felix_refuses(mask: int, wireguard: bool, bpf: bool, match: str) -> None:
    with pytest.raises(InvalidMask, match=match.replace("(", r"\(").replace(")", r"\)")):
        layout(mask, wireguard, bpf)
    if 0 <= mask <= 0xFFFFFFFF:
        with pytest.raises(FelixPanic):
            felix_driver(mask, wireguard, bpf)


def test_layout_names_the_mask_in_use() -> None:
    with pytest.raises(InvalidMask, match="nftablesMarkMask 0x1f"):
        layout(0x1F, setting="nftablesMarkMask")


mask_with_few_bits = st.lists(st.integers(0, 31), min_size=0, max_size=12, unique=True).map(
    lambda bits: sum(1 << b for b in bits))
any_mask = st.one_of(mask_with_few_bits, st.integers(0, 0xFFFFFFFF),
                     mask_with_few_bits.map(lambda m: m | BPF_MARKS))


@settings(max_examples=400, deadline=None)
@given(any_mask, st.booleans(), st.booleans())
def test_layout_is_felixs_for_any_mask(mask: int, wireguard: bool, bpf: bool) -> None:
    try:
        want = felix_driver(mask, wireguard, bpf)
    except FelixPanic:
        with pytest.raises(InvalidMask):
            layout(mask, wireguard, bpf)
        return
    got = as_dict(layout(mask, wireguard, bpf))
    if bpf:
        got["non_calico"] = want["non_calico"]
    assert got == want


@settings(max_examples=200, deadline=None)
@given(mask_with_few_bits.filter(lambda m: m != 0), st.integers(0, 2**12))
def test_deposit_is_map_number_to_mark(mask: int, number: int) -> None:
    felix = MarkBitsManager(mask)
    if number >= 1 << bin(mask).count("1"):
        with pytest.raises(ValueError):
            felix.map_number_to_mark(number)
        return
    mark = deposit(number, mask)
    assert mark == felix.map_number_to_mark(number) and felix.map_mark_to_number(mark) == number


# --- the allocator, against epmark.go --------------------------------------------------------------------

# IPVS mode only: in eBPF mode Felix reserves no non-Calico position, but nobody marks endpoints there either
SMALL = [(0x3F, False, False), (0x7F, False, False), (0x7F, True, False), (0xFF, False, False),
         (0xAAAA0000, False, False), (0x90111101, False, False), (0x90111101, True, False)]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SMALL), st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_allocator_gives_felixs_marks(case: tuple[int, bool, bool], steps: list[tuple[bool, int]]) -> None:
    mask, wireguard, bpf = case
    lay = layout(mask, wireguard, bpf)
    felix_layout = felix_driver(mask, wireguard, bpf)
    ours, felix = MarkAllocator(lay), EPMarkManager(lay.endpoint_mask, felix_layout["non_calico"])
    for add, i in steps:
        name = f"cali{i:011x}"
        if add:
            assert ours.mark(name) == (felix.get(name) or 0)
        else:
            ours.release(name)
            felix.release(name)
    assert ours.marks() == {n: felix.get(n) for n in felix.position_of if n != EPMarkManager.PSEUDO}
    assert len(ours.marks()) <= lay.capacity


def test_zero_capacity_marks_nobody() -> None:
    lay = layout(0x3F)
    alloc = MarkAllocator(lay)
    names = [f"cali{i:011x}" for i in range(3)]
    assert [alloc.mark(n) for n in names] == [0, 0, 0]
    assert alloc.unmarked == names and alloc.marks() == {}
    assert alloc.position_of == {NON_CALICO: 1} and lay.non_calico == 0x20


def test_no_endpoint_mask_marks_nobody() -> None:  # eBPF mode with every other bit taken
    alloc = MarkAllocator(layout(0x1FF0001F, bpf=True))
    assert alloc.mark("cali00000000000") == 0 and alloc.unmarked == ["cali00000000000"] and alloc.marks() == {}


# --- FelixConfiguration: which settings are read, and how bad values are handled -------------------------


def test_wireguard_v6_alone_takes_the_bit() -> None:
    got, problems = effective({"default": {"wireguardEnabledV6": True}}, "n")
    assert problems == [] and got.layout().wireguard == 0x200000 and got.layout().endpoint_mask == 0xFFC00000
    both, _ = effective({"default": {"wireguardEnabled": True, "wireguardEnabledV6": True}}, "n")
    assert both.layout() == got.layout(), "one bit for IPv4 and IPv6 together"


@pytest.mark.parametrize(("mode", "mask"), [("Enabled", 0xFF00), ("enabled", 0xFF00), ("Disabled", 0xFF0000),
                                            ("Auto", 0xFF0000), (None, 0xFF0000)])
def test_nftables_mode_picks_the_mask(mode: str | None, mask: int) -> None:
    spec: dict[str, Any] = {"iptablesMarkMask": 0xFF0000, "nftablesMarkMask": 0xFF00}
    if mode is not None:
        spec["nftablesMode"] = mode
    got, problems = effective({"default": spec}, "n")
    assert problems == [] and got.mark_mask == mask and got.layout() == layout(mask)


def test_nftables_mask_is_used_only_in_nftables_mode() -> None:
    got, problems = effective({"default": {"nftablesMarkMask": 0x3F}}, "n")
    assert problems == [] and got.layout().endpoint_mask == 0xFFE00000
    got, problems = effective({"default": {"nftablesMarkMask": 0x3F, "nftablesMode": "Enabled"}}, "n")
    assert problems == [] and got.layout().endpoint_mask == 0x20 and got.layout().capacity == 0


@pytest.mark.parametrize("mask", [0x3F, 0x7F, 0xFF, 0x1FF, 0xAAAA0000, 0x90111101])
def test_small_and_odd_masks_felix_runs_with_are_kept(mask: int) -> None:
    got, problems = effective({"default": {"iptablesMarkMask": mask}}, "n")
    lay = got.layout()
    assert problems == [] and got.iptables_mark_mask == mask and lay == layout(mask)
    used = lay.accept | lay.pass_ | lay.drop | lay.scratch0 | lay.scratch1 | lay.endpoint_mask
    assert used == mask, "every bit of the mask is used, none outside it"


def test_an_invalid_mask_is_refused_even_when_not_in_use_or_overridden() -> None:
    last = FelixSettings(iptables_mark_mask=0x7F, nftables_mark_mask=0xFF00)
    got, problems = effective({"default": {"nftablesMarkMask": 1}}, "n", last_valid=last)
    (problem,) = problems
    assert "FelixConfiguration default: nftablesMarkMask 0x1 has fewer than 2 bits" in problem
    assert got.nftables_mark_mask == 0xFF00 and got.iptables_mark_mask == 0x7F, "Felix does not start at all"
    # Felix parses every source: a bad global mask stops it even when the node object overrides it
    got, problems = effective({"default": {"iptablesMarkMask": 1}, "node.n": {"iptablesMarkMask": 0xFF}}, "n",
                              last_valid=last)
    assert len(problems) == 1 and "FelixConfiguration default" in problems[0]
    assert got.iptables_mark_mask == 0x7F, "Felix does not start: the last valid value stays"


def test_a_refused_mask_holds_back_every_mark_setting() -> None:
    last = FelixSettings(iptables_mark_mask=0x7F)
    got, problems = effective({"default": {"iptablesMarkMask": "0xff", "wireguardEnabled": True,
                                           "kubeNodePortRanges": ["31000:31999"]}}, "n", last_valid=last)
    (problem,) = problems
    assert "iptablesMarkMask must be an integer" in problem
    assert got.layout() == last.layout() and not got.wireguard_enabled, "Felix never starts with the new settings"
    assert got.kube_node_port_ranges == ((31000, 31999),)


def test_a_combination_felix_panics_on_keeps_the_last_valid_mark_settings() -> None:
    configs = {"default": {"iptablesMarkMask": 0x3F}}
    first, problems = effective(configs, "node-a")
    assert problems == [] and first.layout().capacity == 0
    configs["node.node-a"] = {"wireguardEnabled": True, "kubeNodePortRanges": ["31000:31999"]}
    got, problems = effective(configs, "node-a", last_valid=first)
    (problem,) = problems
    assert "FelixConfiguration for node-a (iptablesMarkMask, wireguardEnabled)" in problem
    assert "Felix needs 6 single bits" in problem
    assert got.layout() == first.layout() and not got.wireguard_enabled
    assert got.kube_node_port_ranges == ((31000, 31999),), "fields outside the mark layout still apply"
    other, problems = effective(configs, "node-b")
    assert problems == [] and other.layout() == layout(0x3F), "only the node the override names"
    # from scratch the last valid settings are the built-in defaults: never a layout Felix would not run
    scratch, _ = effective(configs, "node-a")
    assert scratch.layout() == layout(0xFFFF0000)


def test_bpf_with_a_mask_missing_its_bits_is_refused() -> None:
    got, problems = effective({"default": {"iptablesMarkMask": 0xFF000000, "bpfEnabled": True}}, "n")
    (problem,) = problems
    assert "(iptablesMarkMask, bpfEnabled)" in problem and "does not cover 0x1ff00000" in problem
    assert not got.bpf_enabled and got.iptables_mark_mask == 0xFFFF0000


@pytest.mark.parametrize(("key", "value"), [("wireguardEnabled", "yes"), ("wireguardEnabledV6", 1),
                                            ("bpfEnabled", "true"), ("nftablesMode", "On")])
def test_unparsable_switches_take_felixs_default(key: str, value: Any) -> None:
    configs = {"default": {"wireguardEnabled": True, "wireguardEnabledV6": True, "bpfEnabled": True,
                           "nftablesMode": "Enabled"}, "node.n": {key: value}}
    got, problems = effective(configs, "n", last_valid=effective(configs | {"node.n": {}}, "n")[0])
    (problem,) = problems
    assert key in problem and "Felix uses its default" in problem
    default = {"nftablesMode": "Auto"}.get(key, False)
    attr = {"wireguardEnabled": "wireguard_enabled", "wireguardEnabledV6": "wireguard_enabled_v6",
            "bpfEnabled": "bpf_enabled", "nftablesMode": "nftables_mode"}[key]
    assert getattr(got, attr) == default, "the default overrides the global object's value, as in Felix"


# --- per node, through CalicoState ------------------------------------------------------------------------


def _pod(i: int, node: str = "node-a") -> tuple[str, dict[str, Any]]:
    return f"default/p{i}", kube.pod(f"p{i}", node_name=node, ip=f"10.244.1.{i + 10}")


def test_zero_capacity_publishes_the_configured_layout_and_warns() -> None:
    calico = CalicoState()
    calico.on_felix("default", {"iptablesMarkMask": 0x3F})
    for i in range(2):
        calico.on_pod(*_pod(i))
    state = calico.state("node-a")
    assert state.layout.endpoint_mask == 0x20 and state.layout.non_calico == 0x20 and state.layout.accept == 1
    assert state.endpoint_marks == {} and len(state.unmarked) == 2
    codes = [w.code for w in state.warnings]
    assert codes == ["endpoint-marks-exhausted"], "no invalid-felix-configuration: Felix runs with this mask"
    assert "2 pods on node-a have no endpoint mark (capacity 0): default/p0, default/p1" in state.warnings[0].message


def test_bpf_mode_does_not_warn_of_exhaustion() -> None:
    calico = CalicoState()
    calico.on_felix("default", {"bpfEnabled": True})
    for i in range(4):
        calico.on_pod(*_pod(i))
    state = calico.state("node-a")
    assert state.layout.endpoint_mask == 0xC0000000 and state.bpf_enabled
    assert [w.code for w in state.warnings] == ["calico-bpf-dataplane"]


def test_only_a_layout_change_reallocates() -> None:
    calico = CalicoState()
    for i in range(5):
        calico.on_pod(*_pod(i))
    before = calico.state("node-a")
    calico.on_felix("default", {"nftablesMode": "Enabled"})  # same mask (both default): same layout, same marks
    calico.ensure_node("node-a")
    assert calico.state("node-a").endpoint_marks == before.endpoint_marks
    calico.on_felix("default", {"wireguardEnabledV6": True})
    after = calico.state("node-a")
    assert after.layout.wireguard == 0x200000 and set(after.endpoint_marks) == set(before.endpoint_marks)
    assert all(m & 0xFFC00000 == m for m in after.endpoint_marks.values())


MASKS = [0xFFFF0000, 0x3F, 0x7F, 0xFF, 0x0FF0, 0xAAAA0000, 0x90111101, 0x1FF0003F, 0x1F, 0x3, 1]
felix_spec = st.fixed_dictionaries({}, optional={
    "iptablesMarkMask": st.sampled_from(MASKS), "nftablesMarkMask": st.sampled_from(MASKS),
    "nftablesMode": st.sampled_from(["Auto", "Enabled", "Disabled"]), "wireguardEnabled": st.booleans(),
    "wireguardEnabledV6": st.booleans(), "bpfEnabled": st.booleans()})
calico_step = st.one_of(
    st.tuples(st.just("pod"), st.integers(0, 9), st.sampled_from(["node-a", "node-b"])),
    st.tuples(st.just("felix"), st.sampled_from(["default", "node.node-a", "node.node-b"]),
              st.one_of(st.none(), felix_spec)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(calico_step, max_size=40))
def test_incremental_equals_from_scratch(steps: list[tuple]) -> None:
    """Pods arrive (and never leave) while the configuration changes: the marks are those of the final
    layout allocated in arrival order, as a planner that saw only the final objects would give them."""
    calico, felix, pods = CalicoState(), {}, {}
    for step in steps:
        if step[0] == "pod":
            key, obj = _pod(step[1], step[2])
            if key not in pods:
                pods[key] = obj
                calico.on_pod(key, obj)
        else:
            _, name, spec = step
            felix[name] = spec
            for node in calico.on_felix(name, spec):  # the planner core evaluates the settings per event
                calico.ensure_node(node)
    for node in ("node-a", "node-b"):
        calico.ensure_node(node)
    scratch = CalicoState()
    for name, spec in felix.items():
        if spec is not None:
            scratch.on_felix(name, spec)
    order = {iface: i for node in calico.arrival for i, iface in enumerate(calico.arrival[node])}
    for key, obj in sorted(pods.items(), key=lambda kv: order[calico.endpoints[kv[0]][1]]):
        scratch.on_pod(key, obj)
    for node in ("node-a", "node-b"):
        ours, theirs = calico.state(node), scratch.state(node)
        lay = calico.settings[node].layout()
        marks = list(ours.endpoint_marks.values())
        assert len(marks) == len(set(marks)) and all(m and m & lay.endpoint_mask == m for m in marks)
        assert len(marks) == min(len(calico.arrival.get(node, [])), lay.capacity)
        if not calico.config_problems[node]:  # with no problem, the history of last valid values is moot
            assert ours == theirs


# --- end to end: `kipvs plan` -----------------------------------------------------------------------------


def test_plan_publishes_zero_capacity_and_the_exhaustion_warning(plan) -> None:
    felix = {"apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration",
             "metadata": {"name": "default"}, "spec": {"iptablesMarkMask": 0x3F}}
    objs = [kube.node("node-a", "192.0.2.1"), felix, *(_pod(i)[1] for i in range(2))]
    state = plan([{"type": "ADDED", "object": o} for o in objs], "node-a", "json")
    assert state["mark_layout"] == {"accept": 1, "pass": 2, "drop": 4, "scratch0": 8, "scratch1": 0x10,
                                    "wireguard": 0, "endpoint_mask": 0x20, "non_calico": 0x20}
    assert state["endpoint_marks"] == {}
    (warning,) = state["warnings"]
    assert warning["code"] == "endpoint-marks-exhausted" and "(capacity 0)" in warning["message"]
