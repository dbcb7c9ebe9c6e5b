"""Service configuration: flags over environment over an optional file over defaults, validated.

Each service declares its settings once, as a msgspec Struct whose fields carry their help text
(``Annotated[..., Meta(description=...)]``). From that one declaration come the command-line flags
(``--drift-period``), the environment variables (``KIPVS_DRIFT_PERIOD``) and the file keys
(``drift_period``, in YAML or JSON). Every error names the setting, where it came from and what was wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

ENV_PREFIX = "KIPVS_"
T = TypeVar("T", bound=msgspec.Struct)

# Well-known variables honoured under their standard names as well as KIPVS_*.
STANDARD_ENV = {"nats_url": "NATS_URL", "kubeconfig": "KUBECONFIG"}


class StartupError(Exception):
    """A problem a user can fix found while starting (an unusable state directory, an unreadable
    kubeconfig, a port in use): ``kipvs`` prints it as one sentence and exits 2, no traceback."""


class ConfigError(Exception):
    pass


def describe(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class CommonConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings every service has."""

    nats_url: Annotated[str, describe(
        "NATS server URL; empty: use (or start) the embedded server in --state-dir")] = ""
    state_dir: Annotated[str, describe("directory for the embedded NATS server and local state")] = ""
    nats_replicas: Annotated[int, describe("JetStream stream replicas (3 on a clustered NATS)"),
                             msgspec.Meta(ge=1, le=5)] = 1
    http_listen: Annotated[str, describe(
        "host:port for /healthz, /readyz and /metrics; empty disables it")] = "127.0.0.1:0"
    healthz_stale_after: Annotated[float, describe(
        "seconds an input may wait unhandled before /healthz reports 503 (kube-proxy's healthz meaning)"),
        msgspec.Meta(gt=0)] = 60.0
    nats_nkey_file: Annotated[str, describe(
        "file holding this service's NKEY seed (its role's identity on the bus); empty: the embedded "
        "server's, when it has credentials")] = ""
    nats_token_file: Annotated[str, describe(
        "file holding a Kubernetes ServiceAccount token the auth service verifies (appliers: a projected "
        "token, re-read at every connect)")] = ""
    nats_ca_file: Annotated[str, describe(
        "CA certificate (PEM) the NATS server's certificate must chain to: TLS, hostname checked")] = ""
    nats_tls_server_name: Annotated[str, describe(
        "the name the NATS server's certificate is checked against instead of the URL's host (kubeconfig's "
        "tls-server-name): lets --nats-url list the servers by address, with no DNS name and no Service "
        "ClusterIP on the way (deploy/kubernetes: nats.kipvs-system.svc)")] = ""
    log_format: Annotated[Literal["human", "json"], describe("log line format")] = "human"
    log_level: Annotated[Literal["debug", "info", "warning", "error"], describe("log level")] = "info"

    def __post_init__(self) -> None:
        check_listen("http_listen", self.http_listen)
        check_nats_url(self.nats_url)


def check_listen(name: str, value: str) -> None:
    """A host:port setting (empty allowed: off); ValueError naming the setting otherwise."""
    if value:
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{name} must be host:port with a port 0-65535, got {value!r}")


# Addresses reserved for documentation (RFC 5737, RFC 3849): deploy/kubernetes/05-bootstrap.yaml ships
# them as placeholders, so a server among them is a ConfigMap not filled in, never a real server.
DOCUMENTATION_NETS = tuple(ipaddress.ip_network(net) for net in
                           ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


def check_nats_url(value: str) -> None:
    """ValueError, naming the setting, when a server of a ``nats://a:4222,nats://b:4222`` list is a
    documentation address: without it the service would only retry an address that reaches nothing."""
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            host = urlsplit(part if "://" in part else f"nats://{part}").hostname or ""
            address = ipaddress.ip_address(host)
        except ValueError:
            continue  # a name, or a malformed URL nats-py reports when it is dialled
        if any(address in net for net in DOCUMENTATION_NETS):
            raise ValueError(f"nats_url holds {host}, a documentation address (a placeholder): give the NATS "
                             "servers' own addresses (deploy/kubernetes: ConfigMap kipvs-bootstrap, key nats-url)")


def _field_help(cls: type, name: str) -> str:
    hints = typing.get_type_hints(cls, include_extras=True)
    for meta in getattr(hints.get(name), "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return ""


def _base_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    return hint


def _default_text(f: msgspec.structs.FieldInfo) -> str:
    """A setting's default as a person reads it in ``--help``; "" when it has none (required)."""
    if f.default is not msgspec.NODEFAULT:
        value = f.default
    elif f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value) if value != "" else "empty"


def add_flags(parser: argparse.ArgumentParser, cls: type[msgspec.Struct]) -> None:
    """One flag per setting. Flags default to None so that 'not given' is distinguishable; the help shows
    each setting's real default, its allowed values (Literal types) and its environment variable."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with settings (keys as below, snake_case)")
    for f in msgspec.structs.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(cls, f.name)
        helptext = _field_help(cls, f.name)
        notes = []
        default = _default_text(f)
        if default and "default" not in helptext:  # a description may already say it in words
            notes.append(f"default: {default}")
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
        if choices:
            notes.append(f"one of: {', '.join(map(str, choices))}")
        notes.append(f"env {ENV_PREFIX}{f.name.upper()}" + (f" or {STANDARD_ENV[f.name]}"
                                                             if f.name in STANDARD_ENV else ""))
        helptext = f"{helptext} ({'; '.join(notes)})".replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif typing.get_origin(kind) in (list, tuple):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=helptext + "; repeatable")
        else:
            # Allowed values in the usage line too; they are checked with the other sources' (one message).
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=helptext)


def _from_env(cls: type[msgspec.Struct], environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for f in msgspec.structs.fields(cls):
        kind = _base_type(cls, f.name)
        for var in (f"{ENV_PREFIX}{f.name.upper()}", STANDARD_ENV.get(f.name)):
            if var and var in environ:
                raw: Any = environ[var]
                if typing.get_origin(kind) in (list, tuple):
                    raw = [item for item in raw.split(",") if item]
                found[f.name] = (raw, f"environment variable {var}")
                break
    return found


def _from_file(path: str) -> dict[str, tuple[Any, str]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        language = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigError(f"config file {path} is not valid {language}: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(doc).__name__}")
    return {str(k).replace("-", "_"): (v, f"config file {path}") for k, v in doc.items()}


def load(cls: type[T], flags: Mapping[str, Any] | None = None,
                            environ: Mapping[str, str] | None = None) -> T:
    """Merge defaults < file < environment < flags and validate the result."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    config_file = flags.pop("config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
    merged: dict[str, tuple[Any, str]] = {}
    if config_file:
        merged.update(_from_file(config_file))
    merged.update(_from_env(cls, environ))
    merged.update({k: (v, "flag --" + k.replace("_", "-")) for k, v in flags.items() if v is not None})
    known = {f.name for f in msgspec.structs.fields(cls)}
    for key, (_, source) in merged.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} in {source}; known settings: {', '.join(sorted(known))}")
    try:
        return msgspec.convert({k: v for k, (v, _) in merged.items()}, cls, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = ""
        for key, (_, source) in merged.items():
            if f"$.{key}`" in message or f"$.{key}[" in message:
                where = f" (from {source})"
        raise ConfigError(f"invalid configuration{where}: {message}") from None
