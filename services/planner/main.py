"""``kipvs planner``: the planner's NATS shell around the pure core, wired and run.

A single planner is active from the start (``active.py``); with ``--leader-elect`` it alternates standby and
active (``failover.py``). Its settings are ``service_config.py``; what it publishes leaves through the
outbox (``publisher.py``); every replay of the log is ``log_replay.py``.
"""

from __future__ import annotations

import argparse
import asyncio

from shared.contract import topology
from shared.service import config, runtime

from . import failover
from .active import plan
from .service_config import PlannerServiceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, PlannerServiceConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(PlannerServiceConfig, vars(args))
    service = failover.run if cfg.leader_elect else plan
    asyncio.run(runtime.run_service("planner", cfg, service, consumers=[topology.planner_consumer()]))
    return 0
