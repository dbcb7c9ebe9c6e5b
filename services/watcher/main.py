"""``kipvs watcher``: the Kubernetes API into the event log, exactly once, resuming after any failure."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec

from shared.contract import events
from shared.service import config, runtime
from shared.service.config import StartupError, describe
from shared.service.kube_client import api_client

from .event_log import EventLog, open_record_file, read_logged
from .list_watch import KindWatcher, WatchMetrics, WatchSettings, list_function

log = logging.getLogger("kipvs.watcher")


class WatcherConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    kubeconfig: Annotated[str, describe("kubeconfig file; empty: in-cluster config, else ~/.kube/config")] = ""
    kinds: Annotated[list[str], describe("kinds to watch (default: all)")] = msgspec.field(
        default_factory=lambda: list(events.KUBE_KINDS))
    record: Annotated[str, describe("also append every logged event to this file as watch-format JSON lines")] = ""
    list_chunk: Annotated[int, describe("objects per list request (limit/continue)"), msgspec.Meta(ge=1)] = 500
    watch_timeout: Annotated[int, describe("timeoutSeconds of each watch request"), msgspec.Meta(ge=1)] = 300
    read_timeout: Annotated[float, describe(
        "seconds without a byte (not even a bookmark) after which a watch is taken as dead"), msgspec.Meta(gt=0),
        config.SECONDS] = 90.0

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.kinds) - set(events.KUBE_KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known: {', '.join(events.KUBE_KINDS)}")


async def watch(ctx: runtime.ServiceContext) -> None:
    cfg = ctx.config
    assert isinstance(cfg, WatcherConfig)
    published = ctx.metrics.counter(
        "kipvs_watcher_events_published_total", "Kubernetes events appended to the log, by kind and watch action",
        labels={"kind": events.KUBE_KINDS, "action": ("ADDED", "MODIFIED", "DELETED")})
    latency = ctx.metrics.histogram("kipvs_watcher_publish_seconds", "time to append one event (ack included)")
    watch_metrics = WatchMetrics.declare(ctx.metrics)

    def on_published(kind: str) -> Callable[[str, float], None]:
        def count(action: str, seconds: float) -> None:
            published.labels(kind, action).inc()
            latency.observe(seconds)
        return count

    settings = WatchSettings(list_chunk=cfg.list_chunk, watch_timeout=cfg.watch_timeout,
                             read_timeout=cfg.read_timeout)
    record_file = open_record_file(cfg.record)
    api = await api_client(cfg.kubeconfig)
    try:
        watchers = []
        for kind in cfg.kinds:
            logged = await read_logged(ctx.js, kind)
            log.info("%s: the log knows %d objects (%d alive)", kind, len(logged),
                     sum(1 for o in logged.values() if o.alive))
            event_log = EventLog(ctx.js, kind, logged, record_file, on_published(kind),
                                 max_payload=lambda: ctx.nc.max_payload)
            watchers.append(KindWatcher(kind, list_function(api, kind), event_log, ctx.js, settings,
                                        watch_metrics, ctx.stop))
        tasks = [asyncio.create_task(w.run(), name=f"watch-{w.kind}") for w in watchers]
        ctx.set_not_ready("initial list not complete")
        listed = asyncio.gather(*(w.listed.wait() for w in watchers))
        stopping = asyncio.ensure_future(ctx.stop.wait())
        await asyncio.wait({listed, stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        if listed.done():
            ctx.set_ready()
        await asyncio.wait({stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        listed.cancel()
        for result in results:
            if isinstance(result, Exception):
                raise result
    finally:
        await api.close()
        if record_file is not None:
            record_file.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, WatcherConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(WatcherConfig, vars(args))
    if cfg.kubeconfig and not Path(cfg.kubeconfig).expanduser().is_file():  # before waiting on NATS
        raise StartupError(f"cannot load the kubeconfig {cfg.kubeconfig}: no such file")
    asyncio.run(runtime.run_service("watcher", cfg, watch))
    return 0
