"""Fan-out benchmark (issue 27): what one node costs the NATS servers per plan change, with nothing else on the
machine competing for the CPU the way a fleet of real appliers does.

Three nats-server processes in one JetStream cluster with kipvs's topology (R3 streams, as in deploy/), one
publisher of plan deltas (real envelopes, ~0.5 KB, on ``kipvs.plan.all`` at a steady rate) and N nodes in one
process, each with its own NATS connection running the applier's production bus code with a handler that reads
the node's claim (as the applier does) and counts: the durable consumer (``bus.DurableConsumer`` on
``topology.applier_consumer``, acks, a status report per batch) or the plan feed (``plan_feed.PlanFeed``,
reports paced by ``report_pacer``). The fleet benchmark (fleet.py) runs the whole appliers; on a shared 2-core
machine their CPU queueing batches many changes per fetch and hides the per-change cost, which this one
measures. Printed per design and N: the servers' CPU per change per node (churn minus idle), their RSS per
added node, KIPVS_STATUS messages per change per node and per node per second. Nothing is asserted.

    python -m tests.bench fanout --nodes 100,300 --changes 100 --rate 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats

from services.applier import node_claim, plan_feed, report_pacer
from shared.contract import events, topology
from shared.messaging import bus
from shared.service.metrics import Registry
from tests.bench import fleet, fleet_nodes

DESIGNS = {
    # name: (plan input, report interval (None: reports on core NATS, not into KIPVS_STATUS), acks)
    "consumer": ("consumer", 0.0, True),  # before issue 27: a durable per node, a report per batch
    "consumer-core-reports": ("consumer", None, True),
    "consumer-no-acks": ("consumer", None, False),  # and reports on core NATS
    "feed": ("feed", report_pacer.REPORT_INTERVAL, True),  # issue 27: the republished feed, reports paced
    "feed-core-reports": ("feed", None, True),
}


@dataclass
class Node:
    name: str
    nc: nats.NATS
    last: int = 0  # the last delta seq handled
    task: asyncio.Task | None = None
    stopper: object = None


def delta(seq: int) -> events.Envelope:
    record = events.PlanDelta(scope="all", seq=seq, source_seq=seq, ops=())
    return events.Envelope(id=f"bench/{seq}", time_ns=time.time_ns(), producer="bench",
                           causation=tuple(f"EndpointSlice/bench/svc-{seq}-a@{seq:012d}" for _ in range(8)),
                           record=record)


async def start_node(url: str, name: str, design: str) -> Node:
    kind, interval, _ = DESIGNS[design]
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1)
    js = nc.jetstream(timeout=10)
    node = Node(name, nc)

    async def publish(what: str, envelope: events.Envelope) -> None:
        if interval is None:
            await nc.publish(f"{fleet_nodes.CORE_REPORTS}.{name}.{what}", events.encode(envelope))
        else:
            await bus.publish(js, topology.status_subject(name, what), envelope)

    pacer = report_pacer.ReportPacer(publish, interval or 0.0)
    # the node's claim, read before a batch as the applier does: every batch before issue 27, then at most
    # once a second (node_claim.py)
    claim = node_claim.NodeClaim(js, name, Registry("applier"), instance=f"bench/{name}")
    await claim.take(asyncio.Event())
    held = claim.still_held if kind == "consumer" else claim.held_lately

    async def handle(batch: list[bus.Delivery]) -> None:
        await held()
        node.last = max(node.last, *(d.envelope.record.seq for d in batch))
        record = events.ApplyReport(node=name, plan_seq=node.last, operations=1, duration_ms=0.1,
                                    desired_digest=str(node.last))
        pacer.offer("applied", events.Envelope(id=f"applied/{name}/{node.last}", time_ns=time.time_ns(),
                                               producer=f"applier/{name}", record=record))

    after = (await js.stream_info(topology.PLAN_STREAM)).state.last_seq
    if kind == "feed":
        runner = plan_feed.PlanFeed(nc, js, name, handle, after, topology.applier_durable(name))
    else:
        spec = await topology.recreate_applier_consumer(js, name, after)  # acks or not: see run_design
        runner = bus.DurableConsumer(js, spec, name, handle, fetch_wait=5.0)
    node.task = asyncio.create_task(runner.run())
    node.stopper = runner
    return node


async def measure(cluster: fleet.Cluster, nodes: list[Node], publisher, changes: int, rate: float,
                  first: int) -> dict[str, float]:
    """Idle, then ``changes`` deltas at ``rate``; the servers' figures."""
    js = publisher.jetstream(timeout=10)
    await asyncio.sleep(3)
    cpu0, t0 = cluster.cpu_seconds(), time.monotonic()
    await asyncio.sleep(8)
    idle = (cluster.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    status0 = (await js.stream_info(topology.STATUS_STREAM)).state.messages
    cpu0, t0 = cluster.cpu_seconds(), time.monotonic()
    for seq in range(first, first + changes):
        await bus.publish(js, topology.PLAN_ALL_SUBJECT, delta(seq))
        await asyncio.sleep(1 / rate)
    last = first + changes - 1
    await fleet.wait_for(lambda: all(n.last >= last for n in nodes), 120, f"{len(nodes)} nodes to take the deltas")
    await asyncio.sleep(1.5)  # the paced reports' trailing edge
    wall = time.monotonic() - t0
    churn = (cluster.cpu_seconds() - cpu0) / wall
    status = (await js.stream_info(topology.STATUS_STREAM)).state.messages - status0
    n = max(len(nodes), 1)
    per_change = (churn - idle) * wall * 1000 / changes
    return {"nodes": len(nodes), "idle_cpu": idle, "churn_cpu": churn, "cpu_ms_per_change": per_change,
            "cpu_ms_per_change_node": per_change / n,
            "status_per_change_node": status / changes / n, "status_per_node_s": status / wall / n,
            "servers_rss_mib": cluster.rss_mib()}


async def run_design(design: str, sizes: list[int], changes: int, rate: float) -> list[dict[str, float]]:
    if not DESIGNS[design][2]:
        fleet_nodes.without_acks()  # for the rest of this process: the designs without acks come after
    with tempfile.TemporaryDirectory(prefix="kipvs-fanout-") as tmp:
        cluster = fleet.Cluster(Path(tmp))
        cluster.start()
        nodes: list[Node] = []
        publisher = None
        try:
            await cluster.ready()
            publisher = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1)
            await bus.setup(publisher, replicas=3)
            await asyncio.sleep(2)
            rss0 = cluster.rss_mib()
            # no node: what a change costs the servers whatever N (the planner's write, replicated)
            base = (await measure(cluster, [], publisher, changes, rate, 1))["cpu_ms_per_change"]
            rows, seq = [], changes + 1
            for size in sizes:
                while len(nodes) < size:
                    nodes.append(await start_node(cluster.url, f"node-{len(nodes)}", design))
                try:
                    row = await measure(cluster, nodes, publisher, changes, rate, seq)
                except RuntimeError as exc:  # the machine's limit (the nodes share one process): report the rest
                    print(f"  {design} at N={size}: {exc}; not grown further", flush=True)
                    break
                row["rss_mib_per_node"] = (row["servers_rss_mib"] - rss0) / size
                row["base_cpu_ms_per_change"] = base
                row["marginal_cpu_ms_per_change_node"] = (row["cpu_ms_per_change"] - base) / size
                seq += changes
                rows.append(row)
                print(f"  {design}: " + json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
            return rows
        finally:
            for node in nodes:
                node.stopper.stop()  # type: ignore[attr-defined]
            for node in nodes:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(node.task, 10)  # type: ignore[arg-type]
                with contextlib.suppress(Exception):
                    await node.nc.close()
            if publisher is not None:
                await publisher.close()
            cluster.stop()


def report(results: dict[str, list[dict[str, float]]], changes: int, rate: float) -> None:
    print(f"== fan-out: {changes} plan deltas at {rate:g}/s; 3 nats-servers, R3 streams; N nodes running the "
          "applier's bus code with a counting handler ==")
    print("cpu: the three servers' CPU during the deltas minus idle, per delta and node; 'minus no-node' first takes "
          "away what a delta costs with no node at all (the publisher's R3 write), measured in the same run")
    print(f"{'design':<22} {'N':>5} {'cpu ms/chg/node':>15} {'minus no-node':>13} {'RSS MiB/node':>12} "
          f"{'status/chg/node':>15} "
          f"{'status/node/s':>13}")
    for design, rows in results.items():
        for r in rows:
            print(f"{design:<22} {r['nodes']:>5.0f} {r['cpu_ms_per_change_node']:>15.4f} "
                  f"{r['marginal_cpu_ms_per_change_node']:>13.4f} "
                  f"{r['rss_mib_per_node']:>12.3f} {r['status_per_change_node']:>15.2f} "
                  f"{r['status_per_node_s']:>13.2f}")
    split = [results.get(d) for d in ("consumer", "consumer-core-reports", "consumer-no-acks")]
    if all(split):
        for i, row in enumerate(split[0]):  # type: ignore[index]
            a, b, c = (s[i]["marginal_cpu_ms_per_change_node"] for s in split)  # type: ignore[index]
            print(f"consumer design at N={row['nodes']:.0f}: {a:.4f} ms per change per node = status reports "
                  f"{a - b:.4f} + acks {b - c:.4f} + delivery (pull requests, messages) {c:.4f}")
    feed, before = results.get("feed"), results.get("consumer")
    if feed and before:
        for f, b in zip(feed, before, strict=False):
            ratio = f["cpu_ms_per_change_node"] / b["cpu_ms_per_change_node"]
            marginal = f["marginal_cpu_ms_per_change_node"] / b["marginal_cpu_ms_per_change_node"]
            print(f"N={f['nodes']:.0f}: the feed costs x{ratio:.2f} of the consumer design per change per node "
                  f"(x{marginal:.2f} minus the no-node cost; goal: at most x0.1); RSS per node "
                  f"{f['rss_mib_per_node']:.3f} MiB (goal: at most 0.3); KIPVS_STATUS "
                  f"{f['status_per_change_node']:.2f} per change per node, {f['status_per_node_s']:.2f} per node "
                  "per second (goals: at most 1 each)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100", help="fleet sizes, comma-separated (default 100)")
    parser.add_argument("--changes", type=int, default=100, help="plan deltas per size (default 100)")
    parser.add_argument("--rate", type=float, default=5.0, help="deltas per second (default 5)")
    parser.add_argument("--report-interval", type=float, default=report_pacer.REPORT_INTERVAL,
                        help="seconds between two reports of a node on the feed (default: kipvs applier's)")
    parser.add_argument("--designs", default=",".join(DESIGNS),
                        help="comma-separated, in this order, of: " + ", ".join(DESIGNS))
    args = parser.parse_args(argv)
    sizes = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not sizes or sizes[0] < 1:
        parser.error(f"unknown design {unknown[0]!r}" if unknown else "--nodes: at least 1")
    DESIGNS["feed"] = ("feed", args.report_interval, True)
    results = {d: asyncio.run(run_design(d, sizes, args.changes, args.rate)) for d in designs}
    report(results, args.changes, args.rate)
    return 0
