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
added node (idle, and after the changes), KIPVS_STATUS messages per change per node and per node per second,
and from the servers' own counters (their loopback monitoring port: /varz, /connz) the messages they wrote to
and read from the nodes' connections and wrote in all (routes included) per change per node, and each node
connection's subscriptions; then issue 27's goals against each feed design's figures. The designs
(``--designs``, ``DESIGNS``) take one cost away at a time or vary the reports: their pace under churn
(``feed-1s``, ``feed-2s``, ``feed-5s``; ``feed`` is the applier's default) and KIPVS_STATUS's replicas
(``feed-status-r1``). ``--connection-cost N`` instead takes one connection's memory apart
(``fanout_conns.py``). Nothing is asserted.

    python -m tests.bench fanout --nodes 100,300 --changes 100 --rate 5
    python -m tests.bench fanout --nodes 100 --designs consumer,feed-1s,feed,feed-core-reports
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
from typing import NamedTuple

import nats

from services.applier import node_claim, plan_feed, report_pacer
from shared.contract import events, topology
from shared.messaging import bus
from shared.service.metrics import Registry
from tests.bench import fanout_conns, fleet, fleet_nodes


class Design(NamedTuple):
    plan: str  # "consumer" (a durable per node) or "feed" (plan_feed.PlanFeed)
    interval: float | None  # seconds between two reports of a node; None: reports on core NATS, stored nowhere
    acks: bool
    watch: bool  # the claim watched on its key's subject (else read before a batch: each one, or once a second)
    status_replicas: int = 3  # KIPVS_STATUS's replicas (R3 as in deploy/)
    busy_interval: float = report_pacer.BUSY_REPORT_INTERVAL  # under sustained churn (report_pacer.py)


DESIGNS = {
    "consumer": Design("consumer", 0.0, True, False),  # before issue 27: a durable per node, a report per batch
    "consumer-core-reports": Design("consumer", None, True, False),
    "consumer-no-acks": Design("consumer", None, False, False),  # and reports on core NATS
    # issue 27, first part: the republished feed, reports paced, the claim read at most once a second
    "feed-claim-poll": Design("feed", report_pacer.REPORT_INTERVAL, True, False),
    "feed": Design("feed", report_pacer.REPORT_INTERVAL, True, True),  # and the claim watched: the applier now
    "feed-core-reports": Design("feed", None, True, True),
    # the reports' variants (issue 27): paced wider under churn, or into an R1 status stream
    # ... 1 s whatever the churn (the pace before --busy-report-interval), 2 s, 5 s
    "feed-1s": Design("feed", 1.0, True, True, busy_interval=1.0),
    "feed-2s": Design("feed", 2.0, True, True, busy_interval=2.0),
    "feed-5s": Design("feed", 5.0, True, True, busy_interval=5.0),
    "feed-status-r1": Design("feed", 1.0, True, True, status_replicas=1, busy_interval=1.0),
}
# `make bench`: the split of the consumer design, the feed and what its reports cost
DEFAULT_DESIGNS = ("consumer", "consumer-core-reports", "consumer-no-acks", "feed", "feed-core-reports")
GOAL_CPU_MS = 0.076  # servers' CPU per change per node at N=100 (issue 27: a tenth of 0.76 ms), or x0.1 of "consumer"
GOAL_RSS_MIB = 0.3  # servers' RSS per added node


NODE_CONN = "bench-node/"  # the nodes' connection names, so the servers' /connz tells them apart


def counters(cluster: fleet.Cluster) -> dict[str, float]:
    """The servers' own message counters (monitoring endpoints, summed over the three): every message they
    read and wrote (routes included: a replicated write is several), and what they read from and wrote to the
    nodes' connections (a JetStream request is one message from the node, its answer one to it)."""
    varz = cluster.monitor("varz")
    conns = [c for z in cluster.monitor("connz?limit=100000&subs=1") for c in z.get("connections") or ()
             if str(c.get("name", "")).startswith(NODE_CONN)]
    return {"in_msgs": sum(v["in_msgs"] for v in varz), "out_msgs": sum(v["out_msgs"] for v in varz),
            "to_nodes": sum(c["out_msgs"] for c in conns), "from_nodes": sum(c["in_msgs"] for c in conns),
            "node_subs": sum(c.get("subscriptions", 0) for c in conns), "node_conns": len(conns),
            "subs": sum(z.get("num_subscriptions", 0) for z in cluster.monitor("subsz"))}


def per_change_node(c0: dict[str, float], c1: dict[str, float], c2: dict[str, float], idle_s: float,
                    churn_s: float, changes: int, n: int) -> dict[str, float]:
    """Each counter's growth during the changes minus what idle would have added, per change and node."""
    out = {}
    for key in ("in_msgs", "out_msgs", "to_nodes", "from_nodes"):
        idle_rate = (c1[key] - c0[key]) / idle_s
        out[f"{key}_per_change_node"] = ((c2[key] - c1[key]) - idle_rate * churn_s) / changes / n
    out["subs_per_node"] = c2["node_subs"] / n
    return out


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
    kind, interval, _, watch, _, busy = DESIGNS[design]
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1, name=f"{NODE_CONN}{name}")
    js = nc.jetstream(timeout=10)
    node = Node(name, nc)

    async def publish(what: str, envelope: events.Envelope) -> None:
        if interval is None:
            await nc.publish(f"{fleet_nodes.CORE_REPORTS}.{name}.{what}", events.encode(envelope))
        else:
            await bus.publish(js, topology.status_subject(name, what), envelope)

    pacer = report_pacer.ReportPacer(publish, interval or 0.0, busy_interval=busy)
    # the node's claim, read before a batch as the applier does: every batch before issue 27, then at most
    # once a second (node_claim.py)
    claim = node_claim.NodeClaim(js, name, Registry("applier"), instance=f"bench/{name}",
                                 nc=nc if watch else None)
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
    c0, cpu0, t0 = counters(cluster), cluster.cpu_seconds(), time.monotonic()
    await asyncio.sleep(8)
    idle_s = time.monotonic() - t0
    idle = (cluster.cpu_seconds() - cpu0) / idle_s
    status0 = (await js.stream_info(topology.STATUS_STREAM)).state.messages
    c1, cpu0, t0 = counters(cluster), cluster.cpu_seconds(), time.monotonic()
    rss_idle = cluster.rss_mib()  # the nodes connected and idle, before the changes
    for seq in range(first, first + changes):
        await bus.publish(js, topology.PLAN_ALL_SUBJECT, delta(seq))
        await asyncio.sleep(1 / rate)
    last = first + changes - 1
    await fleet.wait_for(lambda: all(n.last >= last for n in nodes), 120, f"{len(nodes)} nodes to take the deltas")
    await asyncio.sleep(1.5)  # the paced reports' trailing edge
    wall = time.monotonic() - t0
    churn = (cluster.cpu_seconds() - cpu0) / wall
    c2 = counters(cluster)
    status = (await js.stream_info(topology.STATUS_STREAM)).state.messages - status0
    n = max(len(nodes), 1)
    per_change = (churn - idle) * wall * 1000 / changes
    return {"nodes": len(nodes), "idle_cpu": idle, "churn_cpu": churn, "cpu_ms_per_change": per_change,
            "cpu_ms_per_change_node": per_change / n,
            "status_per_change_node": status / changes / n, "status_per_node_s": status / wall / n,
            "servers_rss_mib": cluster.rss_mib(), "servers_rss_idle_mib": rss_idle,
            **per_change_node(c0, c1, c2, idle_s, wall, changes, n)}


async def status_replicas(nc: nats.NATS, replicas: int) -> None:
    """KIPVS_STATUS declared again with ``replicas`` (empty: the run has not started)."""
    js = nc.jetstream(timeout=10)
    config = (await js.stream_info(topology.STATUS_STREAM)).config
    await js.delete_stream(topology.STATUS_STREAM)
    config.num_replicas = replicas
    await js.add_stream(config)


async def run_design(design: str, sizes: list[int], changes: int, rate: float) -> list[dict[str, float]]:
    if not DESIGNS[design].acks:
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
            if DESIGNS[design].status_replicas != 3:
                await status_replicas(publisher, DESIGNS[design].status_replicas)
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
                row["rss_idle_mib_per_node"] = (row["servers_rss_idle_mib"] - rss0) / size
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
    print("messages per change per node, from the servers' own counters (/varz, /connz; idle subtracted): "
          "written to the nodes' connections, read from them, every message the three servers wrote (routes "
          "included); subscriptions per node connection")
    print(f"{'design':<22} {'N':>5} {'to nodes':>9} {'from nodes':>10} {'servers out':>11} {'subs/node':>9} "
          f"{'RSS MiB/node idle':>17}")
    for design, rows in results.items():
        for r in rows:
            print(f"{design:<22} {r['nodes']:>5.0f} {r['to_nodes_per_change_node']:>9.3f} "
                  f"{r['from_nodes_per_change_node']:>10.3f} "
                  f"{r['out_msgs_per_change_node']:>11.3f} {r['subs_per_node']:>9.1f} "
                  f"{r['rss_idle_mib_per_node']:>17.3f}")
    split = [results.get(d) for d in ("consumer", "consumer-core-reports", "consumer-no-acks")]
    if all(split):
        for i, row in enumerate(split[0]):  # type: ignore[index]
            a, b, c = (s[i]["marginal_cpu_ms_per_change_node"] for s in split)  # type: ignore[index]
            print(f"consumer design at N={row['nodes']:.0f}: {a:.4f} ms per change per node = status reports "
                  f"{a - b:.4f} + acks {b - c:.4f} + delivery (pull requests, messages) {c:.4f}")
    goals(results)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def goals(results: dict[str, list[dict[str, float]]]) -> None:
    """Issue 27's goals against the figures of this run of each design on the feed whose reports are stored
    (nothing asserted)."""
    before = {r["nodes"]: r for r in results.get("consumer", ())}
    feeds = [(d, f) for d, rows in results.items() for f in rows
             if DESIGNS[d].plan == "feed" and DESIGNS[d].interval is not None and d != "feed-claim-poll"]
    for design, f in feeds:
        cpu = f["cpu_ms_per_change_node"]
        line = (f"goals, {design} at N={f['nodes']:.0f}: servers' CPU per change per node {cpu:.4f} ms "
                f"(goal <= {GOAL_CPU_MS}): {_met(cpu <= GOAL_CPU_MS)}")
        b = before.get(f["nodes"])
        if b:
            ratio = cpu / b["cpu_ms_per_change_node"]
            marginal = f["marginal_cpu_ms_per_change_node"] / b["marginal_cpu_ms_per_change_node"]
            line += (f"; x{ratio:.3f} of this run's consumer design (x{marginal:.3f} minus no-node; goal <= x0.1): "
                     f"{_met(ratio <= 0.1)}")
        print(line + ("" if f["nodes"] == 100 else " (the goals are stated at N=100)"))
        print(f"  servers' RSS per added node {f['rss_mib_per_node']:.3f} MiB after the changes, "
              f"{f['rss_idle_mib_per_node']:.3f} connected and idle (goal <= {GOAL_RSS_MIB}): after the changes "
              f"{_met(f['rss_mib_per_node'] <= GOAL_RSS_MIB)}, idle {_met(f['rss_idle_mib_per_node'] <= GOAL_RSS_MIB)}")
        print(f"  KIPVS_STATUS {f['status_per_change_node']:.2f} per change per node, {f['status_per_node_s']:.2f} "
              f"per node per second (goals <= 1 each): "
              f"{_met(f['status_per_change_node'] <= 1 and f['status_per_node_s'] <= 1)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100", help="fleet sizes, comma-separated (default 100)")
    parser.add_argument("--changes", type=int, default=100, help="plan deltas per size (default 100)")
    parser.add_argument("--rate", type=float, default=5.0, help="deltas per second (default 5)")
    parser.add_argument("--report-interval", type=float, default=report_pacer.REPORT_INTERVAL,
                        help="seconds between two reports of a node on the feed (default: kipvs applier's)")
    # feed-claim-poll only by name: the first session's applier, kept to show what the claim watch saved
    parser.add_argument("--designs", default=",".join(DEFAULT_DESIGNS),
                        help="comma-separated, in this order, of: " + ", ".join(DESIGNS))
    parser.add_argument("--connection-cost", type=int, default=0, metavar="N",
                        help="instead: what one connection costs the servers' memory, taken apart, with N of them "
                             "(fanout_conns.py)")
    args = parser.parse_args(argv)
    if args.connection_cost > 0:
        return fanout_conns.main(args.connection_cost)
    sizes = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not sizes or sizes[0] < 1:
        parser.error(f"unknown design {unknown[0]!r}" if unknown else "--nodes: at least 1")
    for name in ("feed", "feed-claim-poll"):
        DESIGNS[name] = DESIGNS[name]._replace(interval=args.report_interval)
    results = {d: asyncio.run(run_design(d, sizes, args.changes, args.rate)) for d in designs}
    report(results, args.changes, args.rate)
    return 0
