"""The plan cache's encoding keeps each Service's bytes while its plan is unchanged (issue 22: a node of
10,000 Services re-encoded them all every second under churn); the file decodes to the same plan."""

from __future__ import annotations

import msgspec

from services.applier import plan_cache
from shared.contract import events
from shared.plan.plan_state import SharedPlan


def _service(i: int, endpoint: int = 1) -> events.ServicePlan:
    eps = (events.Endpoint(ip=f"10.64.0.{endpoint}", port=8080, node="node-b"),)
    return events.ServicePlan(key=f"ns/svc-{i}", cluster_ips=(f"10.96.0.{i + 1}",),
                              ports=(events.PortPlan(name="http", port=80, endpoints=eps),))


def _decoded(data: bytes) -> events.PlanSnapshot:
    return msgspec.msgpack.decode(data, type=plan_cache.PlanCache).snapshot


def test_unchanged_services_keep_their_bytes_and_the_file_decodes_the_same() -> None:
    plan = SharedPlan()
    plan.services = {s.key: s for s in map(_service, range(5))}
    memo: dict[str, tuple[events.ServicePlan, msgspec.Raw]] = {}
    first = plan_cache.encode("node-a", plan, None, memo)
    assert _decoded(first) == _decoded(plan_cache.encode("node-a", plan, None))
    kept = {key: raw for key, (_, raw) in memo.items()}

    plan.services["ns/svc-2"] = _service(2, endpoint=9)  # a changed Service is a new (frozen) object
    plan.services["ns/svc-7"] = _service(7)
    del plan.services["ns/svc-4"]
    second = plan_cache.encode("node-a", plan, None, memo)
    assert _decoded(second).services == tuple(plan.services[k] for k in sorted(plan.services))
    assert set(memo) == set(plan.services), "a removed Service leaves the memo"
    assert all(memo[k][1] is kept[k] for k in ("ns/svc-0", "ns/svc-1", "ns/svc-3")), "not encoded again"
    assert memo["ns/svc-2"][1] is not kept["ns/svc-2"]
