"""What one applier connection costs the NATS servers' memory, taken apart (issue 27): the bare connection,
its subscriptions with their interest on the other servers, and the outbound buffers after a fan-out.

Three nats-servers as in ``fanout.py``, N plain connections spread over them as nats-py spreads the appliers
(a random server of the list), then the four subscriptions an applier on the feed holds (``kipvs.feed.all``,
``kipvs.feed.node.<node>``, its claim key's subject ``$KV.kipvs-appliers.<node>``, its reply inbox
``_INBOX.<id>.*``), then 100 feed-sized messages (0.5 KB) to all at 5 a second. After each stage the three
servers' RSS (``/proc``) and their own counts (``/varz``: connections, subscriptions, ``/routez``: the interest
routed to each server) are read; printed per connection. Nothing is asserted.

    python -m tests.bench fanout --connection-cost 300
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import nats

from shared.contract import node_claims, topology
from tests.bench import fleet

SETTLE_S = 3.0  # seconds for the servers to take in a stage (routes' interest, Go's heap)


async def _stage(cluster: fleet.Cluster) -> dict[str, float]:
    await asyncio.sleep(SETTLE_S)
    varz = cluster.monitor("varz")
    return {"rss_mib": cluster.rss_mib(), "subs": sum(v.get("subscriptions", 0) for v in varz),
            "conns": sum(v.get("connections", 0) for v in varz)}


async def _fan_out(publisher: nats.NATS, messages: int, rate: float) -> None:
    payload = b"x" * 512
    for _ in range(messages):
        await publisher.publish(topology.plan_feed_subject(topology.PLAN_ALL_SUBJECT), payload)
        await asyncio.sleep(1 / rate)


async def measure(n: int) -> dict[str, dict[str, float]]:
    """Per stage, the three servers' RSS and counts: ``none``, ``connected``, ``subscribed``, ``fanned``."""
    with tempfile.TemporaryDirectory(prefix="kipvs-conns-") as tmp:
        cluster = fleet.Cluster(Path(tmp))
        cluster.start()
        conns: list[nats.NATS] = []
        try:
            await cluster.ready()
            stages = {"none": await _stage(cluster)}
            for i in range(n):
                conns.append(await nats.connect(cluster.url.split(","), name=f"bench-conn/{i}"))
            stages["connected"] = await _stage(cluster)
            for i, nc in enumerate(conns):
                feeds = [topology.plan_feed_subject(s) for s in (topology.PLAN_ALL_SUBJECT,
                                                                  topology.plan_node_subject(f"node-{i}"))]
                claim = f"$KV.{node_claims.BUCKET}.{node_claims.claim_key(f'node-{i}')}"
                for subject in (*feeds, claim, f"{nc.new_inbox()}.*"):
                    await nc.subscribe(subject, cb=_drop)
            stages["subscribed"] = await _stage(cluster)
            publisher = await nats.connect(cluster.url.split(","))
            await _fan_out(publisher, 100, 5.0)
            await publisher.close()
            stages["fanned"] = await _stage(cluster)
            return stages
        finally:
            for nc in conns:
                await nc.close()
            cluster.stop()


async def _drop(msg) -> None:
    del msg


def report(n: int, stages: dict[str, dict[str, float]]) -> None:
    print(f"== what one connection costs the three servers' memory (N={n} connections, 4 subscriptions each, "
          "then 100 messages of 0.5 KB to all) ==")
    steps = (("the connection", "none", "connected"), ("its 4 subscriptions and their interest", "connected",
             "subscribed"), ("after 100 messages to all (buffers)", "subscribed", "fanned"))
    for label, a, b in steps:
        rss = (stages[b]["rss_mib"] - stages[a]["rss_mib"]) / n
        subs = (stages[b]["subs"] - stages[a]["subs"]) / n
        print(f"  {label:<40} {rss * 1024:8.1f} KiB per connection ({subs:+.1f} subscriptions counted by the "
              "servers per connection)")
    total = (stages["fanned"]["rss_mib"] - stages["none"]["rss_mib"]) / n
    print(f"  in all: {total:.3f} MiB per connection")


def main(n: int) -> int:
    report(n, asyncio.run(measure(n)))
    return 0
