"""``kipvs status``'s view of the stages before the nodes: is the planner where the Kubernetes log is?

The planner's position is its durable consumer's ack floor on KIPVS_KUBE (every record up to it is
planned, including those that planned nothing: a count of deltas would call a planner behind after a
no-op change). The log's head is KIPVS_KUBE's last sequence. A gap is normal for as long as a record is in
flight, so the check is on time: the oldest record not yet planned, by the time the server stored it
(JetStream metadata: no producer's clock), must not be older than ``max_lag`` seconds. A head below the
planner's position means the stream was replaced (a wiped store) and the planner has not rebuilt from it.

The plan's side (each node against the plan stream) is :func:`delta_times` plus ``status.collect``: the
server's time of every shared delta stored within the last ``max_lag`` seconds, so a node's lag is
judged by how long ago the first delta it lacks was published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import NotFoundError

from shared.contract import events, topology
from shared.messaging import bus


@dataclass
class Stage:
    """One stage's position against its input's head: ``behind`` records, the oldest unhandled one stored
    ``oldest_age_s`` seconds ago (None when none waits or it is unknown)."""

    stage: str
    head: int
    position: int | None  # None: the stage's consumer does not exist
    behind: int = 0
    oldest_age_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def planner_verdict(head: int, position: int | None, oldest_stored_ns: int | None, now_ns: int,
                    max_lag: float) -> Stage:
    """Pure: the planner stage from the log's last sequence, the planner's ack floor (None: no consumer)
    and the server time of the oldest record after that floor (None: none is stored)."""
    stage = Stage("planner", head, position)
    if position is None:
        stage.problems.append(f"the planner's consumer on {topology.KUBE_STREAM} does not exist (a wiped or new "
                              "store, not yet declared again): nothing is planned")
        return stage
    if head < position:
        stage.problems.append(f"{topology.KUBE_STREAM} ends at sequence {head}, below the planner's position "
                              f"{position}: the stream was replaced and the planner has not rebuilt from it")
        return stage
    stage.behind = head - position
    if stage.behind and oldest_stored_ns is not None:
        stage.oldest_age_s = round(max(now_ns - oldest_stored_ns, 0) / 1e9, 1)
        if stage.oldest_age_s > max_lag:
            stage.problems.append(f"{stage.behind} log records not planned, the oldest stored "
                                  f"{stage.oldest_age_s:.0f}s ago (limit {max_lag:.0f}s)")
    return stage


def check_programmed(stage: Stage, plan_nodes: set[str], reported: bool) -> None:
    """A plan with no Node and no node that ever reported: nothing is programmed anywhere, whatever the
    positions say (a new store, or a wiped one before the watcher has logged the Nodes again)."""
    if not plan_nodes and not reported:
        stage.problems.append("the plan holds no Node and no node has reported: nothing is programmed (a new or "
                              "wiped store, or no watcher has logged the Nodes yet)")


def _ns(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1e9)


async def read_planner_stage(js: Any, now_ns: int, max_lag: float) -> Stage:
    """The planner stage, read live: KIPVS_KUBE's info, the planner consumer's ack floor and the record
    after it. nats-py's errors when the bus fails; NotFoundError when KIPVS_KUBE does not exist."""
    head = (await js.stream_info(topology.KUBE_STREAM)).state.last_seq
    try:
        position = (await js.consumer_info(topology.KUBE_STREAM, topology.PLANNER_CONSUMER)).ack_floor.stream_seq
    except NotFoundError:
        return planner_verdict(head, None, None, now_ns, max_lag)
    oldest = None
    if head > position:
        try:
            msg = await js.get_msg(topology.KUBE_STREAM, seq=position + 1, subject="kipvs.kube.>", next=True)
            oldest = _ns(msg.time)
        except NotFoundError:
            oldest = None  # removed meanwhile (limits): the next check sees the new state
    return planner_verdict(head, position, oldest, now_ns, max_lag)


async def delta_times(js: Any, plan: bus.LogReader, since_ns: int) -> dict[int, int]:
    """Shared delta seq -> the server time it was stored (its first part's, for a delta in parts), for the
    deltas stored since ``since_ns``, read with ``plan`` (``log_client.plan_source``)."""
    out: dict[int, int] = {}
    start = datetime.fromtimestamp(since_ns / 1e9, UTC)
    async for msg in bus.read_stream(js, plan, topology.PLAN_ALL_SUBJECT, start_time=start):
        try:
            record = events.decode(msg.data or b"").record
        except events.ContractError:
            continue
        if isinstance(record, events.PlanDelta | events.PlanDeltaChunk):
            stored = _ns(msg.metadata.timestamp)
            if stored is not None:
                out.setdefault(record.seq, stored)
    return out


def render_stage(stage: Stage) -> str:
    """``at log seq 12 of KIPVS_KUBE (last seq 14), 2 records behind (oldest 1s ago): ok``"""
    where = "no consumer" if stage.position is None else f"at log seq {stage.position}"
    lag = "" if not stage.behind else f", {stage.behind} records behind" + (
        f" (oldest {stage.oldest_age_s:.0f}s ago)" if stage.oldest_age_s is not None else "")
    verdict = "ok" if stage.ok else "; ".join(stage.problems)
    return f"{where} of {topology.KUBE_STREAM} (last seq {stage.head}){lag}: {verdict}"
