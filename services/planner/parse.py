"""Kubernetes objects into the planner's validated inputs. Pure; every rejection says exactly why.

Rules of this room: input is whatever the API server (or a recording) holds, so nothing here trusts a
field's presence or type; a rejection is :class:`Invalid` with one precise sentence (the field and the
problem), which the core turns into a plan warning; never another exception, never a default kube-proxy
does not use.

Follows what kube-proxy reads (pkg/proxy/serviceport.go, endpointslicecache.go): which Services are
ignored, defaults (protocol TCP, affinity timeout 10800 s), EndpointSlice conditions (nil ready means
ready, nil serving means serving), only an endpoint's first address.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any

import msgspec

from shared.contract.events import Endpoint, NodeFacts
from shared.plan.node_state import family_of
from shared.service import sloppy

PROTOCOLS = ("TCP", "UDP", "SCTP")
SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"})
SCHEDULER_ANNOTATION = "kipvs.io/scheduler"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400


class Invalid(ValueError):
    """The object cannot be planned; the message names the field and the problem."""


class ServicePort(msgspec.Struct, frozen=True, gc=False):
    name: str
    protocol: str
    port: int
    node_port: int


class ServiceSpec(msgspec.Struct, frozen=True, gc=False):
    """A Service kipvs proxies (never headless, ExternalName or owned by another proxy)."""

    key: str
    cluster_ips: tuple[str, ...]
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]
    load_balancer_source_ranges: tuple[str, ...]
    scheduler: str
    scheduler_problem: str  # why the annotation was not used; "" when fine
    persistence_timeout: int
    external_policy_local: bool
    internal_policy_local: bool
    ports: tuple[ServicePort, ...]
    health_check_node_port: int = 0
    legacy: tuple[str, ...] = ()  # addresses read as kube-proxy reads legacy ones (leading zeros), and where
    skipped: tuple[str, ...] = ()  # list entries kube-proxy cannot read either, skipped: field, value, why
    stale_ingress: tuple[str, ...] = ()  # status.loadBalancer.ingress IPs of a Service no longer a LoadBalancer


class SlicePort(msgspec.Struct, frozen=True, gc=False):
    name: str
    protocol: str
    port: int


class SliceSpec(msgspec.Struct, frozen=True, gc=False):
    key: str  # namespace/name of the slice
    service_key: str  # namespace/name of the Service it belongs to
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]  # port 0: filled in per Service port by the planner
    problems: tuple[str, ...]  # endpoints skipped and why
    legacy: tuple[str, ...] = ()  # addresses read as kube-proxy reads legacy ones (leading zeros), and where


@functools.lru_cache(maxsize=1 << 17)
def canonical_ip(text: str) -> str | None:
    """The canonical form of an IP address ('fd00:0::a' -> 'fd00::a'), None if it is not one (a legacy
    address with leading zeros is not: see :func:`sloppy.parse_ip`). C parsers and a cache: endpoint
    addresses are parsed on every slice change, the hot path."""
    try:
        if ":" not in text:
            socket.inet_pton(socket.AF_INET, text)  # glibc accepts only canonical dotted quads (no leading 0)
            return text
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def legacy_note(field: str, raw: str, read: str) -> str:
    if ":" in raw:
        return f"{field}: {raw!r} read as {read} (an IPv4-mapped IPv6 address is IPv4 to kube-proxy: Go's To4)"
    return f"{field}: {raw!r} read as {read} (leading zeros are decimal, as kube-proxy's ParseIPSloppy reads them)"


def _ip(value: Any, field: str, legacy: list[str]) -> str:
    """An address field read as kube-proxy reads it (``ParseIPSloppy``); a legacy form is noted in ``legacy``."""
    parsed = sloppy.parse_ip(value.strip()) if isinstance(value, str) else None
    if parsed is None:
        raise Invalid(f"{field}: {value!r} is not an IP address")
    if parsed[1]:
        legacy.append(legacy_note(field, value, parsed[0]))
    return parsed[0]


def _port(value: Any, field: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 65535:
        raise Invalid(f"{field}: {value!r} is not a port number (1-65535)")
    return value


def _protocol(value: Any, field: str) -> str:
    protocol = "TCP" if value is None else value
    if protocol not in PROTOCOLS:
        raise Invalid(f"{field}: unknown protocol {value!r} (TCP, UDP, SCTP)")
    return protocol


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"{field}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{field}: expected a list, got {type(value).__name__}")
    return value


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    return f"{namespace}/{meta.get('name', '')}" if namespace else str(meta.get("name", ""))


def service(obj: dict[str, Any], default_scheduler: str) -> ServiceSpec | None:
    """The Service as kipvs proxies it, None if kipvs must ignore it, Invalid if it is broken."""
    meta = _mapping(obj.get("metadata"), "metadata")
    if PROXY_NAME_LABEL in _mapping(meta.get("labels"), "metadata.labels"):
        return None  # another proxy owns it
    spec = _mapping(obj.get("spec"), "spec")
    kind = spec.get("type") or "ClusterIP"
    if kind == "ExternalName":
        return None
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise Invalid(f"spec.type: unknown Service type {kind!r}")
    cluster_ip = spec.get("clusterIP")
    if cluster_ip == "None":
        return None  # headless
    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or ([cluster_ip] if cluster_ip else [])
    if not raw_ips:
        raise Invalid("spec.clusterIP: missing (a proxied Service needs one)")
    legacy: list[str] = []
    skipped: list[str] = []
    cluster_ips = tuple(_ip(ip, f"spec.clusterIPs[{i}]", legacy) for i, ip in enumerate(raw_ips))
    ports = _service_ports(spec, kind in ("NodePort", "LoadBalancer"))
    external_ips = tuple(_each(_ip, _list(spec.get("externalIPs"), "spec.externalIPs"), "spec.externalIPs",
                               legacy, skipped))
    lb_ips, ranges, stale = _load_balancer(obj, spec, kind, legacy, skipped)
    persistence = _affinity_timeout(spec)
    scheduler, problem = _scheduler(meta, default_scheduler)
    # pkg/api/v1/service/util.go ExternallyAccessible / ExternalPolicyLocal / NeedsHealthCheck: by type,
    # not by what is allocated or reported (an LB still pending, with ipMode Proxy addresses only, or with
    # allocateLoadBalancerNodePorts false has its health-check port all the same: kubernetes#130776)
    externally_accessible = kind in ("LoadBalancer", "NodePort") or bool(external_ips)
    external_local = externally_accessible and spec.get("externalTrafficPolicy") == "Local"
    health_check = 0
    if kind == "LoadBalancer" and external_local:
        health_check = _port(spec.get("healthCheckNodePort") or 0, "spec.healthCheckNodePort", allow_zero=True)
    return ServiceSpec(
        key=object_key(obj), cluster_ips=cluster_ips, external_ips=external_ips,
        load_balancer_ips=lb_ips, load_balancer_source_ranges=ranges, scheduler=scheduler,
        scheduler_problem=problem, persistence_timeout=persistence,
        external_policy_local=external_local,
        internal_policy_local=spec.get("internalTrafficPolicy") == "Local", ports=tuple(ports),
        health_check_node_port=health_check, legacy=tuple(legacy), skipped=tuple(skipped), stale_ingress=stale)


def _each(read: Callable[[Any, str, list[str]], str], values: list[Any], field: str, legacy: list[str],
          skipped: list[str]) -> list[str]:
    """Every entry of a list field that ``read`` (``_ip``, ``_cidr``) can read. One it cannot is skipped and
    noted in ``skipped``, the rest kept, as kube-proxy does (pkg/proxy/util/utils.go ``MapIPsByIPFamily``:
    "Skipping invalid IP"; ``MapCIDRsByIPFamily``: "Invalid CIDR ignored"); an empty string is skipped
    without a word, as there."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(read(value, f"{field}[{i}]", legacy))
        except Invalid as exc:
            if not isinstance(value, str) or value.strip():
                skipped.append(f"{exc}: skipped")
    return out


def _load_balancer(obj: dict[str, Any], spec: dict[str, Any], kind: str, legacy: list[str],
                   skipped: list[str]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(ingress IPs to program, loadBalancerSourceRanges, stale ingress IPs of a Service that is no longer
    a LoadBalancer). ipMode Proxy entries are not programmed locally (serviceport.go ``IsVIPMode``). An
    ingress IP or a source range kube-proxy cannot read is skipped, the rest kept (serviceport.go
    ``newBaseServiceInfo``: an ingress IP ``ParseIPSloppy`` refuses has no family and is left out; the
    ranges go through ``MapCIDRsByIPFamily``), and noted in ``skipped``; with every range skipped the
    load balancer is open to all, as kube-proxy leaves it (``syncProxyRules`` firewalls only with ranges).

    A Service turned from LoadBalancer into another type keeps its ingress until the controller clears it
    (MetalLB issue 190, kube-vip issue 1700). kube-proxy reads the status whatever the type (serviceport.go
    ``newBaseServiceInfo``) and keeps serving the old address; kipvs stops at once and says so
    (docs/plan-format.md, parity notes)."""
    try:
        status = _mapping(obj.get("status"), "status")
        ingress = _list(_mapping(status.get("loadBalancer"), "status.loadBalancer").get("ingress"),
                        "status.loadBalancer.ingress")
    except Invalid:
        if kind == "LoadBalancer":
            raise
        ingress = []  # a status kipvs does not read for this type: its shape does not matter
    if kind != "LoadBalancer":
        return (), (), _stale_ingress(ingress)
    lb_ips = []
    for i, raw in enumerate(ingress):
        entry = _mapping(raw, f"status.loadBalancer.ingress[{i}]")
        if entry.get("ip") and entry.get("ipMode") != "Proxy":
            try:
                lb_ips.append(_ip(entry["ip"], f"status.loadBalancer.ingress[{i}].ip", legacy))
            except Invalid as exc:
                skipped.append(f"{exc}: skipped")
    written = _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    ranges = _each(_cidr, written, "spec.loadBalancerSourceRanges", legacy, skipped)
    if not ranges and any(not isinstance(r, str) or r.strip() for r in written):
        skipped.append("spec.loadBalancerSourceRanges: no range left, so the load balancer is open to every "
                       "source (as kube-proxy leaves it)")
    elif ranges:
        skipped += [f"spec.loadBalancerSourceRanges: no IPv{family} range left, so the load balancer is open to "
                    f"every IPv{family} source (as kube-proxy leaves a family without ranges)"
                    for family in _families_left_open(written, ranges)]
    return tuple(lb_ips), tuple(ranges), ()


def _families_left_open(written: list[Any], ranges: list[str]) -> list[int]:
    """The families (4, 6) of the source ranges skipped as unreadable that no readable range is left for:
    kube-proxy firewalls a family only with ranges of that family (``MapCIDRsByIPFamily``), so that
    family is open. An unreadable entry's family is guessed from its text (a colon: IPv6)."""
    kept = {6 if ":" in r else 4 for r in ranges}
    dropped = {6 if ":" in r else 4 for r in written
               if isinstance(r, str) and r.strip() and sloppy.parse_cidr(r.strip()) is None}
    return sorted(dropped - kept)


def _stale_ingress(ingress: list[Any]) -> tuple[str, ...]:
    """The ingress addresses kube-proxy would still serve for a Service no longer a LoadBalancer: VIP-mode
    entries (not ``ipMode: Proxy``, serviceport.go ``IsVIPMode``) it can read (``ParseIPSloppy``), each
    in its canonical form; the rest it ignores too."""
    stale = []
    for raw in ingress:
        if isinstance(raw, dict) and isinstance(raw.get("ip"), str) and raw.get("ipMode") != "Proxy":
            parsed = sloppy.parse_ip(raw["ip"].strip())
            if parsed is not None:
                stale.append(parsed[0])
    return tuple(stale)


def _cidr(value: Any, field: str, legacy: list[str]) -> str:
    """A CIDR read as kube-proxy reads loadBalancerSourceRanges: spaces trimmed (validation let them
    through), ``ParseCIDRSloppy``, host bits masked (serviceport.go ``newBaseServiceInfo``)."""
    text = value.strip() if isinstance(value, str) else ""
    parsed = sloppy.parse_cidr(text)
    if parsed is None:
        raise Invalid(f"{field}: {value!r} is not a CIDR")
    if parsed[1]:
        legacy.append(legacy_note(field, value, parsed[0]))
    return parsed[0]


def _service_ports(spec: dict[str, Any], with_node_ports: bool) -> list[ServicePort]:
    """spec.ports; a nodePort only counts for NodePort and LoadBalancer Services."""
    ports = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(_list(spec.get("ports"), "spec.ports")):
        p = _mapping(raw, f"spec.ports[{i}]")
        name = p.get("name") or ""
        protocol = _protocol(p.get("protocol"), f"spec.ports[{i}].protocol")
        if (name, protocol) in seen:
            raise Invalid(f"spec.ports[{i}]: duplicate port name {name!r} for {protocol}")
        seen.add((name, protocol))
        node_port = _port(p.get("nodePort") or 0, f"spec.ports[{i}].nodePort", allow_zero=True)
        ports.append(ServicePort(name, protocol, _port(p.get("port"), f"spec.ports[{i}].port"),
                                 node_port if with_node_ports else 0))
    return ports


def _affinity_timeout(spec: dict[str, Any]) -> int:
    """The ClientIP affinity timeout in seconds (kube-proxy's default 10800), 0 without affinity."""
    if spec.get("sessionAffinity") == "ClientIP":
        config = _mapping(_mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig").get("clientIP"),
                          "spec.sessionAffinityConfig.clientIP")
        persistence = config.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT
        if isinstance(persistence, bool) or not isinstance(persistence, int) or not (
                1 <= persistence <= MAX_AFFINITY_TIMEOUT):
            raise Invalid(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {persistence!r} is not 1-86400")
        return persistence
    if spec.get("sessionAffinity") not in (None, "None"):
        raise Invalid(f"spec.sessionAffinity: unknown value {spec.get('sessionAffinity')!r} (None, ClientIP)")
    return 0


def _scheduler(meta: dict[str, Any], default_scheduler: str) -> tuple[str, str]:
    """(the scheduler, why the annotation's was not used: "" when it was, or there was none)."""
    wanted = _mapping(meta.get("annotations"), "metadata.annotations").get(SCHEDULER_ANNOTATION)
    if wanted is None or wanted in SCHEDULERS:
        return wanted or default_scheduler, ""
    return default_scheduler, (f"annotation {SCHEDULER_ANNOTATION}={wanted!r} is not an IPVS scheduler "
                               f"({', '.join(sorted(SCHEDULERS))}); using {default_scheduler!r}")


class _Conditions(msgspec.Struct):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class _ForZone(msgspec.Struct):
    name: str = ""


class _ForNode(msgspec.Struct):
    name: str = ""


class _Hints(msgspec.Struct, rename="camel"):
    for_zones: list[_ForZone] | None = None
    for_nodes: list[_ForNode] | None = None


class _Endpoint(msgspec.Struct, rename="camel"):
    addresses: list[str] | None = None
    conditions: _Conditions | None = None
    node_name: str | None = None
    zone: str | None = None
    hints: _Hints | None = None


class _SlicePort(msgspec.Struct):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class _Meta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] | None = None


class _Slice(msgspec.Struct, rename="camel"):
    """The fields of an EndpointSlice kipvs reads; msgspec checks their types in C (the hot path)."""

    metadata: _Meta
    address_type: str | None = None
    ports: list[_SlicePort] | None = None
    endpoints: list[_Endpoint] | None = None




def endpoint_slice(obj: dict[str, Any]) -> SliceSpec | None:
    """The slice's ports and endpoints; None if no Service proxied by kipvs can use it (no service-name
    label, FQDN addresses). Endpoints with a bad address are skipped and listed in ``problems``."""
    try:
        sl = msgspec.convert(obj, _Slice)
    except msgspec.ValidationError as exc:
        raise Invalid(str(exc)) from None
    service_name = (sl.metadata.labels or {}).get(SERVICE_NAME_LABEL)
    if not service_name or sl.address_type == "FQDN":
        return None
    if sl.address_type not in ("IPv4", "IPv6"):
        raise Invalid(f"addressType: unknown value {sl.address_type!r} (IPv4, IPv6, FQDN)")
    ports = []
    for i, p in enumerate(sl.ports or ()):
        if p.port is None:
            continue  # kube-proxy skips ports without a number
        ports.append(SlicePort(p.name or "", _protocol(p.protocol, f"ports[{i}].protocol"),
                               _port(p.port, f"ports[{i}].port")))
    first_port = ports[0].port if ports else 0  # endpoints carry it: reused as is for single-port slices
    want_v6 = sl.address_type == "IPv6"
    canonical = canonical_ip
    endpoints, problems, legacy = [], [], []
    for i, ep in enumerate(sl.endpoints or ()):
        addresses = ep.addresses
        if not addresses:
            problems.append(f"endpoints[{i}].addresses: missing or empty")
            continue
        ip, note = canonical(addresses[0]), ""
        if ip is None or (":" in ip and "." in ip):  # rare: a legacy or IPv4-mapped address, as kube-proxy reads it
            parsed = sloppy.parse_ip(addresses[0])
            if parsed is not None:
                ip, note = parsed[0], legacy_note(f"endpoints[{i}].addresses[0]", addresses[0], parsed[0])
        if ip is None or (":" in ip) is not want_v6:
            # one message: an IPv4-mapped address in an IPv6 slice is IPv4, which kube-apiserver's
            # IsValidIPv6Address refuses too (To4() != nil), so it is skipped, not read
            mapped = " (an IPv4-mapped address is IPv4)" if note and ":" in addresses[0] else ""
            problems.append(f"endpoints[{i}].addresses[0]: {addresses[0]!r} is not an {sl.address_type} "
                            f"address{mapped}")
            continue
        if note:
            legacy.append(note)
        c = ep.conditions
        hints = tuple(sorted({z.name for z in ep.hints.for_zones or ()} - {""})) if ep.hints else ()
        node_hints = tuple(sorted({n.name for n in ep.hints.for_nodes or ()} - {""})) if ep.hints else ()
        if c is None:
            endpoints.append(Endpoint(ip=ip, port=first_port, node=ep.node_name or "", zone=ep.zone or "",
                                      hints=hints, node_hints=node_hints))
        else:
            endpoints.append(Endpoint(ip=ip, port=first_port, node=ep.node_name or "", zone=ep.zone or "",
                                      hints=hints, node_hints=node_hints, ready=c.ready is not False,
                                      serving=c.serving is not False, terminating=c.terminating is True))
    return SliceSpec(key=object_key(obj), service_key=f"{sl.metadata.namespace}/{service_name}", ports=tuple(ports),
                     endpoints=tuple(endpoints), problems=tuple(problems), legacy=tuple(legacy))


def node(obj: dict[str, Any]) -> tuple[NodeFacts, tuple[str, ...], tuple[str, ...]]:
    """The node's facts, the problems found (addresses skipped) and the legacy addresses read (leading
    zeros, read as kube-proxy's pkg/util/node ``GetNodeHostIPs`` does with ParseIPSloppy). ``addresses``
    are the InternalIPs; ``host_ips`` kube-proxy's node IPs (:func:`host_ips`). Invalid when the object's
    shape is wrong (labels not an object, status not an object, addresses not a list), naming the field."""
    meta = _mapping(obj.get("metadata"), "metadata")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    status = _mapping(obj.get("status"), "status")
    read: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    problems, legacy = [], []
    for i, raw in enumerate(_list(status.get("addresses"), "status.addresses")):
        entry = _mapping(raw, f"status.addresses[{i}]")
        kind = entry.get("type")
        if kind not in read:
            continue
        try:
            ip = _ip(entry.get("address"), f"status.addresses[{i}].address", legacy)
        except Invalid as exc:
            problems.append(str(exc))
            continue
        if ip not in read[kind]:
            read[kind].append(ip)
    return NodeFacts(name=str(meta.get("name", "")), zone=str(labels.get(ZONE_LABEL) or ""),
                     addresses=tuple(read["InternalIP"]),
                     host_ips=host_ips(read["InternalIP"] + read["ExternalIP"])), tuple(problems), tuple(legacy)


def host_ips(ordered: list[str]) -> tuple[str, ...]:
    """kube-proxy's node IPs from the Node's InternalIPs then ExternalIPs (in that order): the first
    address, then the first of the other family if any (pkg/util/node ``GetNodeHostIPs``, what
    cmd/kube-proxy ``detectNodeIPs`` hands each per-family proxier as ``nodeIP``). So per family: the
    first InternalIP of the family, else its first ExternalIP."""
    out = ordered[:1]
    out += [ip for ip in ordered if family_of(ip) != family_of(out[0])][:1] if out else []
    return tuple(out)
