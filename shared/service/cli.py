"""The ``kipvs`` command: one entry point, a subcommand per service or tool.

Each subcommand lives with the code it runs; this module only wires them up, importing a service's
module when its subcommand is chosen so that ``kipvs plan`` does not pay for the watcher's imports.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from shared.messaging.embedded_nats import EmbeddedNats, EmbeddedNatsError, default_state_dir
from shared.security.nats_credentials import CredentialsError

from . import logs
from .config import ConfigError, StartupError

# name -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "nats": ("shared.service.cli", "run only the embedded NATS server (JetStream on loopback)"),
    "topology": ("shared.messaging.topology_apply", "declare the streams and consumers (the admin identity)"),
    "credentials": ("shared.security.credentials_command", "make the bus's CA, certificates, NKEYs and Secrets"),
}


def register(name: str, module: str, help: str) -> None:
    SUBCOMMANDS[name] = (module, help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kipvs nats``'s arguments."""
    parser.add_argument("--state-dir", default="",
                        help="where the server keeps its store (default: $KIPVS_STATE_DIR or ~/.local/state/kipvs)")
    parser.add_argument("--port", type=int, default=0,
                        help="loopback port (default: the state directory's own, 4222 the first time if free)")
    parser.add_argument("--stop", action="store_true",
                        help="stop the embedded server running for the state directory (started by any kipvs "
                             "service) and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    logs.setup("human", "info")
    log = logging.getLogger("kipvs.nats")

    async def serve() -> int:
        where = Path(args.state_dir) if args.state_dir else default_state_dir()
        if args.stop:
            pid = EmbeddedNats.stop_running(where)
            print(f"stopped the embedded NATS server of {where} (pid {pid})" if pid else
                  f"no embedded NATS server runs for {where}")
            return 0
        if (running := EmbeddedNats.running_in(where)) is not None:
            log.error("an embedded NATS server already runs for %s at %s", where, running.url)
            return 1
        server = EmbeddedNats(where)
        await server.start(port=args.port, stable=True)
        print(f"NATS with JetStream listening on {server.url} (store: {where / 'jetstream'}); Ctrl-C stops it",
              flush=True)
        print(f"TLS and an identity per role: CA, server certificate and NKEY seeds in {server.auth_dir} (owner "
              "only); kipvs services and tools find them there", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        assert server.process is not None
        waiter = asyncio.create_task(server.process.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            if server.process.returncode == 0:  # its graceful shutdown: SIGTERM from `kipvs nats --stop`
                log.info("the NATS server was stopped (kipvs nats --stop, or a SIGTERM to it)")
                return 0
            log.error("nats-server exited on its own with %s", server.process.returncode)
            return 1
        waiter.cancel()
        await server.stop()
        return 0

    try:
        return asyncio.run(serve())
    except EmbeddedNatsError as exc:
        log.error("%s", exc)
        return 1
    except CredentialsError as exc:  # a damaged credentials directory: what and where, not a traceback
        log.error("%s", exc)
        return 2


def version() -> str:
    """The installed distribution's version (its metadata, not a constant that could drift from it)."""
    from importlib import metadata

    try:
        return metadata.version("kipvs")
    except metadata.PackageNotFoundError:
        return "(unknown: kipvs is not installed as a distribution; pip install -e .)"


def _load(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.add_arguments, module.run


def _discover() -> None:
    """Services register their subcommands in <package>.commands (cheap modules, no heavy imports)."""
    for package in ("services.harness.simulator", "services.watcher", "services.planner", "services.applier",
                    "services.tools", "services.harness.demo",
                    "services.auth"):
        try:
            commands = importlib.import_module(f"{package}.commands")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.commands":
                raise
            continue
        for name, module, help in commands.COMMANDS:
            register(name, module, help)


def main(argv: list[str] | None = None) -> int:
    _discover()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kipvs",
                                     description="kipvs: an event-sourced IPVS service proxy for Kubernetes")
    parser.add_argument("-V", "--version", action="store_true", help="print kipvs's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help)
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)
        if args.version:
            print(f"kipvs {version()}")
            return 0
        parser.print_help()
        return 2
    name = argv[0]
    command_parser = argparse.ArgumentParser(prog=f"kipvs {name}", description=SUBCOMMANDS[name][1])
    add, run_command = _load(name)
    add(command_parser)
    args = command_parser.parse_args(argv[1:])
    try:
        return run_command(args)
    except (ConfigError, StartupError, CredentialsError) as exc:
        print(f"kipvs {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kipvs tap | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
