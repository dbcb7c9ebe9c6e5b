"""A real nats-server with kipvs's generated security: TLS from the local CA, NKEY role users with their
permissions and (optionally) the auth callout, all from shared.security.nats_credentials."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nats

from shared.messaging.embedded_nats import free_loopback_port, server_binary
from shared.security import nats_credentials as creds
from tests.helpers import wait_port


class SecureNats:
    def __init__(self, root: Path, callout: bool = False) -> None:
        self.dir = root / "creds"
        self.store = root / "store"
        self.port = free_loopback_port()
        self.callout = callout
        self.proc: subprocess.Popen | None = None
        self.log = root / "nats-server.log"
        creds.ensure(self.dir)

    @property
    def url(self) -> str:
        # "localhost": the certificate's names are checked against the URL's host
        return f"tls://localhost:{self.port}"

    def start(self) -> None:
        conf = creds.write_server_config(self.dir, self.store, host="127.0.0.1", port=self.port,
                                         callout=self.callout)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([server_binary(), "-c", str(conf)], stdout=out, stderr=out)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def identity(self, role: str, inbox: str = "") -> creds.ClientAuth:
        return creds.embedded_client(self.dir, role, inbox)

    async def connect(self, role: str, **kwargs) -> nats.NATS:
        options = self.identity(role).connect_options()
        options.update(kwargs)
        return await nats.connect(self.url, allow_reconnect=False, connect_timeout=3, **options)
