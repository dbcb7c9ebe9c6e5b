"""The simulator speaks the list/watch protocol to the real kubernetes-asyncio client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from services.harness.simulator import scenario as scenarios
from services.harness.simulator.server import Simulator
from tests import kube


async def _lines(resp, n: int, within: float = 5.0) -> list[dict]:
    out = []
    async with asyncio.timeout(within):
        while len(out) < n:
            line = await resp.content.readline()
            if not line:
                break
            out.append(json.loads(line))
    return out


async def test_chunked_list_is_one_consistent_snapshot(sim: Simulator, tmp_path: Path) -> None:
    for i in range(5):
        await sim.apply(kube.service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}"))
    api = client.CoreV1Api(await kube.api_client(sim, tmp_path))
    first = await api.list_service_for_all_namespaces(limit=2)
    assert len(first.items) == 2 and first.metadata._continue
    await sim.delete("Service", "default", "s4")  # a change between chunks must not show up
    await sim.apply(kube.service("s9", cluster_ip="10.96.0.99"))
    rest = await api.list_service_for_all_namespaces(limit=10, _continue=first.metadata._continue)
    names = [s.metadata.name for s in first.items + rest.items]
    assert names == ["s0", "s1", "s2", "s3", "s4"]
    assert rest.metadata.resource_version == first.metadata.resource_version
    await api.api_client.close()


async def test_watch_from_version_with_bookmarks_and_timeout(sim: Simulator, tmp_path: Path) -> None:
    await sim.apply(kube.service("a"))
    api = client.CoreV1Api(await kube.api_client(sim, tmp_path))
    listed = await api.list_service_for_all_namespaces()
    rv = listed.metadata.resource_version
    await sim.apply(kube.service("b", cluster_ip="10.96.0.11"))
    await sim.delete("Service", "default", "a")
    resp = await api.list_service_for_all_namespaces(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                                     timeout_seconds=1, _preload_content=False)
    assert ("GET", f"/api/v1/services?allowWatchBookmarks=True&resourceVersion={rv}&timeoutSeconds=1&watch=True") \
        in sim.requests
    events = await _lines(resp, 3)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "b"), ("DELETED", "a"), ("BOOKMARK", None)]
    bookmark_rv = int(events[2]["object"]["metadata"]["resourceVersion"])
    assert bookmark_rv >= int(events[1]["object"]["metadata"]["resourceVersion"])
    async with asyncio.timeout(3):
        while await resp.content.readline():  # timeoutSeconds closes the stream
            pass
    await api.api_client.close()


async def test_compacted_version_gives_410_error_event(sim: Simulator, tmp_path: Path) -> None:
    await sim.apply(kube.service("a"))
    old = sim.store.rv
    await sim.apply(kube.service("a", cluster_ip="10.96.0.12"))
    sim.compact()
    api = client.CoreV1Api(await kube.api_client(sim, tmp_path))
    resp = await api.list_service_for_all_namespaces(watch=True, resource_version=str(old), _preload_content=False)
    (event,) = await _lines(resp, 1)
    assert event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["kind"] == "Status"
    await api.api_client.close()


async def test_crud_and_custom_objects(sim: Simulator, tmp_path: Path) -> None:
    api_client = await kube.api_client(sim, tmp_path)
    custom = client.CustomObjectsApi(api_client)
    await custom.create_cluster_custom_object("crd.projectcalico.org", "v1", "felixconfigurations", {
        "apiVersion": "crd.projectcalico.org/v1", "kind": "FelixConfiguration", "metadata": {"name": "default"},
        "spec": {"iptablesMarkMask": 0xFFFF0000}})
    listed = await custom.list_cluster_custom_object("crd.projectcalico.org", "v1", "felixconfigurations")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["default"]
    core = client.CoreV1Api(api_client)
    await core.create_node(kube.node("node-a"))
    with pytest.raises(ApiException) as err:
        await core.create_node(kube.node("node-a"))
    assert err.value.status == 409
    await core.delete_node("node-a")
    with pytest.raises(ApiException) as err:
        await core.read_node("node-a")
    assert err.value.status == 404
    discovery = client.DiscoveryV1Api(api_client)
    eps = kube.endpoint_slice("web-1", "web", [kube.endpoint("10.244.1.5")])
    await discovery.create_namespaced_endpoint_slice("default", eps)
    slices = await discovery.list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.244.1.5"]
    await api_client.close()


def test_scenario_file_errors_are_precise(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("objects:\n  - {kind: Gateway, metadata: {name: x}}\n")
    with pytest.raises(scenarios.ScenarioError, match=r"objects\[0\]: kind 'Gateway' is not served"):
        scenarios.load(bad)
    bad.write_text("steps:\n  - {after: 1}\n")
    with pytest.raises(scenarios.ScenarioError, match=r"steps\[0\]: a step has exactly one of apply or delete"):
        scenarios.load(bad)


async def test_scenario_plays_its_steps(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps({"objects": [kube.node("node-a")], "steps": [
        {"after": 0, "apply": kube.service("web")}, {"after": 0, "delete": {"kind": "Node", "name": "node-a"}}]}))
    sc = scenarios.load(f)
    sim = Simulator()
    await scenarios.load_objects(sim, sc)
    await scenarios.play(sim, sc.steps)
    assert sorted(k[0] for k in sim.store.objects) == ["Service"]


async def test_restore_without_revision_bump_hands_versions_out_again(sim: Simulator, tmp_path: Path) -> None:
    """/_sim/fault/snapshot and /_sim/fault/restore: objects and the global version go back to the
    snapshot's, later writes reuse versions, open watches are cut, and a watch from a version the store
    has not reached again hears nothing (no bookmark either) until the store passes it."""
    import aiohttp

    await sim.apply(kube.service("kept", cluster_ip="10.96.0.1"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.url}/_sim/fault/restore") as resp:
            assert resp.status == 409, "no snapshot yet"
        async with http.post(f"{sim.url}/_sim/fault/snapshot") as resp:
            snap = (await resp.json())["snapshot"]
        await sim.apply(kube.service("born-later", cluster_ip="10.96.0.2"))
        before = sim.store.rv
        async with http.post(f"{sim.url}/_sim/fault/restore") as resp:
            assert await resp.json() == {"restored_to": snap}
    assert {k[2] for k in sim.store.objects} == {"kept"} and sim.store.rv == snap < before
    api = client.CoreV1Api(await kube.api_client(sim, tmp_path))
    resp = await api.list_service_for_all_namespaces(watch=True, resource_version=str(before),
                                                     allow_watch_bookmarks=True, _preload_content=False)
    with pytest.raises(TimeoutError):
        await _lines(resp, 1, within=1.0)  # bookmarks every 0.3 s, but none older than the watch's version
    resp.release()
    reused = await sim.apply(kube.service("other", cluster_ip="10.96.0.3"))
    assert reused["metadata"]["resourceVersion"] == str(snap + 1), "a version handed out before the restore"
