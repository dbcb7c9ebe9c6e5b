"""The bus's credentials: made once in a directory, turned into nats-server's configuration and into the
options every kipvs client connects with.

A credentials directory (mode 0700, every file 0600) holds::

    ca.pem  ca.key            the local CA (cryptography; see shared.security.pki)
    server.pem  server.key    nats-server's certificate, signed by the CA
    <role>.nk                 one NKEY seed per static role (admin, watcher, planner, tools, auth)
    issuer.nk                 the account NKEY seed that signs the auth callout's user JWTs
    nats-server.conf          the server's configuration (accounts, users, permissions, TLS, callout)

NKEYS are Ed25519 key pairs in NATS's encoding (the ``nkeys`` package): the server holds only public
keys, a client proves its identity by signing the server's nonce with its seed (nats-py ``nkeys_seed=``
reads the file; the seed is never on a command line). Upstream: docs.nats.io "NKeys" and "Auth Callout".
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from . import nats_permissions as perms
from . import pki

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
ISSUER = "issuer.nk"
SERVER_CONFIG = "nats-server.conf"
AUTH_DIR = "nats-auth"  # under an embedded server's state directory


class CredentialsError(Exception):
    """A credential file is missing, unreadable or not what it should be; the message says which and why."""


def seed_file(directory: Path, role: str) -> Path:
    return directory / f"{role}.nk"


def _new_seed(prefix: int) -> bytes:
    # nkeys 0.2 has no generator of its own: a seed is 32 random bytes in NATS's seed encoding.
    return nkeys.encode_seed(os.urandom(32), prefix)


def public_key(seed: bytes) -> str:
    """The public key (``U...`` for a user, ``A...`` for an account) of an NKEY seed."""
    return nkeys.from_seed(seed).public_key.decode()


def read_seed(path: Path) -> bytes:
    """An NKEY seed from its file; CredentialsError naming the file when it cannot be used, or when others
    may read it (:func:`check_private`)."""
    try:
        check_private(path)
        seed = path.read_bytes().strip()
        nkeys.from_seed(seed)
    except OSError as exc:
        raise CredentialsError(f"cannot read the NKEY seed {path}: {exc.strerror}") from None
    except (nkeys.ErrInvalidSeed, nkeys.ErrInvalidPrefixByte, ValueError, TypeError):
        raise CredentialsError(f"{path} does not hold an NKEY seed (a line starting with 'SU' or 'SA')") from None
    return seed


def check_private(path: Path) -> None:
    """Refuse a private key others may read, as OpenSSH does (``sshkey_perm_ok``): no group or other bits on a
    file this user owns; on a file someone else owns (a Kubernetes Secret mounted 0440 root:fsGroup, the
    group being the pod's own), no bits for others. CredentialsError, one sentence; OSError when it cannot
    be looked at."""
    st = path.stat()
    mode = st.st_mode & 0o777
    if mode & 0o007 or (st.st_uid == os.getuid() and mode & 0o077):
        raise CredentialsError(f"{path} is readable by others (mode {mode:04o}): it is a private key; "
                               f"'chmod 600 {path}' (kipvs refuses it, as ssh does)")


def ensure(directory: Path, server_names: tuple[str, ...] | list[str] = pki.LOCAL_NAMES) -> bool:
    """Create what is missing in ``directory`` (CA, server certificate, role seeds, issuer seed); keep
    what is there (rotation is deleting a file and running this again). True when something was made.
    OSError when the directory cannot be written."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.stat().st_mode & 0o777 != 0o700:  # (a complete directory may be on a read-only mount)
        directory.chmod(0o700)
    made = False
    if not (directory / CA_CERT).exists() or not (directory / CA_KEY).exists():
        ca = pki.make_ca()
        pki.write_private(directory / CA_KEY, ca.key_pem)
        pki.write_private(directory / CA_CERT, ca.cert_pem)
        (directory / SERVER_CERT).unlink(missing_ok=True)  # signed by the old CA
        made = True
    if not (directory / SERVER_CERT).exists() or not (directory / SERVER_KEY).exists():
        ca = pki.Issued((directory / CA_CERT).read_bytes(), (directory / CA_KEY).read_bytes())
        server = pki.issue_server(ca, server_names)
        pki.write_private(directory / SERVER_KEY, server.key_pem)
        pki.write_private(directory / SERVER_CERT, server.cert_pem)
        made = True
    for role in perms.STATIC_ROLES:
        if not seed_file(directory, role).exists():
            pki.write_private(seed_file(directory, role), _new_seed(nkeys.PREFIX_BYTE_USER) + b"\n")
            made = True
    if not (directory / ISSUER).exists():
        pki.write_private(directory / ISSUER, _new_seed(nkeys.PREFIX_BYTE_ACCOUNT) + b"\n")
        made = True
    return made


LOCAL_APPLIER_PREFIX = "applier."  # applier.<node>.nk: a node's static identity where there is no Kubernetes


def local_applier_seed(directory: Path, node: str) -> Path:
    return directory / f"{LOCAL_APPLIER_PREFIX}{node}.nk"


def local_appliers(directory: Path) -> list[str]:
    """The nodes with a static applier identity in ``directory`` (the embedded server's, one machine)."""
    return sorted(p.name[len(LOCAL_APPLIER_PREFIX):-3] for p in directory.glob(f"{LOCAL_APPLIER_PREFIX}*.nk"))


def ensure_local_applier(directory: Path, node: str) -> bool:
    """Give ``node``'s applier a static NKEY identity (with that node's permissions only, as the callout
    would); True when it is new (the server's configuration must then be written and reloaded)."""
    path = local_applier_seed(directory, node)
    if len(path.name) > 255:  # NAME_MAX: the file holds the node's name
        raise CredentialsError(f"node name {node[:40]}... ({len(node)} characters) is too long for a static "
                               "identity on the embedded server (at most 246): use the auth callout")
    if path.exists():
        return False
    pki.write_private(path, _new_seed(nkeys.PREFIX_BYTE_USER) + b"\n")
    return True


def server_config(directory: Path, store_dir: Path, host: str = "127.0.0.1", port: int = 4222,
                  server_name: str = "kipvs-embedded", callout: bool = True) -> dict[str, Any]:
    """nats-server's configuration for the credentials in ``directory``: TLS with the server certificate,
    account KIPVS (JetStream) with one NKEY user per static role and its permissions (and per local
    applier, see :func:`ensure_local_applier`), and (``callout``) the auth callout that gives appliers
    their per-node identity. Nobody connects without an identity: there is no ``no_auth_user``."""
    config: dict[str, Any] = {
        "server_name": server_name,
        "host": host,
        "port": port,
        "jetstream": {"store_dir": str(store_dir)},
        "tls": {"cert_file": str(directory / SERVER_CERT), "key_file": str(directory / SERVER_KEY),
                "timeout": 5},
    }
    config.update(auth_blocks(directory, callout))
    return config


def auth_blocks(directory: Path, callout: bool = True) -> dict[str, Any]:
    """The ``accounts`` and ``authorization`` blocks of the server's configuration: public keys and
    permissions only (no secret), from the seeds in ``directory``."""
    users = []
    for role in perms.STATIC_ROLES:
        users.append({"nkey": public_key(read_seed(seed_file(directory, role))),
                      "permissions": perms.static_role(role).server_config()})
    for node in local_appliers(directory):
        users.append({"nkey": public_key(read_seed(local_applier_seed(directory, node))),
                      "permissions": perms.applier(node).server_config()})
    blocks: dict[str, Any] = {"accounts": {perms.ACCOUNT: {"jetstream": "enabled", "users": users}}}
    if callout:
        blocks["authorization"] = {"timeout": 10, "auth_callout": {  # time for a TokenReview
            "issuer": public_key(read_seed(directory / ISSUER)),
            "account": perms.ACCOUNT,
            # Every static role bypasses the callout: they are checked by the server against the users above.
            "auth_users": [u["nkey"] for u in users],
        }}
    return blocks


def auth_conf(directory: Path, callout: bool = True) -> str:
    """:func:`auth_blocks` as a file nats-server's configuration can ``include`` (its syntax takes JSON values)."""
    return "".join(f"{key}: {json.dumps(value, indent=2)}\n" for key, value in auth_blocks(directory, callout).items())


def write_server_config(directory: Path, store_dir: Path, path: Path | None = None, **kwargs: Any) -> Path:
    """Write :func:`server_config` as ``nats-server.conf`` (JSON, which nats-server's parser reads), in
    ``directory`` unless ``path`` says where."""
    path = path or directory / SERVER_CONFIG
    pki.write_private(path, json.dumps(server_config(directory, store_dir, **kwargs), indent=2).encode())
    return path


@dataclass(frozen=True)
class ClientAuth:
    """How one kipvs client proves who it is and checks whom it talks to.

    ``nkey_file``: an NKEY seed (static roles); ``token_file``: a Kubernetes ServiceAccount token (an
    applier; re-read at every connect, since projected tokens rotate); ``ca_file``: the CA the server's
    certificate must chain to (TLS with the hostname checked); ``inbox_prefix``: where replies to this
    client go (its permissions allow no other inbox)."""

    nkey_file: str = ""
    token_file: str = ""
    ca_file: str = ""
    inbox_prefix: str = ""
    tls_hostname: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.nkey_file or self.token_file or self.ca_file)

    def describe(self) -> str:
        """Which identity, for log lines: file names only, never their contents."""
        who = (f"NKEY {self.nkey_file}" if self.nkey_file else
               f"token file {self.token_file}" if self.token_file else "no identity")
        return who + (f", TLS with CA {self.ca_file}" if self.ca_file else "")

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context trusting only ``ca_file`` (hostname checked); CredentialsError when it
        cannot be read."""
        if not self.ca_file:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise CredentialsError(f"cannot use the CA file {self.ca_file}: {reason}") from None

    def token(self) -> Callable[[], str]:
        path = Path(self.token_file)

        def read() -> str:
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"cannot read the token file {path}: {exc.strerror}") from None
        return read

    def check(self) -> None:
        """Fail early, in one sentence, for files that are missing or wrong."""
        if self.nkey_file:
            read_seed(Path(self.nkey_file))
        if self.token_file:
            self.token()()
        self.tls_context()

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {}
        if self.nkey_file:
            options["nkeys_seed"] = self.nkey_file
        if self.token_file:
            options["token"] = self.token()
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
            if self.tls_hostname:
                options["tls_hostname"] = self.tls_hostname
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return options


def embedded_client(directory: Path, role: str, inbox_identity: str = "") -> ClientAuth:
    """The identity of ``role`` from an embedded server's credentials directory."""
    return ClientAuth(nkey_file=str(seed_file(directory, role)), ca_file=str(directory / CA_CERT),
                      inbox_prefix=perms.inbox_prefix(inbox_identity or role))


def for_service(identity: str, role: str, nkey_file: str = "", token_file: str = "", ca_file: str = "",
                embedded_dir: Path | None = None, tls_hostname: str = "") -> ClientAuth | None:
    """A service's identity: the files given, else (on the embedded server) its role's files in the
    embedded credentials directory, else None (an open server, as in most tests); an identity file given
    without a CA file on the embedded server trusts that server's CA. ``identity`` names its
    reply inbox (``watcher``, ``planner``, ``applier-<node>``); ``tls_hostname``, when given with a CA
    file, is the name the server's certificate is checked against (the URL's host otherwise)."""
    if nkey_file or token_file or ca_file:
        if not ca_file and embedded_dir is not None and (embedded_dir / CA_CERT).exists():
            ca_file = str(embedded_dir / CA_CERT)  # an identity given on the embedded bus: its server's CA
        return ClientAuth(nkey_file=nkey_file, token_file=token_file, ca_file=ca_file,
                          inbox_prefix=perms.inbox_prefix(identity) if nkey_file or token_file else "",
                          tls_hostname=tls_hostname)
    if embedded_dir is not None and seed_file(embedded_dir, role).exists():
        return embedded_client(embedded_dir, role, identity)
    if embedded_dir is not None and seed_file(embedded_dir, "admin").exists():
        if role in perms.STATIC_ROLES:
            # Least privilege: a role whose own identity is missing never borrows the admin's.
            raise CredentialsError(f"{seed_file(embedded_dir, role)} is missing: the embedded credentials have no "
                                   f"{role} identity (restore it, or remove {embedded_dir} to make them all anew)")
        # A program with no role of its own on one machine's embedded bus (whose owner holds every seed).
        return embedded_client(embedded_dir, "admin")
    return None
