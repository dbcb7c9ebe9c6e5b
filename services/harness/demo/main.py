"""``kipvs demo``: boot the QEMU guest (Debian's kernel) and run the demo's script in it (real IPVS in every node's
network namespace), printing its progress as it goes; where the guest cannot run, say why and run the
script here with the appliers on the memory kernel, clearly labelled.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from services.harness.guest import vm as guest
from shared.messaging.embedded_nats import default_state_dir
from shared.security import nats_credentials, pki

from . import run as script
from .network import BRIDGE_IP
from .run import LOG_BEGIN, LOG_END, kipvs_command

LOG_FILE = Path(tempfile.gettempdir()) / "kipvs-demo" / "log.jsonl"
GUEST_LOGS = LOG_FILE.parent / "guest-logs"  # the services' logs, when a step in the guest failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", "guest", "memory"), default="auto",
                        help="guest: real IPVS and nftables in a QEMU guest running Debian's kernel; memory: simulated "
                             "kernels on this host; auto: guest, else memory (saying why)")
    parser.add_argument("--keep", action="store_true", help="keep everything running after the steps; Ctrl-C stops")


def demo_credentials(*names: str) -> Path:
    """The guest demo's bus credentials, in the state directory: CA, server certificate for the guest's bridge
    and host link, role NKEYs. Made once; the tools use ``tools.nk`` and ``ca.pem`` from here."""
    where = default_state_dir() / "demo-credentials"
    wanted = (*pki.LOCAL_NAMES, BRIDGE_IP, *names)
    cert = where / nats_credentials.SERVER_CERT
    if cert.exists() and not set(wanted) <= set(pki.names_of(cert.read_bytes())):
        cert.unlink()  # another host link address: a new certificate from the same CA
    nats_credentials.ensure(where, wanted)
    return where


def run(args: argparse.Namespace) -> int:
    if args.backend == "memory":
        return _memory(args, "asked for with --backend memory")
    reason = guest.unavailable_reason()
    if reason is not None:
        if args.backend == "guest":
            print(f"kipvs demo: the QEMU guest cannot run: {reason}", file=sys.stderr)
            return 2
        return _memory(args, reason)
    print(f"kipvs demo: booting a QEMU guest running Debian's kernel (real IPVS and nftables; "
          f"{guest.accelerator().upper()}) ...", flush=True)
    return _in_guest(args)


def _in_guest(args: argparse.Namespace) -> int:
    """The demo's script in the QEMU guest, its console printed here and its log saved; a Ctrl-C asks the
    script to stop at whatever step, a second one (or SIGTERM, SIGHUP) kills the guest."""
    link = guest.HostLink()
    problem = link.create()
    if problem:
        print(f"kipvs demo: no link from this host into the guest ({problem}); the tools will read the saved log "
              "instead of the live one", flush=True)
    # The bus's credentials are made here, where the guest reads them (the host's root, read-only) and where the
    # tools on this host find them to follow the live log.
    credentials = demo_credentials(*([] if problem else [link.guest_address]))
    command = _guest_command(args, credentials, "" if problem else f"{link.guest_address}/{link.prefix}")
    console = _Console()
    share = Path(tempfile.mkdtemp(prefix="kipvs-guest-demo-"))  # the guest's uncached share (/run/kipvs)
    stopper = _Stopper(share)
    previous = {sig: signal.signal(sig, stopper.on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if not problem:
            link.configure_when_up()
        result = guest.run_in_guest(shlex.join(command), timeout=86400 if args.keep else 900, memory="1536M",
                                    on_line=console.line, tap=None if problem else link.name, share=share)
    except guest.GuestTimeout as exc:
        print(f"kipvs demo: {exc}", file=sys.stderr)
        return 1
    except guest.GuestUnavailable as exc:
        if args.backend == "guest":
            print(f"kipvs demo: {exc}", file=sys.stderr)
            return 2
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return _memory(args, str(exc))
    except KeyboardInterrupt:
        print("kipvs demo: the guest was killed", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        link.remove()
        keep_guest_logs(share / "logs", GUEST_LOGS)
        shutil.rmtree(share, ignore_errors=True)
    if console.saved:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        LOG_FILE.write_text("\n".join(console.saved) + "\n")
        _explore(LOG_FILE, len(console.saved))
    return 130 if stopper.asked and not args.keep else result.status


def _guest_command(args: argparse.Namespace, credentials: Path, host_link: str) -> list[str]:
    """The demo's script as the guest runs it (``host_link``: the guest's end of the link from the host,
    ADDRESS/PREFIX, "" for none)."""
    return [sys.executable, "-m", "services.harness.demo.run", "--backend", "netlink", "--workdir", "/run/tmp/demo",
            "--credentials", str(credentials),
            "--stop-file", f"{guest.SHARE_IN_GUEST}/stop", "--copy-logs-to", f"{guest.SHARE_IN_GUEST}/logs",
            "--save-log", "-", *(["--keep"] if args.keep else []),
            *(["--host-link", host_link] if host_link else [])]


class _Console:
    """The guest's console lines: printed, except the saved log between its markers, which is kept."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self._capturing = False

    def line(self, line: str) -> None:
        if line == LOG_BEGIN:
            self._capturing = True
        elif line == LOG_END:
            self._capturing = False
        elif self._capturing:
            self.saved.append(line)
        else:
            print(line, flush=True)


class _Stopper:
    """The signal handler while the guest runs: a first Ctrl-C asks the demo to stop cleanly (the stop file,
    seen at once on the guest's uncached ``share``); a second one, SIGTERM or SIGHUP kills the guest
    (KeyboardInterrupt, which run_in_guest answers so)."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.asked: list[int] = []

    def on_signal(self, signum: int, _frame: object) -> None:
        self.asked.append(signum)
        if len(self.asked) == 1 and signum == signal.SIGINT:
            (self.share / "stop").touch()
            print("\nkipvs demo: stopping (Ctrl-C again to kill the guest at once) ...", flush=True)
            return
        raise KeyboardInterrupt


def keep_guest_logs(copied: Path, to: Path) -> None:
    """The services' logs the guest copied into its share when a step failed (gone with the guest
    otherwise), kept on this host in ``to`` and named in one line."""
    if not copied.is_dir() or not any(copied.iterdir()):
        return
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(copied, to)
    print(f"kipvs demo: the services' logs from the guest are kept in {to}", flush=True)


def _explore(log: Path, records: int) -> None:
    print(f"\nthe demo's log ({records} records) is saved in {log}; every tool reads it:")
    for example in ("tap --log {}", "why --log {} --node node-b 10.96.0.10:80",
                    "history --log {} EndpointSlice/default/web-x1", "replay --log {}",
                    "plan --log {} --node node-c --at 20"):
        print(f"  {kipvs_command()} {example.format(log)}")


def _memory(args: argparse.Namespace, reason: str) -> int:
    print("kipvs demo: SIMULATED KERNELS. The appliers run with --backend memory: nothing is programmed and no "
          f"packet flows, because: {reason}", flush=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    status = script.main(["--backend", "memory", "--save-log", str(LOG_FILE), *(["--keep"] if args.keep else [])])
    if LOG_FILE.exists():
        _explore(LOG_FILE, len(LOG_FILE.read_text().splitlines()))
    return status
