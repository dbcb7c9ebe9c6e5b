"""``kipvs replay``: re-run the planner over the recorded Kubernetes log and diff what it produces against
the plan deltas that were published. Exit 0: identical; 1: a difference (each one printed); 2: unusable
input. Because the planner is deterministic, this gates planner upgrades: record a log once, replay it
with the new build in CI.

    kipvs replay                                    # the whole log of the running system
    kipvs replay --from 120 --to 480                # compare the deltas caused by KUBE #120..#480
    kipvs tap --stream kube,plan --since 1 --no-follow --json > log.jsonl
    kipvs replay --log log.jsonl                    # the same, from a recorded file (no NATS needed)

The planner always starts from the first record (its state is the whole history); ``--from``/``--to``
choose which caused deltas are compared. Use the scheduler the planner ran with (``--scheduler``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus
from shared.tools import records
from shared.tools.log_client import (
    Entry,
    RecordedLog,
    ToolError,
    add_nats_arguments,
    open_log,
    plan_source,
    read_all,
    run_tool,
)

from . import log_replay
from .core import Planner, PlannerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_nats_arguments(parser)
    parser.add_argument("--from", dest="first", type=int, default=1, metavar="SEQ",
                        help="first KUBE sequence whose deltas are compared")
    parser.add_argument("--to", dest="last", type=int, default=0, metavar="SEQ",
                        help="last KUBE sequence replayed and compared (default: the end of the log)")
    parser.add_argument("--scheduler", default="rr", help="the planner's cluster default scheduler")


def compare(kube: list[Entry], published: list[Entry], config: PlannerConfig, first: int = 1,
            last: int = 0) -> tuple[int, list[str]]:
    """Replay ``kube`` (in order) and compare the deltas caused by KUBE #first..#last with ``published``.
    Returns (deltas compared, differences). Pure."""
    logged = ((entry.seq, entry.envelope) for entry in kube if not last or entry.seq <= last)
    produced = {env.id: env for seq, deltas in log_replay.replay(Planner(config), logged) if seq >= first
                for env in deltas}
    in_range = {}
    for entry in published:
        env = entry.envelope
        if env is None or not isinstance(env.record, events.PlanDelta):
            continue
        if env.record.source_seq >= first and (not last or env.record.source_seq <= last):
            in_range[env.id] = (entry, env)
    problems = []
    for delta_id, (entry, env) in in_range.items():
        mine = produced.get(delta_id)
        if mine is None:
            problems.append(f"published but not produced by this build: {records.one_line(entry)}")
        elif mine != env:
            problems.append(f"differs: {delta_id}\n  published: {records.one_line(entry)}\n"
                            f"  replayed:  {records.one_line(Entry(entry.stream, entry.seq, entry.subject, mine))}")
    for delta_id in sorted(set(produced) - set(in_range)):
        env = produced[delta_id]
        problems.append(f"produced but never published: {delta_id}: "
                        f"{records.one_line(Entry(topology.PLAN_STREAM, 0, '', env))}")
    return len(in_range), problems


async def replay(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        config = PlannerConfig(default_scheduler=args.scheduler)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    async with open_log(args) as js:
        try:
            if not isinstance(js, RecordedLog):  # a recorded log (--log FILE) has what it has
                await js.stream_info(topology.KUBE_STREAM)
        except NotFoundError:
            raise ToolError(f"there is no {topology.KUBE_STREAM} stream on this NATS: nothing to replay (run "
                            "'kipvs topology apply', or start the services)") from None
        kube = await read_all(js, bus.LogReader(topology.KUBE_STREAM), upto=args.last)
        plan = await read_all(js, plan_source(args))
    if not kube:
        raise ToolError("the Kubernetes log is empty: nothing to replay")
    compared, problems = compare(kube, plan, config, args.first, args.last)
    span = f"KUBE #{args.first}..#{args.last or kube[-1].seq}"
    for problem in problems:
        print(problem, file=out)
    if problems:
        print(f"kipvs replay: {len(problems)} differences over {span} ({compared} published deltas)", file=out)
        return 1
    print(f"kipvs replay: identical: {compared} published deltas over {span} replayed identically", file=out)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_tool("replay", lambda: replay(args))
