"""Scenario files: a cluster to load and a script of changes to play against the simulator.

A scenario is YAML (or JSON)::

    objects:            # Kubernetes manifests, created in order
      - {apiVersion: v1, kind: Node, metadata: {name: node-a}, ...}
    steps:              # played after the objects, in order
      - {after: 1.5, apply: {<manifest>}}                      # create or replace
      - {after: 0.5, delete: {kind: Pod, namespace: default, name: web-1}}

A plain multi-document manifest file (``---`` separated) is a scenario with objects and no steps.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .server import Simulator
from .store import BY_KIND

log = logging.getLogger("kipvs.simulator")


class ScenarioError(Exception):
    pass


@dataclass
class Step:
    after: float
    apply: dict[str, Any] | None = None
    delete: dict[str, str] | None = None


@dataclass
class Scenario:
    objects: list[dict[str, Any]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def _check_manifest(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ScenarioError(f"{where}: a manifest must be a mapping, not {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in BY_KIND:
        raise ScenarioError(f"{where}: kind {kind!r} is not served (served: {', '.join(sorted(BY_KIND))})")
    if not (obj.get("metadata") or {}).get("name"):
        raise ScenarioError(f"{where}: {kind} has no metadata.name")
    return obj


def load(path: str | Path) -> Scenario:
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    if len(docs) == 1 and isinstance(docs[0], dict) and ("objects" in docs[0] or "steps" in docs[0]):
        doc = docs[0]
        unknown = set(doc) - {"objects", "steps"}
        if unknown:
            raise ScenarioError(f"{path}: unknown keys {sorted(unknown)} (a scenario has objects and steps)")
        objects = [_check_manifest(o, f"{path}: objects[{i}]") for i, o in enumerate(doc.get("objects") or [])]
        steps = []
        for i, raw in enumerate(doc.get("steps") or []):
            where = f"{path}: steps[{i}]"
            if not isinstance(raw, dict) or ("apply" in raw) == ("delete" in raw):
                raise ScenarioError(f"{where}: a step has exactly one of apply or delete")
            after = raw.get("after", 0)
            if not isinstance(after, (int, float)) or after < 0:
                raise ScenarioError(f"{where}: after must be a number of seconds >= 0")
            if "apply" in raw:
                steps.append(Step(float(after), apply=_check_manifest(raw["apply"], where + ".apply")))
            else:
                target = raw["delete"]
                if not isinstance(target, dict) or target.get("kind") not in BY_KIND or not target.get("name"):
                    raise ScenarioError(f"{where}.delete: needs kind (one of {sorted(BY_KIND)}) and name")
                steps.append(Step(float(after), delete={"kind": target["kind"], "name": target["name"],
                                                        "namespace": target.get("namespace", "")}))
        return Scenario(objects, steps)
    return Scenario([_check_manifest(d, f"{path}: document {i}") for i, d in enumerate(docs)], [])


async def load_objects(sim: Simulator, scenario: Scenario) -> None:
    for obj in scenario.objects:
        await sim.apply(obj)


async def play(sim: Simulator, steps: list[Step]) -> None:
    for step in steps:
        await asyncio.sleep(step.after)
        if step.apply is not None:
            obj = await sim.apply(step.apply)
            log.info("applied %s %s", obj["kind"], obj["metadata"]["name"])
        elif step.delete is not None:
            d = step.delete
            resource = BY_KIND[d["kind"]]
            namespace = (d["namespace"] or "default") if resource.namespaced else ""
            await sim.delete(d["kind"], namespace, d["name"])
            log.info("deleted %s %s", d["kind"], d["name"])
