"""Calico's endpoint marks and FelixConfiguration merging, against the reference facts (Felix's source)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.endpoint_marks import InvalidMask, MarkAllocator, deposit, fnv1_32, interface_name, layout
from services.planner.felix_config import FelixSettings, effective


def test_default_mask_split_without_wireguard() -> None:
    lay = layout(0xFFFF0000)
    assert (lay.accept, lay.pass_, lay.drop, lay.scratch0, lay.scratch1) == (0x10000, 0x20000, 0x40000, 0x80000,
                                                                              0x100000)
    assert lay.wireguard == 0 and lay.endpoint_mask == 0xFFE00000 and lay.non_calico == 0x200000
    assert lay.capacity == 2**11 - 2


def test_default_mask_split_with_wireguard() -> None:
    lay = layout(0xFFFF0000, wireguard=True)
    assert lay.wireguard == 0x200000 and lay.endpoint_mask == 0xFFC00000 and lay.non_calico == 0x400000
    assert lay.capacity == 1022


@pytest.mark.parametrize("mask", [0, 0x1, 0x1F])
def test_masks_too_small_are_refused(mask: int) -> None:
    with pytest.raises(InvalidMask):
        layout(mask)


def test_six_bits_is_the_smallest_mask_felix_runs_with_in_ipvs_mode() -> None:
    lay = layout(0x3F)  # five single bits, one endpoint bit held by the non-Calico mark (tests/test_felix_marks.py)
    assert lay.endpoint_mask == lay.non_calico == 0x20 and lay.capacity == 0


def test_fnv1_test_vectors() -> None:
    # FNV-1 32-bit reference values (multiply then XOR), as Go's hash/fnv New32.
    assert fnv1_32(b"") == 0x811C9DC5
    assert fnv1_32(b"a") == 0x050C5D7E
    assert fnv1_32(b"foobar") == 0x31F0B262


def test_interface_name_is_calicos() -> None:
    expected = "cali" + hashlib.sha1(b"default.web-1").hexdigest()[:11]
    assert interface_name("default", "web-1") == expected and len(expected) == 15


def test_deposit_and_custom_mask() -> None:
    assert deposit(0b101, 0xF0) == 0x50
    lay = layout(0x0FF0)  # 8 bits: 5 singles, 3 endpoint bits -> 8 positions, 6 endpoints
    assert lay.endpoint_mask == 0x0E00 and lay.capacity == 6


def test_capacity_is_reached_then_exhaustion_is_named() -> None:
    alloc = MarkAllocator(layout(0x0FF0))
    names = [f"cali{i:011x}" for i in range(8)]
    marks = [alloc.mark(n) for n in names]
    assert sum(1 for m in marks if m) == 6, "capacity is 2^n - 2"
    assert alloc.unmarked == names[6:]
    assert len(set(m for m in marks if m)) == 6 and layout(0x0FF0).non_calico not in marks
    alloc.release(names[0])
    assert alloc.mark(names[6]) != 0 and alloc.unmarked == [names[7]]


def test_collisions_are_resolved_by_arrival_order() -> None:
    lay = layout(0x0FF0)
    a, b = MarkAllocator(lay), MarkAllocator(lay)
    names = [f"cali{i:011x}" for i in range(6)]
    first = {n: a.mark(n) for n in names}
    second = {n: b.mark(n) for n in reversed(names)}
    assert sorted(first.values()) == sorted(second.values())
    assert MarkAllocator(lay).mark(names[0]) == first[names[0]], "the same arrival order gives the same marks"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=80))
def test_no_two_live_endpoints_share_a_mark_and_marks_never_move(steps) -> None:
    alloc = MarkAllocator(layout(0xFFFF0000, wireguard=True))
    live: dict[str, int] = {}
    for add, i in steps:
        name = f"cali{i:011x}"
        if add:
            mark = alloc.mark(name)
            if name in live:
                assert mark == live[name], "a live endpoint's mark changed"
            live[name] = mark
        else:
            alloc.release(name)
            live.pop(name, None)
    marks = [m for m in live.values() if m]
    assert len(marks) == len(set(marks))
    assert alloc.layout.non_calico not in marks


def test_felix_configuration_precedence_field_by_field() -> None:
    configs = {"default": {"iptablesMarkMask": 0xFFF00000, "kubeNodePortRanges": ["30000:32767", 8080]},
               "node.node-a": {"kubeNodePortRanges": ["31000:31999"], "wireguardEnabled": True}}
    a, problems = effective(configs, "node-a")
    assert problems == []
    assert a == FelixSettings(iptables_mark_mask=0xFFF00000, kube_node_port_ranges=((31000, 31999),),
                              wireguard_enabled=True)
    b, _ = effective(configs, "node-b")
    assert b.kube_node_port_ranges == ((30000, 32767), (8080, 8080)) and not b.wireguard_enabled


@pytest.mark.parametrize(("spec", "match"), [
    ({"iptablesMarkMask": 0x1}, "fewer than 2 bits"),
    ({"kubeNodePortRanges": ["30000-32767"]}, "not a port or 'lo:hi'"),
    ({"kubeNodePortRanges": [str(p) for p in range(8)]}, "at most 7"),
])
def test_invalid_values_are_reported_and_the_last_valid_value_kept(spec, match: str) -> None:
    last = FelixSettings(iptables_mark_mask=0xFF000000, kube_node_port_ranges=((30000, 30100),))
    got, problems = effective({"default": spec}, "n", last_valid=last)
    assert len(problems) == 1 and match in problems[0] and "FelixConfiguration default" in problems[0]
    assert got.iptables_mark_mask == last.iptables_mark_mask or "iptablesMarkMask" not in spec
    assert got.kube_node_port_ranges == last.kube_node_port_ranges or "kubeNodePortRanges" not in spec
