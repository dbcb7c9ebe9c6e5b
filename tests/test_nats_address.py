"""Issue 21: kipvs reaches NATS by address, with no DNS name and no Service ClusterIP (a new node after
kube-proxy is gone; deploy/kubernetes/05-bootstrap.yaml). The client then checks the server's certificate
against --nats-tls-server-name / KIPVS_NATS_TLS_SERVER_NAME, a name the certificate carries, not against the
address it dialled. Real nats-server with kipvs's TLS (tests/secure_nats.py); the guest test
tests/guest/kernel_bootstrap.py runs the whole new-node case in a real kernel."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from shared.messaging import bus
from shared.security import nats_credentials
from shared.service import config, runtime
from tests.secure_nats import SecureNats

NAME = "nats.kipvs-system.svc"
KIPVS = str(Path(sys.executable).with_name("kipvs"))


@pytest.fixture
def server(tmp_path: Path):
    # The certificate names the Service only: neither 127.0.0.1 nor any address a client dials.
    nats_credentials.ensure(tmp_path / "creds", ("localhost", NAME))
    secure = SecureNats(tmp_path)
    secure.start()
    yield secure
    secure.stop()


def _settings(server: SecureNats, **environ: str) -> config.CommonConfig:
    return config.load(config.CommonConfig, environ={
        "NATS_URL": f"nats://127.0.0.1:{server.port}", "KIPVS_NATS_CA_FILE": str(server.dir / "ca.pem"),
        "KIPVS_NATS_NKEY_FILE": str(nats_credentials.seed_file(server.dir, "planner")), **environ})


async def test_a_service_connects_by_address_checking_the_certificate_by_name(server: SecureNats) -> None:
    cfg = _settings(server, KIPVS_NATS_TLS_SERVER_NAME=NAME)
    auth = await runtime.client_auth("planner", cfg)
    assert auth is not None
    nc = await asyncio.wait_for(bus.connect(cfg.nats_url, "kipvs-planner", asyncio.Event(), auth=auth), 30)
    try:
        assert nc.is_connected and nc.connected_url is not None and nc.connected_url.hostname == "127.0.0.1"
    finally:
        await nc.close()


async def test_without_the_name_the_address_is_checked_and_refused(server: SecureNats) -> None:
    auth = await runtime.client_auth("planner", _settings(server))
    assert auth is not None
    with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.1"):
        await nats.connect(f"nats://127.0.0.1:{server.port}", allow_reconnect=False, connect_timeout=5,
                           **auth.connect_options())


def test_topology_apply_takes_the_name_too(server: SecureNats) -> None:
    # A process of its own, bounded: without the name it would retry the refused certificate forever.
    done = subprocess.run([KIPVS, "topology", "apply", "--nats-url", f"nats://127.0.0.1:{server.port}",
                           "--nats-tls-server-name", NAME, "--nats-ca-file", str(server.dir / "ca.pem"),
                           "--nats-nkey-file", str(nats_credentials.seed_file(server.dir, "admin"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("url", ["nats://192.0.2.11:4222,nats://192.0.2.12:4222", "nats://10.0.0.5:4222,203.0.113.9",
                                 "tls://[2001:db8::1]:4222"])
def test_the_shipped_placeholders_are_refused_in_one_line(url: str) -> None:
    """05-bootstrap.yaml ships documentation addresses (RFC 5737): a ConfigMap not filled in is named as such
    at start (exit 2, one line), not retried forever against an address that reaches nothing."""
    with pytest.raises(config.ConfigError, match=r"documentation address .*ConfigMap kipvs-bootstrap, key nats-url"):
        config.load(config.CommonConfig, environ={"NATS_URL": url})
    for command in (["planner", "--http-listen", ""], ["topology", "apply"]):
        done = subprocess.run([KIPVS, *command, "--nats-url", url], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "kipvs-bootstrap" in done.stderr, \
            (command, done.stderr)


def test_real_addresses_and_names_pass() -> None:
    for url in ("nats://10.0.0.11:4222,nats://10.0.0.12:4222", "nats://nats.kipvs-system.svc:4222", "",
                "127.0.0.1:4222"):
        assert config.load(config.CommonConfig, environ={"NATS_URL": url}).nats_url == url
