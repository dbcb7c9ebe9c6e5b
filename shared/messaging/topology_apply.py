"""``kipvs topology apply``: declare the streams and durable consumers, with the admin identity.

On a bus with identities, the services may only use the topology: this command (a Job in the manifests,
a step of the embedded server's start and of the demo) creates or updates every stream, the object
store, the planner's durable consumer and, for the nodes named, what their appliers take the plan from.
On the plan feed (``--plan-feed feed``, the appliers' default: KIPVS_PLAN republishes to ``kipvs.feed.>``,
services/applier/plan_feed.py) a node has no durable consumer at all, so ``--node`` declares none and
deletes one an older kipvs left (its applier would delete it at start anyway; until then it costs the
servers a consumer per node, issue 27). With ``--plan-feed consumer`` (appliers run with the same flag)
each named node's durable is declared ahead of its applier, as before. Idempotent: run it after every
upgrade. Exit 0 when the topology is in place, 2 for a user's mistake, 1 when the server refused it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from pathlib import Path

from nats.js.errors import NotFoundError

from shared.contract import topology
from shared.messaging import bus
from shared.security import nats_credentials
from shared.service import logs
from shared.service.config import StartupError, check_nats_url

from .embedded_nats import EmbeddedNats, default_state_dir

log = logging.getLogger("kipvs.topology")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["apply"], help="apply: create or update the streams and consumers")
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", ""),
                        help="NATS URL (env NATS_URL; default: the embedded server running for --state-dir, with "
                             "its admin identity)")
    parser.add_argument("--state-dir", default="", help="the embedded server's state dir (default: "
                                                        "$KIPVS_STATE_DIR or ~/.local/state/kipvs)")
    parser.add_argument("--nats-nkey-file", default=os.environ.get("KIPVS_NATS_NKEY_FILE", ""),
                        help="the admin identity's NKEY seed file (env KIPVS_NATS_NKEY_FILE); empty: an open server")
    parser.add_argument("--nats-ca-file", default=os.environ.get("KIPVS_NATS_CA_FILE", ""),
                        help="CA the server's certificate must chain to (env KIPVS_NATS_CA_FILE)")
    parser.add_argument("--nats-tls-server-name", default=os.environ.get("KIPVS_NATS_TLS_SERVER_NAME", ""),
                        help="name the server's certificate is checked against instead of the URL's host "
                             "(env KIPVS_NATS_TLS_SERVER_NAME)")
    parser.add_argument("--nats-replicas", type=int, default=int(os.environ.get("KIPVS_NATS_REPLICAS", "1")),
                        help="stream replicas (3 on a clustered NATS; env KIPVS_NATS_REPLICAS)")
    parser.add_argument("--node", action="append", default=[],
                        help="a node whose applier runs with the same --plan-feed: on the feed, delete the durable "
                             "consumer an older kipvs left for it; with 'consumer', declare its durable ahead of its "
                             "applier (which replaces it from its own position at start); repeatable")
    parser.add_argument("--plan-feed", choices=["feed", "consumer"],
                        default=os.environ.get("KIPVS_PLAN_FEED", "feed"),
                        help="what the appliers take the plan from, as their own --plan-feed (env KIPVS_PLAN_FEED; "
                             "default feed: no durable consumer per node)")


async def apply(url: str, auth: nats_credentials.ClientAuth | None, replicas: int = 1,
                nodes: list[str] | tuple[str, ...] = (), plan_feed: str = "feed") -> list[str]:
    """Connect as ``auth`` (the admin) and declare everything; the nodes' durables declared (``plan_feed``
    "consumer") or deleted (on the feed: those an older kipvs left), by node. TopologyError when the server
    refuses."""
    stop = asyncio.Event()
    nc = await bus.connect(url, "kipvs-topology", stop, auth=auth)
    try:
        per_node = [topology.applier_consumer(n) for n in nodes] if plan_feed == "consumer" else []
        js = await bus.setup(nc, replicas, [topology.planner_consumer(), *per_node])
        if plan_feed == "consumer":
            return list(nodes)
        deleted = []
        for node in nodes:
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(topology.PLAN_STREAM, topology.applier_durable(node))
                deleted.append(node)
        return deleted
    finally:
        await nc.close()


def _embedded(args: argparse.Namespace) -> tuple[str, nats_credentials.ClientAuth | None]:
    """(URL, admin identity) of the embedded server running for ``--state-dir`` (KIPVS_STATE_DIR, as every
    other command); StartupError when none runs there."""
    where = Path(args.state_dir) if args.state_dir else default_state_dir()
    running = EmbeddedNats.running_in(where)
    if running is None:
        raise StartupError(f"give the NATS URL (--nats-url or NATS_URL): no embedded server runs for {where}")
    return running.client_url, running.identity("admin")


def run(args: argparse.Namespace) -> int:
    logs.setup("human", "info")
    url, auth = args.nats_url, None
    if not url:
        url, auth = _embedded(args)
    try:
        check_nats_url(url)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if args.nats_nkey_file or args.nats_ca_file:
        auth = nats_credentials.ClientAuth(nkey_file=args.nats_nkey_file, ca_file=args.nats_ca_file,
                                           inbox_prefix="_INBOX_admin" if args.nats_nkey_file else "",
                                           tls_hostname=args.nats_tls_server_name)
    try:
        if auth is not None:
            auth.check()
    except nats_credentials.CredentialsError as exc:
        raise StartupError(str(exc)) from None
    try:
        topology.node_tokens(args.node, "--node")
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        touched = asyncio.run(apply(url, auth, args.nats_replicas, args.node, args.plan_feed))
    except topology.TopologyError as exc:
        log.error("%s", exc)
        return 1
    if args.plan_feed == "consumer":
        nodes = f" and {len(touched)} applier consumer(s)" if touched else ""
    else:
        nodes = "; the nodes take the plan feed (no applier consumer)" + (
            f"; deleted the durable an older kipvs left for {', '.join(touched)}" if touched else "")
    log.info("topology in place: %d streams, the snapshot, lease and claims buckets, the planner's consumer%s",
             len(topology.streams()), nodes)
    return 0
