"""compose.yaml against the Compose specification's JSON schema, and deploy/kubernetes against the Kubernetes
schemas (kubernetes-validate), offline; then what the issue asks of them: least-privilege RBAC, two
watchers, two planners (leader election), the applier DaemonSet's host network and NET_ADMIN, NATS with
three servers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kipvs.shared import topology

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / ".venv" / "schemas"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


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
