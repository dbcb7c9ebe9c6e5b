"""IPVS-mode detection, live, in a network namespace this test creates on the host's real kernel.

The host kernel has no dummy links and no IPVS: ``kube-ipvs0`` is made here as a veth (Felix and kipvs
look only at the name and, for the owner, the alias). The QEMU guest repeats the link part
with a real dummy link and IPVS (tests/guest/kernel_applier.py)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest

from services.applier.node_facts import LINK_ALIAS, NodeProbe, Observation, conflicts, kube_proxy_processes, watch


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def netns():
    name = f"kipvs-facts-{uuid.uuid4().hex[:6]}"
    _ip("netns", "add", name)
    yield name
    _ip("netns", "del", name)


async def test_link_changes_are_reported_live_without_a_restart(netns: str) -> None:
    seen: list[Observation] = []
    changed = asyncio.Event()

    async def on_change(obs: Observation) -> None:
        seen.append(obs)
        changed.set()

    async def next_observation() -> Observation:
        await asyncio.wait_for(changed.wait(), 10)
        changed.clear()
        return seen[-1]

    stop = asyncio.Event()
    # recheck far longer than the test: only the link events can explain the reports below
    task = asyncio.create_task(watch(NodeProbe(netns, proc=None), on_change, stop, recheck=3600, settle=0.05))
    try:
        first = await next_observation()
        assert first == Observation(ipvs_available=False, kube_ipvs0="absent")
        _ip("-n", netns, "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "peer0")
        assert (await next_observation()).kube_ipvs0 == "other", "someone else's kube-ipvs0 (no kipvs alias)"
        _ip("-n", netns, "link", "del", "kube-ipvs0")
        assert (await next_observation()).kube_ipvs0 == "absent"
        # As kipvs's setup does: create, then set the alias (the kernel announces the creation, not the alias)
        _ip("-n", netns, "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "peer0")
        _ip("-n", netns, "link", "set", "kube-ipvs0", "alias", LINK_ALIAS)
        assert (await next_observation()).kube_ipvs0 == "kipvs"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_kube_proxy_ipvs_chains_are_a_conflict(netns: str) -> None:
    probe = NodeProbe(netns, proc=None)
    assert conflicts(await probe.observe()) == ()
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], check=True, text=True,
                   input="table ip nat {\n chain KUBE-LOAD-BALANCER {\n }\n chain KUBE-SERVICES {\n }\n}\n")
    obs = await probe.observe()
    assert obs.ipvs_mode_chains == ("ip nat KUBE-LOAD-BALANCER",)
    (problem,) = conflicts(obs)
    assert "another kube-proxy in IPVS mode" in problem and "restart the applier with --adopt" in problem


def test_kube_proxy_processes_are_found_with_their_mode(tmp_path: Path) -> None:
    for pid, argv in (("101", [b"/usr/local/bin/kube-proxy", b"--proxy-mode=ipvs", b"--v=2"]),
                      ("102", [b"kube-proxy", b"--config=/var/lib/kube-proxy/config.conf"]),
                      ("103", [b"/usr/bin/python3", b"kube-proxy-lookalike.py"])):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    (tmp_path / "self").mkdir()
    found = kube_proxy_processes(tmp_path)
    assert len(found) == 2
    assert found[0].startswith("pid 101, ipvs: /usr/local/bin/kube-proxy --proxy-mode=ipvs")
    assert found[1].startswith("pid 102, mode set elsewhere")
    problems = conflicts(Observation(ipvs_available=True, kube_ipvs0="other", kube_proxy_processes=found))
    assert len(problems) == 2 and all("stop kube-proxy" in p for p in problems)
