"""One process of the fleet benchmark's appliers: ``count`` real appliers (the production service runtime,
consumer, plan and resolve code) on the memory kernel, each with its own NATS connection, following the plan
feed (``--plan-feed feed``, the default, as production) or a durable consumer each (``--plan-feed consumer``,
the design the feed replaced), as asyncio tasks. Started by tests/bench/fleet.py; prints one JSON line per
applier when it starts (``{"node": ..., "started": <unix time>}``) so the harness can time a new node's bootstrap.

    python -m tests.bench.fleet_nodes --nats-url URL --prefix node- --first 0 --count 100 --consumer r1-memory
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import signal
import sys
import time

from nats.js.api import AckPolicy

from services.applier import plan_consumer
from services.applier.kernel.backend import MemoryKernel
from services.applier.main import ApplierConfig, apply_plan
from services.applier.reports import Reports
from shared.contract import events, topology
from shared.messaging import bus
from shared.service import runtime

CONSUMERS = {"r3": (3, False), "r1": (1, False), "r1-memory": (1, True)}


def use_consumer_design(design: str) -> None:
    """Make this process's appliers create their durable consumers as ``design`` says (the benchmark's knob;
    production uses topology.applier_consumer's defaults)."""
    replicas, memory = CONSUMERS[design]
    topology.applier_consumer = functools.partial(topology.applier_consumer, replicas=replicas, memory=memory)


def without_acks() -> None:
    """The benchmark's knob to measure what acknowledgements cost the servers: consumers with
    ``AckPolicy.NONE`` and no acks sent (not a design: nothing would redeliver a batch the applier failed)."""
    with_acks = topology.applier_consumer

    def spec(*args, **kwargs) -> topology.ConsumerSpec:
        made = with_acks(*args, **kwargs)
        return dataclasses.replace(made, config=dataclasses.replace(made.config, ack_policy=AckPolicy.NONE))

    async def count_only(self: bus.DurableConsumer, deliveries: list[bus.Delivery]) -> None:
        self.delivered += len(deliveries)

    topology.applier_consumer = spec
    bus.DurableConsumer._ack = count_only  # type: ignore[method-assign]


CORE_REPORTS = "bench.status"  # reports on core NATS (no stream): what the status stream costs is the difference


def reports_on_core_nats() -> None:
    """The benchmark's knob to measure what the status reports cost: each report published on core NATS
    under ``bench.status.<node>.<kind>`` (no stream stores it; the benchmark's observer still sees it)."""
    async def publish(self: Reports, kind: str, envelope: events.Envelope) -> None:
        await self.ctx.nc.publish(f"{CORE_REPORTS}.{topology.token(self.node)}.{kind}", events.encode(envelope))

    Reports.publish = publish  # type: ignore[method-assign]


def _dump_tasks() -> None:
    """SIGUSR2: every asyncio task's stack to stderr (where a stuck applier waits)."""
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


async def run(url: str, nodes: list[str], replicas: int, stagger: float, plan_feed: str = "feed",
              report_interval: float = 1.0, busy_report_interval: float = 1.0) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _dump_tasks)
    tasks = []
    for node in nodes:
        cfg = ApplierConfig(node=node, backend="memory", nats_url=url, nats_replicas=replicas, http_listen="",
                            healthz_bind_address="", drift_period=3600.0, log_level="warning",
                            plan_feed=plan_feed, report_interval=report_interval,
                            busy_report_interval=busy_report_interval)
        print(json.dumps({"node": node, "started": time.time()}), flush=True)
        tasks.append(asyncio.create_task(runtime.run_service(
            "applier", cfg, lambda ctx: apply_plan(ctx, MemoryKernel()), stop=asyncio.Event())))
        await asyncio.sleep(stagger)  # many appliers starting at once would measure the start-up storm
    await asyncio.gather(*tasks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--prefix", default="node-")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=3, help="stream replicas (as the cluster has)")
    parser.add_argument("--consumer", choices=sorted(CONSUMERS), default="r1-memory")
    parser.add_argument("--fetch-wait", type=float, default=0.0,
                        help="seconds each applier's fetch waits at the server (0: kipvs's own)")
    parser.add_argument("--acks", choices=["explicit", "none"], default="explicit",
                        help="none: consumers without acknowledgements (to measure what they cost)")
    parser.add_argument("--reports", choices=["stream", "core"], default="stream",
                        help="core: apply reports on core NATS, not into KIPVS_STATUS (to measure what they cost)")
    parser.add_argument("--plan-feed", choices=["feed", "consumer"], default="feed",
                        help="the appliers' plan input (kipvs applier --plan-feed)")
    parser.add_argument("--report-interval", type=float, default=1.0,
                        help="seconds between two apply reports of a node (kipvs applier --report-interval)")
    parser.add_argument("--busy-report-interval", type=float, default=1.0,
                        help="... under sustained churn (kipvs applier --busy-report-interval)")
    parser.add_argument("--stagger", type=float, default=0.02, help="seconds between two appliers' starts")
    args = parser.parse_args()
    use_consumer_design(args.consumer)
    if args.acks == "none":
        without_acks()
    if args.reports == "core":
        reports_on_core_nats()
    if args.fetch_wait:
        plan_consumer.FETCH_WAIT = args.fetch_wait
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    nodes = [f"{args.prefix}{i}" for i in range(args.first, args.first + args.count)]
    asyncio.run(run(args.nats_url, nodes, args.replicas, args.stagger, args.plan_feed, args.report_interval,
                    args.busy_report_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
