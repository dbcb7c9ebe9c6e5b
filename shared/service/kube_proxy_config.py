"""kube-proxy's configuration in kipvs's terms: a ``KubeProxyConfiguration`` file and kube-proxy's flags.

Pure: a KubeProxyConfiguration document (already parsed from YAML or JSON) or a kube-proxy flag's value
becomes kipvs settings (shared/service/config.py merges them with every other source). Followed:
kubernetes staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go (``KubeProxyConfiguration`` and its
``KubeProxyIPVSConfiguration``, ``KubeProxyIPTablesConfiguration``, ``KubeProxyConntrackConfiguration``
field names) and cmd/kube-proxy/app/options.go (the flag names, ``AddFlags``). docs/kube-proxy.md has the
table for people.

- A field with a kipvs meaning becomes the kipvs setting (``ipvs.tcpTimeout: 15m`` -> ``ipvs_tcp_timeout
  = 900``); a service without that setting says so in one line (``Translation.elsewhere``), it does not
  fail: one kube-proxy file may be handed to every kipvs service.
- A field set to its zero value ("", 0, false, null, ``0s``, {}) is unset, as kube-proxy's defaulting
  reads it (kubeadm writes every field, most of them zero).
- A field set to something else with no meaning in kipvs, and a field v1alpha1 does not have (kube-proxy
  decodes leniently too: it logs the strict-decoding error and goes on), are listed in one warning line,
  never dropped silently.
- ``mode`` other than ``ipvs`` (or unset), a wrong ``apiVersion`` / ``kind`` and a value of the wrong
  shape are errors (ValueError, one line naming the field).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import sloppy
from .go_duration import parse_duration

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
# Nested v1alpha1 structs read field by field; every other mapping (featureGates, logging.options) is a value.
SECTIONS = frozenset({"ipvs", "iptables", "nftables", "winkernel", "conntrack", "detectLocal", "clientConnection",
                      "logging"})
SCHEDULER_NOTE = ("the IPVS scheduler is cluster-wide in kipvs: the planner's --scheduler (kube-proxy's "
                  "--ipvs-scheduler there), or per Service with the annotation kipvs.io/scheduler")


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def boolean(value: Any, where: str) -> bool:
    """A YAML boolean, or Go's strconv.ParseBool spellings from a flag (1, t, true, TRUE, 0, f, false...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if isinstance(value, str) and value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"{where} must be true or false, got {value!r}")


def seconds(value: Any, where: str) -> float:
    """A ``metav1.Duration`` (Go syntax: ``30s``, ``15m``, ``1h2m3s``) as seconds."""
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a duration string such as 30s or 15m, got {value!r}")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def whole_seconds(value: Any, where: str) -> int:
    """A duration the kernel keeps in whole seconds (the IPVS timeouts): truncated as kube-proxy's
    ``int(d.Seconds())``; ValueError when that leaves 0 from a duration above 0 (it would mean "keep the
    kernel's value", not what was asked)."""
    got = seconds(value, where)
    if 0 < got < 1:
        raise ValueError(f"{where} {value!r} is under a second, the kernel's resolution")
    return int(got)


def cidrs(value: Any, where: str) -> list[str]:
    """A list of CIDRs, or one comma-separated string of them (a flag; kube-proxy's dual-stack clusterCIDR),
    each in its canonical form. Read as kube-proxy validates and reads them, with ``ParseCIDRSloppy``
    (pkg/proxy/apis/config/validation ``validateIPVSExcludeCIDRs``, ``validateKubeProxyNodePortAddress``,
    ``validateDualStackCIDRStrings``): leading zeros are decimal (``10.096.0.0/16`` is ``10.96.0.0/16``),
    ``::ffff:a.b.c.d/120`` is ``a.b.c.d/24``, host bits are masked; a bare address is no CIDR."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{where} must be a list of CIDRs, got {value!r}")
    out = []
    for item in items:
        parsed = sloppy.parse_cidr(item.strip())
        if parsed is None:
            raise ValueError(f"{where}: {item!r} is not a CIDR (such as 10.0.0.0/8 or fd00::/64)")
        out.append(parsed[0])
    return out


def count(value: Any, where: str) -> int:
    """A whole number 0 or above (an int32 of kube-proxy's), also from a flag's text."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a whole number 0 or above, got {value!r}")
    return value


def bind_address(default_port: int) -> Callable[[Any, str], str]:
    """kube-proxy's ``healthzBindAddress`` / ``metricsBindAddress`` as kipvs's host:port: an address without a
    port gets kube-proxy's default one (pkg/proxy/util ``AppendPortIfNeeded``, applied by its defaulting),
    and ``[v6]:port`` loses its brackets (kipvs takes the host as everything before the last colon)."""
    def read(value: Any, where: str) -> str:
        address = text(value, where)
        host, sep, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]") and sep:
            return f"{host[1:-1]}:{port}"
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return address  # host:port already, or malformed: the setting's own check says which
        return f"{address}:{default_port}"
    return read


def verbosity(value: Any, where: str) -> str:
    """klog's -v level as a kipvs log level: 4 and above is debug (Kubernetes' logging conventions: V(4) is
    debug, V(2) the usual default), below is info."""
    if isinstance(value, str) and value.lstrip("=").isdigit():
        value = int(value.lstrip("="))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a verbosity 0 or above, got {value!r}")
    return "debug" if value >= 4 else "info"


@dataclass(frozen=True)
class Setting:
    """Where one kube-proxy field or flag goes: ``read(value, where)`` gives the kipvs settings it sets
    (ValueError with a one-line reason); ``owner``: the kipvs service that honours them."""

    read: Callable[[Any, str], dict[str, Any]]
    owner: str = "the applier (on each node)"
    note: str = ""  # how kipvs differs, said when a service without the setting is given it
    sets: tuple[str, ...] = ()  # the kipvs settings ``read`` may set (none: a check only)
    # From a file, only the proxy (the applier) takes it: the file describes kube-proxy, and a planner on the
    # same host taking kube-proxy's metrics port would collide with the applier. A flag is taken anywhere.
    proxy_only: bool = False


def _one(name: str, convert: Callable[[Any, str], Any], owner: str = "the applier (on each node)",
         note: str = "", proxy_only: bool = False) -> Setting:
    return Setting(lambda value, where: {name: convert(value, where)}, owner, note, (name,), proxy_only)


def _mode(value: Any, where: str) -> dict[str, Any]:
    if text(value, where) not in ("", "ipvs"):
        raise ValueError(f"{where} is {value!r}: kipvs is an IPVS proxy; set it to ipvs (or leave it out)")
    return {}


def _node_ports(value: Any, where: str) -> dict[str, Any]:
    """kube-proxy's nodePortAddresses: ``primary`` is kipvs's --node-addresses node (the Node object's
    addresses), ``all`` or CIDRs its --node-addresses interfaces, filtered to the CIDRs (--nodeport-cidrs)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{where} must be a list of CIDRs or primary/all, got {value!r}")
    if "localhost" in items:
        raise ValueError(f"{where}: localhost: NodePorts are not served on loopback addresses in IPVS mode "
                         "(kube-proxy's IPVS mode skips them too); leave it out")
    if items == ["primary"]:
        return {"node_addresses": "node"}
    if "primary" in items:
        raise ValueError(f"{where}: primary with CIDRs is not supported by kipvs; give primary alone, or CIDRs")
    if "all" in items:
        return {"node_addresses": "interfaces"}
    return {"node_addresses": "interfaces", "nodeport_cidrs": cidrs(items, where)}


def _hostname(value: Any, where: str) -> str:
    """The node name as kube-proxy takes hostnameOverride: trimmed and lower-cased (component-helpers
    node util ``GetHostname``)."""
    return text(value, where).strip().lower()


def _log_format(value: Any, where: str) -> str:
    formats = {"text": "human", "json": "json"}
    if text(value, where) not in formats:
        raise ValueError(f"{where} must be text or json, got {value!r}")
    return formats[value]


EVERY_SERVICE = "every kipvs service"
FIELDS: dict[str, Setting] = {
    "mode": Setting(_mode, EVERY_SERVICE),
    "hostnameOverride": _one("node", _hostname),
    "healthzBindAddress": _one("healthz_bind_address", bind_address(10256)),
    "metricsBindAddress": _one("http_listen", bind_address(10249), proxy_only=True),
    "clusterCIDR": _one("cluster_cidr", cidrs),
    "nodePortAddresses": Setting(_node_ports, sets=("node_addresses", "nodeport_cidrs")),
    "ipvs.scheduler": _one("scheduler", text, "the planner", SCHEDULER_NOTE),
    "ipvs.syncPeriod": _one("drift_period", seconds),
    "ipvs.excludeCIDRs": _one("ipvs_exclude_cidrs", cidrs),
    "ipvs.strictARP": _one("ipvs_strict_arp", boolean),
    "ipvs.tcpTimeout": _one("ipvs_tcp_timeout", whole_seconds),
    "ipvs.tcpFinTimeout": _one("ipvs_tcpfin_timeout", whole_seconds),
    "ipvs.udpTimeout": _one("ipvs_udp_timeout", whole_seconds),
    "iptables.masqueradeAll": _one("masquerade_all", boolean),  # the field kube-proxy's IPVS mode reads
    "conntrack.maxPerCore": _one("conntrack_max_per_core", count),
    "conntrack.min": _one("conntrack_min", count),
    "conntrack.tcpEstablishedTimeout": _one("conntrack_tcp_timeout_established", whole_seconds),
    "conntrack.tcpCloseWaitTimeout": _one("conntrack_tcp_timeout_close_wait", whole_seconds),
    "conntrack.tcpBeLiberal": _one("conntrack_tcp_be_liberal", boolean),
    "conntrack.udpTimeout": _one("conntrack_udp_timeout", whole_seconds),
    "conntrack.udpStreamTimeout": _one("conntrack_udp_timeout_stream", whole_seconds),
    "clientConnection.kubeconfig": _one("kubeconfig", text, "the watcher and the auth service"),
    "logging.verbosity": _one("log_level", verbosity, EVERY_SERVICE),
    "logging.format": _one("log_format", _log_format, EVERY_SERVICE),
    "detectLocalMode": Setting(lambda v, w: {} if v == "ClusterCIDR" else _no_meaning(w), EVERY_SERVICE),
}
# v1alpha1 fields kipvs has no use for (docs/kube-proxy.md says why, field by field).
NO_MEANING = frozenset({
    "featureGates", "bindAddress", "bindAddressHardFail", "enableProfiling", "showHiddenMetricsForVersion",
    "oomScoreAdj", "configSyncPeriod", "portRange", "windowsRunAsService", "ipvs.minSyncPeriod",
    "iptables.masqueradeBit", "iptables.localhostNodePorts", "iptables.syncPeriod", "iptables.minSyncPeriod",
    "iptables.snatNodeInternalIP", "nftables.masqueradeBit", "nftables.masqueradeAll", "nftables.syncPeriod",
    "nftables.minSyncPeriod", "winkernel.networkName", "winkernel.sourceVip", "winkernel.enableDSR",
    "winkernel.rootHnsEndpointName", "winkernel.forwardHealthCheckVip", "detectLocal.bridgeInterface",
    "detectLocal.interfaceNamePrefix", "clientConnection.acceptContentTypes", "clientConnection.contentType",
    "clientConnection.qps", "clientConnection.burst", "logging.flushFrequency", "logging.options", "logging.vmodule",
})


class _NoMeaning(Exception):
    pass


def _no_meaning(where: str) -> dict[str, Any]:
    raise _NoMeaning(where)


# kube-proxy's flags (cmd/kube-proxy/app/options.go) -> the field each sets.
FLAGS: dict[str, str] = {
    "hostname-override": "hostnameOverride", "healthz-bind-address": "healthzBindAddress",
    "metrics-bind-address": "metricsBindAddress", "cluster-cidr": "clusterCIDR",
    "nodeport-addresses": "nodePortAddresses", "proxy-mode": "mode", "ipvs-scheduler": "ipvs.scheduler",
    "ipvs-sync-period": "ipvs.syncPeriod", "ipvs-exclude-cidrs": "ipvs.excludeCIDRs",
    "ipvs-strict-arp": "ipvs.strictARP", "ipvs-tcp-timeout": "ipvs.tcpTimeout",
    "ipvs-tcpfin-timeout": "ipvs.tcpFinTimeout", "ipvs-udp-timeout": "ipvs.udpTimeout",
    "masquerade-all": "iptables.masqueradeAll", "kubeconfig": "clientConnection.kubeconfig",
    "v": "logging.verbosity", "logging-format": "logging.format", "detect-local-mode": "detectLocalMode",
    "conntrack-max-per-core": "conntrack.maxPerCore", "conntrack-min": "conntrack.min",
    "conntrack-tcp-timeout-established": "conntrack.tcpEstablishedTimeout",
    "conntrack-tcp-timeout-close-wait": "conntrack.tcpCloseWaitTimeout", "conntrack-tcp-be-liberal":
    "conntrack.tcpBeLiberal", "conntrack-udp-timeout": "conntrack.udpTimeout", "conntrack-udp-timeout-stream":
    "conntrack.udpStreamTimeout",
    # accepted, no meaning in kipvs (warned)
    "bind-address": "bindAddress", "feature-gates": "featureGates", "oom-score-adj": "oomScoreAdj",
    "config-sync-period": "configSyncPeriod", "profiling": "enableProfiling",
    "bind-address-hard-fail": "bindAddressHardFail", "ipvs-min-sync-period": "ipvs.minSyncPeriod",
    "iptables-masquerade-bit": "iptables.masqueradeBit", "iptables-sync-period": "iptables.syncPeriod",
    "iptables-min-sync-period": "iptables.minSyncPeriod", "iptables-localhost-nodeports":
    "iptables.localhostNodePorts", "pod-bridge-interface": "detectLocal.bridgeInterface",
    "pod-interface-name-prefix": "detectLocal.interfaceNamePrefix", "kube-api-qps": "clientConnection.qps",
    "kube-api-burst": "clientConnection.burst", "kube-api-content-type": "clientConnection.contentType",
    "show-hidden-metrics-for-version": "showHiddenMetricsForVersion",
}
BOOL_FLAGS = frozenset({"ipvs-strict-arp", "masquerade-all", "profiling", "bind-address-hard-fail",
                        "iptables-localhost-nodeports", "conntrack-tcp-be-liberal"})


@dataclass
class Translation:
    """kipvs settings from kube-proxy's: ``values`` setting -> (value, what set it: "ipvs.tcpTimeout in
    config file F", "flag --ipvs-tcp-timeout"); ``owners`` setting -> the Setting it came from (for the line
    a service without the setting says); ``no_meaning`` and ``unknown``: names for the one warning line."""

    values: dict[str, tuple[Any, str]] = field(default_factory=dict)
    owners: dict[str, tuple[str, Setting]] = field(default_factory=dict)
    no_meaning: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    proxy_only: set[str] = field(default_factory=set)  # settings only the proxy takes (Setting.proxy_only)

    def take(self, name: str, value: Any, source: str, explicit: bool = False) -> None:
        """One kube-proxy field (``name``: its v1alpha1 path) with its value; ValueError when malformed.
        A zero value is unset unless ``explicit`` (a flag) and meaningful: ``--masquerade-all=false`` wins
        over the file's true."""
        if _is_zero(name, value) and not (explicit and name in FIELDS):
            return
        setting = FIELDS.get(name)
        if setting is None:
            (self.no_meaning if name in NO_MEANING else self.unknown).append(source)
            return
        try:
            got = setting.read(value, source)
        except _NoMeaning:
            self.no_meaning.append(source)
            return
        for key, converted in got.items():
            self.values[key] = (converted, source)
            self.owners[key] = (source, setting)
            if setting.proxy_only and not explicit:
                self.proxy_only.add(key)

    def warning(self) -> str:
        """The one line for what is ignored; "" when nothing is."""
        parts = []
        if self.no_meaning:
            parts.append(f"kube-proxy settings with no meaning in kipvs, ignored: {', '.join(self.no_meaning)}")
        if self.unknown:
            parts.append(f"not {KIND} {API_VERSION} fields, ignored: {', '.join(self.unknown)}")
        return "; ".join(parts) + ("" if not parts else " (docs/kube-proxy.md)")


def _is_zero(name: str, value: Any) -> bool:
    if isinstance(value, dict):  # kubeadm's logging.options.json.infoBufferSize: "0" is as unset as {}
        return all(_is_zero(key, item) for key, item in value.items())
    if value is None or value is False or value in ("", 0, "0s", "0") or value == {} or value == []:
        return True
    return name == "bindAddress" and value in ("0.0.0.0", "::")  # kube-proxy's default: no override


def is_kube_proxy(doc: dict[str, Any]) -> bool:
    """Whether a config file's mapping is a Kubernetes-style object (it has apiVersion or kind), not kipvs's
    own settings."""
    return "apiVersion" in doc or "kind" in doc


def from_file(doc: dict[str, Any], path: str) -> Translation:
    """A KubeProxyConfiguration document's settings. ValueError (one line, naming the file and the field)
    for another kind or version, mode other than ipvs, or a value of the wrong shape."""
    version, kind = doc.get("apiVersion"), doc.get("kind")
    if (version, kind) != (API_VERSION, KIND):
        hint = " (a ConfigMap: give the KubeProxyConfiguration it holds, kubeadm's key config.conf)" \
            if kind == "ConfigMap" else ""
        raise ValueError(f"config file {path} is a {version}/{kind}, not a {API_VERSION} {KIND}{hint}")
    found = Translation()
    for name, value in _flatten({k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}):
        found.take(name, value, f"{name} in config file {path}")
    return found


def _flatten(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if name in SECTIONS and isinstance(value, dict):
            out += _flatten(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def from_flags(given: dict[str, Any]) -> Translation:
    """kube-proxy flags (name without dashes -> value) as settings; ValueError as from_file's."""
    found = Translation()
    for flag, value in given.items():
        if value is not None:
            found.take(FLAGS[flag], value, f"flag --{flag}", explicit=True)
    return found
