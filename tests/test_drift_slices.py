"""The drift check's slices (services/applier/drift_slices.py): bounded real-server reads per check, every
service covered within ceil(services / per_check) checks, and a drifted real server found in its slice."""

from __future__ import annotations

import copy

from services.applier.drift_slices import DriftSlices, parts_for
from services.applier.ops import AddReal, diff
from shared.plan.node_state import NodeState, VirtualService


def state(services: int) -> NodeState:
    out = NodeState()
    for i in range(services):
        vs = VirtualService("TCP", f"10.96.0.{i + 1}", 80, "rr", reals={(f"10.64.0.{i + 1}", 8080): 1,
                                                                        (f"10.64.1.{i + 1}", 8080): 1})
        out.ipvs[vs.key] = vs
    return out


def test_every_service_is_read_once_in_parts_checks() -> None:
    keys = list(state(250).ipvs)
    slices = DriftSlices(per_check=100)
    assert parts_for(250, 100) == 3
    seen: list[int] = [0] * len(keys)
    for _ in range(3):
        checked, parts = slices.next(len(keys))
        assert parts == 3
        for n, key in enumerate(keys):
            seen[n] += checked(key)
    assert seen == [1] * len(keys)
    checked, parts = DriftSlices(per_check=1000).next(len(keys))
    assert parts == 1 and all(checked(k) for k in keys)


def test_a_drifted_real_server_is_found_in_its_slice_and_nowhere_else() -> None:
    want = state(250)
    kernel = copy.deepcopy(want)
    drifted = ("TCP", "10.96.0.7", 80)
    del kernel.ipvs[drifted].reals[("10.64.0.7", 8080)]
    slices = DriftSlices(per_check=100)
    found = []
    for turn in range(3):
        checked, _ = slices.next(len(want.ipvs))
        observed = copy.deepcopy(kernel)
        for key, vs in observed.ipvs.items():  # what observe(checked) returns: no reals outside the slice
            if not checked(key):
                vs.reals = {}
        DriftSlices.assume_unchecked(want, observed, checked)
        ops = diff(want, observed, set(want.ipvs))
        if ops:
            found.append((turn, ops))
    assert len(found) == 1
    assert found[0][1] == [AddReal(drifted, ("10.64.0.7", 8080), 1)]
