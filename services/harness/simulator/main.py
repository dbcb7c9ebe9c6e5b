"""``kipvs simulate``: serve a simulated Kubernetes API on loopback and write a kubeconfig for it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from shared.service import logs

from . import scenario as scenarios
from .server import Simulator

log = logging.getLogger("kipvs.simulator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", help="YAML scenario (objects and steps) or a manifest file to load")
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: any free port)")
    parser.add_argument("--kubeconfig-out", default="kipvs-simulator.kubeconfig",
                        help="where to write a kubeconfig pointing at the simulator")
    parser.add_argument("--bookmark-interval", type=float, default=60.0, help="seconds between watch bookmarks")


def run(args: argparse.Namespace) -> int:
    logs.setup("human", "info")
    try:
        scenario = scenarios.load(args.scenario) if args.scenario else scenarios.Scenario()
    except (OSError, scenarios.ScenarioError) as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(_serve(args, scenario))


async def _serve(args: argparse.Namespace, scenario: scenarios.Scenario) -> int:
    sim = Simulator(bookmark_interval=args.bookmark_interval)
    await scenarios.load_objects(sim, scenario)
    await sim.start(port=args.port)
    Path(args.kubeconfig_out).write_text(sim.kubeconfig())  # noqa: ASYNC240 - once, tiny, at start
    print(f"Kubernetes API simulator at {sim.url} with {len(sim.store.objects)} objects; "
          f"kubeconfig: {args.kubeconfig_out}; Ctrl-C stops it", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    player = asyncio.create_task(scenarios.play(sim, scenario.steps))
    await stop.wait()
    player.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await player
    await sim.stop()
    return 0
