"""``kipvs credentials``: make the bus's credentials for a cluster, and the Kubernetes Secrets that carry them.

Writes (or completes) a credentials directory (see :mod:`shared.security.nats_credentials`) whose server
certificate names the nats Services of ``--namespace``, an ``auth.conf`` for nats-server's configuration
(accounts, role users and permissions, the auth callout: public keys only) and, with ``--secrets FILE``, a
manifest of the Secrets ``deploy/kubernetes`` mounts, one per role so that each pod gets only its own seed.
Nothing secret is printed. Run it again to complete a directory; delete a file first to rotate it.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import yaml

from shared.contract import topology
from shared.security import pki
from shared.service.config import StartupError

from . import nats_credentials as creds
from .nats_permissions import STATIC_ROLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="the credentials directory (made 0700; files 0600)")
    parser.add_argument("--namespace", default="kipvs-system", help="namespace of the nats Services")
    parser.add_argument("--name", action="append", default=[],
                        help="another DNS name or address the server certificate must carry; repeatable")
    parser.add_argument("--secrets", default="", metavar="FILE",
                        help="also write the Kubernetes Secrets manifest (kubectl apply -f FILE; keep it private)")
    parser.add_argument("--local-applier", action="append", default=[], metavar="NODE",
                        help="a static identity for NODE's applier (no Kubernetes to vouch for it: compose); "
                             "repeatable")
    parser.add_argument("--no-callout", action="store_true",
                        help="no auth callout (every applier has a static identity, see --local-applier)")
    parser.add_argument("--server-config", default="", metavar="FILE",
                        help="also write a whole nats-server configuration using this directory's files (compose)")
    parser.add_argument("--store-dir", default="/data", help="JetStream store of --server-config")
    parser.add_argument("--http-port", type=int, default=8222, help="monitoring port of --server-config")


def service_names(namespace: str) -> list[str]:
    """What clients and routes call the NATS servers in ``deploy/kubernetes/20-nats.yaml``."""
    return [f"nats.{namespace}.svc", f"nats.{namespace}.svc.cluster.local", f"nats.{namespace}", "nats",
            f"*.nats-cluster.{namespace}.svc", f"*.nats-cluster.{namespace}.svc.cluster.local"]


def secrets(directory: Path, namespace: str) -> list[dict]:
    def secret(name: str, files: dict[str, Path]) -> dict:
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/part-of": "kipvs"}},
                "data": {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}}

    out = [
        secret("kipvs-nats-tls", {"ca.pem": directory / creds.CA_CERT, "server.pem": directory / creds.SERVER_CERT,
                                  "server.key": directory / creds.SERVER_KEY}),
        secret("kipvs-nats-server-auth", {"auth.conf": directory / "auth.conf"}),
        secret("kipvs-nats-ca", {"ca.pem": directory / creds.CA_CERT}),
        secret("kipvs-nats-issuer", {"issuer.nk": directory / creds.ISSUER}),
    ]
    out += [secret(f"kipvs-nats-{role}", {f"{role}.nk": creds.seed_file(directory, role)}) for role in STATIC_ROLES]
    return out


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    names = [*pki.LOCAL_NAMES, *service_names(args.namespace), *args.name]
    try:
        topology.node_tokens(args.local_applier, "--local-applier")
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        creds.ensure(directory, names)
        for node in args.local_applier:
            creds.ensure_local_applier(directory, node)
        pki.write_private(directory / "auth.conf", creds.auth_conf(directory, callout=not args.no_callout).encode())
        if args.server_config:
            config = creds.server_config(directory, Path(args.store_dir), host="0.0.0.0", port=4222,
                                         server_name="kipvs", callout=not args.no_callout)
            config["http_port"] = args.http_port
            pki.write_private(Path(args.server_config), json.dumps(config, indent=2).encode())
        if args.secrets:
            pki.write_private(Path(args.secrets), yaml.safe_dump_all(secrets(directory, args.namespace)).encode())
    except OSError as exc:
        raise StartupError(f"cannot write the credentials in {exc.filename or directory}: {exc.strerror}") from None
    print(f"credentials in {directory} (server certificate for {', '.join(names[3:])})"
          + (f"; Secrets manifest in {args.secrets}" if args.secrets else ""))
    return 0
