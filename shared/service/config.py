"""Service configuration: flags over environment over an optional file over defaults, validated.

Each service declares its settings once, as a msgspec Struct whose fields carry their help text
(``Annotated[..., Meta(description=...)]``). From that one declaration come the command-line flags
(``--drift-period``), the environment variables (``KIPVS_DRIFT_PERIOD``) and the file keys
(``drift_period``, in YAML or JSON). Every error names the setting, where it came from and what was wrong.

kube-proxy's configuration is taken too (shared/service/kube_proxy_config.py, docs/kube-proxy.md): ``--config`` may
name a ``KubeProxyConfiguration`` file, every service accepts kube-proxy's flag spellings (``--ipvs-sync-period
30s``, ``--hostname-override``, ``-v 4``), a setting held in seconds takes Go's duration syntax (``15m``),
a boolean flag ``--flag=true|false`` and a list flag comma-separated values. What kipvs cannot honour, or
this service does not, is said in warning lines once the settings are valid, never silently dropped.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

from . import kube_proxy_config, logs
from .go_duration import parse_duration

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


class Seconds:
    """Marks a setting held in seconds (``Annotated[float, describe(...), SECONDS]``): besides a number it
    takes Go's duration syntax (``300ms``, ``15m``, ``1h2m3s``), as kube-proxy's flags and file do; an
    ``int`` setting takes whole seconds (truncated as kube-proxy does, refused when that leaves 0)."""


SECONDS = Seconds()
KUBE_PROXY_DEST = "kube-proxy:"  # argparse dest prefix of kube-proxy's flags a service has no own flag for
log = logging.getLogger("kipvs.config")


class CommonConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings every service has."""

    nats_url: Annotated[str, describe(
        "NATS server URL; empty: use (or start) the embedded server in --state-dir")] = ""
    state_dir: Annotated[str, describe("directory for the embedded NATS server and local state")] = ""
    nats_replicas: Annotated[int, describe("JetStream stream replicas (3 on a clustered NATS)"),
                             msgspec.Meta(ge=1, le=5)] = 1
    http_listen: Annotated[str, describe(
        "host:port for /metrics, /healthz, /livez and /readyz (kube-proxy's --metrics-bind-address, which "
        "sets it too); port 0: any free port, logged; empty disables it")] = "127.0.0.1:0"
    healthz_stale_after: Annotated[float, describe(
        "seconds an input may wait unhandled before /healthz reports 503 (kube-proxy's healthz meaning)"),
        msgspec.Meta(gt=0), SECONDS] = 60.0
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


def listen_on(value: str) -> tuple[str | None, int]:
    """A checked ``host:port`` setting as (host, port) for a listening socket. An empty host (``:10249``) is
    every interface, IPv4 and IPv6, as Go's ``net.Listen`` reads it in kube-proxy's bind addresses: None,
    which aiohttp binds on every address family."""
    host, _, port = value.rpartition(":")
    return host or None, int(port)


def url_host(host: str | None) -> str:
    """A listening host as a URL writes it (RFC 3986): an IPv6 address in brackets (``[::1]``), every
    interface (None, from ``:PORT``) as ``*``."""
    if not host:
        return "*"
    return f"[{host}]" if ":" in host else host


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


class GoBool(argparse.Action):
    """A boolean flag as Go's pflag takes it (``--masquerade-all``, ``--masquerade-all=false``), and
    ``--no-masquerade-all``: kube-proxy's manifests write the first two."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs="?", metavar="true|false")
        super().__init__([*option_strings, "--no-" + option_strings[0][2:]], dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        negative = bool(option_string and option_string.startswith("--no-"))
        if negative and values is not None:
            parser.error(f"{option_string} takes no value")
        try:
            value = not negative if values is None else kube_proxy_config.boolean(values, str(option_string))
        except ValueError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, value)


def add_flags(parser: argparse.ArgumentParser, cls: type[msgspec.Struct]) -> None:
    """One flag per setting. Flags default to None so that 'not given' is distinguishable; the help shows
    each setting's real default, its allowed values (Literal types) and its environment variable. Then
    kube-proxy's flags this service has no flag of its own for (_add_kube_proxy_flags)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with settings (keys as below, "
                        "snake_case), or kube-proxy's KubeProxyConfiguration file (docs/kube-proxy.md)")
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
        if _is_seconds(cls, f.name):
            notes.append("or a duration: 30s, 15m, 1h2m3s")
        notes.append(f"env {ENV_PREFIX}{f.name.upper()}" + (f" or {STANDARD_ENV[f.name]}"
                                                             if f.name in STANDARD_ENV else ""))
        helptext = f"{helptext} ({'; '.join(notes)})".replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=GoBool, default=None, help=helptext)
        elif typing.get_origin(kind) in (list, tuple):
            parser.add_argument(flag, dest=f.name, action="append", default=None,
                                help=helptext + "; repeatable, or comma-separated")
        else:
            # Allowed values in the usage line too; they are checked with the other sources' (one message).
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=helptext)
    _add_kube_proxy_flags(parser, cls)


def _add_kube_proxy_flags(parser: argparse.ArgumentParser, cls: type[msgspec.Struct]) -> None:
    """kube-proxy's spellings (cmd/kube-proxy/app/options.go) of the settings, for the flags the service
    has no own flag by that name for; those with no meaning in kipvs are accepted, warned, not listed."""
    own = {f.name.replace("_", "-") for f in msgspec.structs.fields(cls)}
    group = parser.add_argument_group(
        "kube-proxy's flags", "kube-proxy's spellings of the settings above (docs/kube-proxy.md). Every kube-proxy "
        "flag kipvs knows is accepted; one this service cannot honour (e.g. --ipvs-scheduler on an applier: the "
        "scheduler is the planner's) is said in one line at start, one with no meaning in kipvs too")
    for flag, name in kube_proxy_config.FLAGS.items():
        if flag in own:
            continue
        setting = kube_proxy_config.FIELDS.get(name)
        # Listed only where honoured: the others are accepted so that one kube-proxy command line or file
        # serves every service, and said at start.
        honoured = setting is not None and set(setting.sets) <= {f.name for f in msgspec.structs.fields(cls)}
        helptext = f"kube-proxy's {name}" if honoured else argparse.SUPPRESS
        names = ["-v", "--v"] if flag == "v" else ["--" + flag]
        dest = KUBE_PROXY_DEST + flag
        metavar = "N" if flag == "v" else flag.upper().replace("-", "_")
        if flag in kube_proxy_config.BOOL_FLAGS:
            group.add_argument(*names, dest=dest, nargs="?", const="true", default=None, metavar="true|false",
                               help=helptext)
        else:
            group.add_argument(*names, dest=dest, default=None, metavar=metavar, help=helptext)


def _is_seconds(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls, include_extras=True)
    return any(meta is SECONDS for meta in getattr(hints.get(name), "__metadata__", ()))


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


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        language = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigError(f"config file {path} is not valid {language}: {' '.join(str(exc).split())}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(doc).__name__}")
    return doc


def _from_file(path: str) -> kube_proxy_config.Translation:
    """The file's settings: kipvs's own keys, or a KubeProxyConfiguration's translated."""
    doc = _read_file(path)
    if kube_proxy_config.is_kube_proxy(doc):
        try:
            return kube_proxy_config.from_file(doc, path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    found = kube_proxy_config.Translation()
    found.values = {str(k).replace("-", "_"): (v, f"config file {path}") for k, v in doc.items()}
    return found


def _from_kube_proxy_flags(flags: dict[str, Any]) -> kube_proxy_config.Translation:
    given = {k.removeprefix(KUBE_PROXY_DEST): flags.pop(k) for k in list(flags) if k.startswith(KUBE_PROXY_DEST)}
    try:
        return kube_proxy_config.from_flags(given)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _not_here(known: set[str], merged: dict[str, tuple[Any, str]],
              translations: list[kube_proxy_config.Translation], proxy: bool) -> list[str]:
    """kube-proxy settings this service has no setting for (or, ``proxy`` False, only the proxy takes from
    a file): dropped from ``merged``, said in one line per service that does honour them (and one per
    setting with a note on how kipvs differs)."""
    by_owner: dict[str, list[str]] = {}
    lines = []
    for found in translations:
        for key, (source, setting) in found.owners.items():
            here = key in known and (proxy or key not in found.proxy_only)
            if here or merged.get(key, (None, ""))[1] != source:
                continue
            del merged[key]
            if setting.note:
                lines.append(f"{source}: not honoured by this service: {setting.note}")
            else:
                by_owner.setdefault(setting.owner, []).append(source)
    lines += [f"not honoured by this service, only by {owner}: {', '.join(names)}" for owner, names in by_owner.items()]
    return lines


def _coerce(cls: type[msgspec.Struct], merged: dict[str, tuple[Any, str]]) -> None:
    """Go durations in seconds settings; comma-separated values in list flags."""
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    for key, (value, source) in list(merged.items()):
        kind = _base_type(cls, key)
        if source.startswith("flag ") and typing.get_origin(kind) in (list, tuple) and isinstance(value, list):
            merged[key] = ([p.strip() for v in value for p in str(v).split(",") if p.strip()], source)
        elif _is_seconds(cls, key) and isinstance(value, str) and not _is_number(value):
            where = f"{key.replace('_', '-')} (from {source})"
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"invalid configuration: {where}: {exc}") from None
            if fields[key].type is int or kind is int:
                if 0 < seconds < 1:
                    raise ConfigError(f"invalid configuration: {where}: {value!r} is under a second, the "
                                      "kernel's resolution")
                seconds = int(seconds)
            merged[key] = (seconds, source)


def _names(message: str, key: str) -> bool:
    """Whether a validation message is about setting ``key``: msgspec's type errors give its path
    (``$.key``); a check in ``__post_init__`` starts with the setting's name, so the flag or variable
    it came from (``--metrics-bind-address`` for http_listen) can be named too."""
    return (f"$.{key}`" in message or f"$.{key}[" in message
            or message.startswith((f"{key} ", f"{key}:")))


BOUND = re.compile(r"Expected `\w+` (?P<op>[<>]=?) (?P<bound>\S+) - at `\$\.(?P<key>\w+)`")


def _plainly(message: str, merged: dict[str, tuple[Any, str]]) -> str:
    """msgspec's bound message (``Expected `float` > 0.0 - at `$.drift_period```) in the operator's words:
    the setting as given, the bound, and the value it had."""
    bound = BOUND.fullmatch(message)
    if bound is None or bound["key"] not in merged:
        return message
    value, source = merged[bound["key"]]
    return f"{_as_typed(source, bound['key'])} must be {bound['op']} {bound['bound']}, not {value}"


def _as_typed(source: str, key: str) -> str:
    """The setting's name as the operator wrote it: the flag, the variable, the KubeProxyConfiguration
    field (``ipvs.syncPeriod in config file F``), else kipvs's own key."""
    if source.startswith(("flag ", "environment variable ")):
        return source.rsplit(" ", 1)[-1]
    if " in config file " in source:
        return source.split(" in config file ", 1)[0]
    return key


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load(cls: type[T], flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> T:
    """Merge defaults < file < environment < flags and validate the result; then log, in one line each,
    what of kube-proxy's settings is ignored (docs/kube-proxy.md). ConfigError: one line naming the setting
    and where it came from."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    config_file = flags.pop("config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
    from_file = _from_file(config_file) if config_file else kube_proxy_config.Translation()
    from_flags = _from_kube_proxy_flags(flags)
    merged: dict[str, tuple[Any, str]] = dict(from_file.values)
    merged.update(_from_env(cls, environ))
    merged.update(from_flags.values)
    merged.update({k: (v, "flag --" + k.replace("_", "-")) for k, v in flags.items() if v is not None})
    known = {f.name for f in msgspec.structs.fields(cls)}
    warnings = _not_here(known, merged, [from_file, from_flags], bool(getattr(cls, "KUBE_PROXY", False)))
    warnings += [line for line in (from_file.warning(), from_flags.warning()) if line]
    for key, (_, source) in merged.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} in {source}; known settings: {', '.join(sorted(known))}")
    _coerce(cls, merged)
    try:
        loaded = msgspec.convert({k: v for k, (v, _) in merged.items()}, cls, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = next((f" (from {source})" for key, (_, source) in merged.items() if _names(message, key)), "")
        raise ConfigError(f"invalid configuration{where}: {_plainly(message, merged)}") from None
    if warnings:
        logs.setup(getattr(loaded, "log_format", "human"), getattr(loaded, "log_level", "info"))
        for line in warnings:
            log.warning("%s", line)
    return loaded
