"""Regenerate the golden files: the events from playing the small-cluster scenario in the simulator,
and the deltas the planner computes from them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from services.harness.simulator import scenario
from services.harness.simulator.server import Simulator
from services.planner.core import Planner, PlannerConfig
from services.planner.log_replay import read_events
from shared.contract import events

HERE = Path(__file__).parent
SCENARIO = HERE.parent.parent / "services" / "harness" / "simulator" / "scenarios" / "small-cluster.yaml"
EVENTS = HERE / "small-cluster.events.jsonl"
DELTAS = HERE / "small-cluster.deltas.jsonl"


def deltas_for(lines: list[str]) -> list[bytes]:
    planner = Planner(PlannerConfig())
    out: list[bytes] = []
    for seq, env in enumerate(read_events(lines, EVENTS.name), 1):
        out.extend(events.to_json(d) for d in planner.handle(env, seq))
    return out


async def _events() -> list[str]:
    sim = Simulator()
    sc = scenario.load(SCENARIO)
    await scenario.load_objects(sim, sc)
    await scenario.play(sim, [scenario.Step(0.0, s.apply, s.delete) for s in sc.steps])
    return [json.dumps({"type": c.type, "object": c.object}, sort_keys=True) for c in sim.store.history]


def main() -> None:
    lines = asyncio.run(_events())
    EVENTS.write_text("".join(line + "\n" for line in lines))
    DELTAS.write_bytes(b"".join(d + b"\n" for d in deltas_for(lines)))
    print(f"wrote {EVENTS} ({len(lines)} events) and {DELTAS}")


if __name__ == "__main__":
    main()
