"""compose.yaml against the Compose specification's JSON schema, and deploy/kubernetes against the Kubernetes
schemas (kubernetes-validate), offline; then what the issue asks of them: least-privilege RBAC, two
watchers, two planners (leader election), the applier DaemonSet's host network and NET_ADMIN, NATS with
three servers."""

from __future__ import annotations

import ipaddress
import json
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.contract import topology
from shared.messaging import bus
from shared.security.credentials_command import service_names

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / ".venv" / "schemas"
MANIFESTS = sorted(p for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")


def compose_schema() -> dict[str, Any]:
    wheels = sorted(SCHEMAS.glob("docker_compose-*.whl"))
    if not wheels:
        pytest.fail(f"the Compose specification schema is missing from {SCHEMAS}: run 'make test' (it downloads "
                    "docker-compose's wheel, which ships compose_spec.json)", pytrace=False)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_compose_file_follows_the_compose_specification() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    jsonschema.Draft201909Validator(compose_schema()).validate(compose)
    services = compose["services"]
    assert {"nats", "simulator", "watcher", "planner", "applier"} <= set(services)
    assert "--jetstream" in services["nats"]["command"]
    assert services["applier"]["network_mode"] == "host" and services["applier"]["cap_add"] == ["NET_ADMIN"]


def test_the_schema_check_can_fail() -> None:
    broken = {"services": {"applier": {"image": "kipvs:dev", "cap_add": "NET_ADMIN", "network_mode": 7}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_schema()).validate(broken)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def test_only_the_watcher_and_the_auth_service_talk_to_the_api() -> None:
    roles = _by_kind("ClusterRole")
    assert set(roles) == {"kipvs-watcher", "kipvs-auth"} and not _by_kind("Role")
    # the auth service only reviews tokens
    assert roles["kipvs-auth"]["rules"] == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                                            "verbs": ["create"]}]
    for rule in roles["kipvs-watcher"]["rules"]:
        assert rule["verbs"] == ["list", "watch"]
    granted = {(g, r) for rule in roles["kipvs-watcher"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "services"), ("", "nodes"), ("", "pods"), ("discovery.k8s.io", "endpointslices"),
                       ("crd.projectcalico.org", "felixconfigurations")}
    bindings = _by_kind("ClusterRoleBinding")
    assert {name: [s["name"] for s in b["subjects"]] for name, b in bindings.items()} == \
        {"kipvs-watcher": ["kipvs-watcher"], "kipvs-auth": ["kipvs-auth"]}
    for name in ("kipvs-planner", "kipvs-applier"):
        assert _by_kind("ServiceAccount")[name]["automountServiceAccountToken"] is False


def test_workloads() -> None:
    deployments = _by_kind("Deployment")
    assert deployments["kipvs-watcher"]["spec"]["replicas"] == 2
    planner = deployments["kipvs-planner"]["spec"]
    assert planner["replicas"] == 2 and planner["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (term,) = planner["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "--leader-elect" in planner["template"]["spec"]["containers"][0]["args"], "two planners need the lease"
    applier = _by_kind("DaemonSet")["kipvs-applier"]["spec"]["template"]["spec"]
    assert applier["hostNetwork"] is True
    (container,) = applier["containers"]
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert "privileged" not in container["securityContext"], "only the init container (modules, sysctls) is"
    assert "ip_vs" in applier["initContainers"][0]["args"][0]
    nats = _by_kind("StatefulSet")["nats"]["spec"]
    assert nats["replicas"] == 3 and nats["template"]["spec"]["containers"][0]["image"].startswith("nats:")
    version = nats["template"]["spec"]["containers"][0]["image"].split(":")[1].split("-")[0]
    assert tuple(map(int, version.split("."))) >= topology.LEADER_ELECTION_SERVER_VERSION[:2], "fenced batches"
    assert "jetstream" in _by_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    for workload in (*deployments.values(), _by_kind("DaemonSet")["kipvs-applier"]):
        args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--nats-replicas") + 1] == "3", "streams replicated on the three NATS servers"


def _containers() -> list[tuple[str, dict[str, Any]]]:
    """Every kipvs container (init containers too) of every workload, with its workload's name."""
    out = []
    for doc in documents():
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if template is None or doc["metadata"]["name"] == "nats":
            continue
        out += [(doc["metadata"]["name"], c) for c in (*template.get("initContainers", ()), *template["containers"])]
    return out


def _bootstrap_ref(container: dict[str, Any], variable: str) -> str:
    """The kipvs-bootstrap key the container's environment variable comes from; AssertionError otherwise."""
    (entry,) = [e for e in container.get("env", ()) if e["name"] == variable] or [{}]
    ref = entry.get("valueFrom", {}).get("configMapKeyRef", {})
    assert ref.get("name") == "kipvs-bootstrap", f"{container['name']}: {variable} not from ConfigMap kipvs-bootstrap"
    return ref["key"]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def test_kipvs_reaches_nats_and_the_api_with_no_service_proxy() -> None:
    """Issue 21: a new node after kube-proxy is gone. Nothing answers a ClusterIP (nor cluster DNS, itself a
    ClusterIP) on a new node until its applier has a plan, and the applier needs NATS for it; the auth
    service (TokenReview) and the watcher must not depend on a ClusterIP either. So every kipvs component
    reaches NATS at the addresses of kipvs-bootstrap, which are addresses (no name to resolve) where the NATS
    servers listen with hostPort, and the API server at its own address."""
    bootstrap = _by_kind("ConfigMap")["kipvs-bootstrap"]["data"]
    for url in bus.servers(bootstrap["nats-url"]):
        parsed = urlsplit(url)
        assert parsed.scheme == "nats" and _is_address(parsed.hostname or "") and parsed.port == 4222, url
    assert _is_address(bootstrap["kubernetes-service-host"]) and bootstrap["kubernetes-service-port"].isdigit()
    assert bootstrap["nats-tls-server-name"] in service_names("kipvs-system"), "a name the certificate carries"
    uses_nats = [(w, c) for w, c in _containers() if "--nats-url" in c.get("args", ())]
    assert {w for w, _ in uses_nats} == {"kipvs-topology", "kipvs-watcher", "kipvs-planner", "kipvs-auth",
                                         "kipvs-applier"}
    for workload, container in uses_nats:
        args = container["args"]
        assert args[args.index("--nats-url") + 1] == "$(NATS_URL)", workload
        assert _bootstrap_ref(container, "NATS_URL") == "nats-url", workload
        assert _bootstrap_ref(container, "KIPVS_NATS_TLS_SERVER_NAME") == "nats-tls-server-name", workload
    for workload, container in _containers():
        text = json.dumps(container)
        assert ".svc" not in text and "cluster.local" not in text, f"{workload}: a cluster DNS name"
    # The two that call the API server: its real address, not the kubernetes Service's ClusterIP.
    for workload, container in _containers():
        if workload in ("kipvs-watcher", "kipvs-auth"):
            assert _bootstrap_ref(container, "KUBERNETES_SERVICE_HOST") == "kubernetes-service-host", workload
            assert _bootstrap_ref(container, "KUBERNETES_SERVICE_PORT") == "kubernetes-service-port", workload
    applier = _by_kind("DaemonSet")["kipvs-applier"]["spec"]["template"]["spec"]
    assert applier["dnsPolicy"] == "Default", "cluster DNS is a ClusterIP: off the applier's path"
    assert applier["serviceAccountName"] == "kipvs-applier" and applier["automountServiceAccountToken"] is False, \
        "no API access (KUBERNETES_SERVICE_HOST unused): its token is the projected one, for NATS"
    nats = _by_kind("StatefulSet")["nats"]["spec"]["template"]["spec"]
    (client,) = [p for p in nats["containers"][0]["ports"] if p["name"] == "client"]
    assert client["hostPort"] == 4222, "the servers answer on their node's address"
    assert nats["nodeSelector"] == {"kipvs.io/nats": "true"}, "on the labelled nodes kipvs-bootstrap lists"
    conf = _by_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "client_advertise: $CLIENT_ADVERTISE" in conf, "clients are told node addresses, never pod IPs"
    env = {e["name"]: e for e in nats["containers"][0]["env"]}
    assert env["CLIENT_ADVERTISE"]["value"] == "$(NODE_IP):4222"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
