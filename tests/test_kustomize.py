"""The install tooling, offline: deploy/kubernetes/kustomization.yaml and the example overlay rendered by
the real kustomize (``kubectl kustomize``: Debian's kubernetes-client, which ``make debs`` installs when
no kubectl is there), every rendered object validated against the Kubernetes schemas (as
tests/test_deploy.py does for the files), the base rendering exactly the manifests, the overlay changing
only what it says. Without kubectl these tests fail, saying how to install it: never skipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
OVERLAY = ROOT / "deploy" / "kustomize-overlay-example"
AFTER = ROOT / "deploy" / "after-kube-proxy"
MIGRATION = ROOT / "deploy" / "kube-proxy-migration"
APPLIER = ("DaemonSet", "kipvs-system", "kipvs-applier")
SHADOW = ("DaemonSet", "kipvs-system", "kipvs-applier-shadow")
IMAGE = "ghcr.io/kipvs/kipvs"

Key = tuple[str, str, str]


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: run `make debs` (Debian's kubernetes-client ships it; "
                    "`kubectl kustomize` renders the kustomizations)")
    return found


def render(kubectl: str, directory: Path) -> dict[Key, dict[str, Any]]:
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return by_key(yaml.safe_load_all(done.stdout))


def by_key(docs: Any) -> dict[Key, dict[str, Any]]:
    found: dict[Key, dict[str, Any]] = {}
    for doc in docs:
        if doc:
            key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
            assert key not in found, f"{key} twice"
            found[key] = doc
    return found


def manifests() -> dict[Key, dict[str, Any]]:
    return by_key(doc for path in sorted(BASE.glob("*.yaml")) if path.name != "kustomization.yaml"
                  for doc in yaml.safe_load_all(path.read_text()))


def validate(objects: dict[Key, dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for doc in objects.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    files = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert listed == files, "deploy/kubernetes/kustomization.yaml must list every manifest, in order"


def test_the_base_renders_exactly_the_manifests(kubectl: str) -> None:
    rendered = render(kubectl, BASE)
    validate(rendered)
    assert rendered == manifests()


def test_the_example_overlay_sets_the_image_and_the_addresses_only(kubectl: str) -> None:
    base, overlay = manifests(), render(kubectl, OVERLAY)
    validate(overlay)
    assert set(overlay) == set(base)
    bootstrap = ("ConfigMap", "kipvs-system", "kipvs-bootstrap")
    assert overlay[bootstrap]["data"]["nats-url"].startswith("nats://10.0.0.11:4222")
    assert overlay[bootstrap]["data"]["kubernetes-service-host"] == "10.0.0.10"
    assert overlay[bootstrap]["data"]["nats-tls-server-name"] == base[bootstrap]["data"]["nats-tls-server-name"]
    images = set()
    for key, doc in overlay.items():
        if key == bootstrap:
            continue
        for container in _containers(doc):
            images.add(container["image"])
        assert _without_images(doc) == _without_images(base[key]), key
    assert images == {"registry.example.com/kipvs:0.1.0", "nats:2.12-alpine"}, images


def test_a_broken_overlay_fails_to_render(kubectl: str, tmp_path: Path) -> None:
    """The renderer's refusal is seen: the example overlay patching an object the base does not have."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    patch = tmp_path / "deploy" / OVERLAY.name / "bootstrap.yaml"
    patch.write_text(patch.read_text().replace("name: kipvs-bootstrap", "name: kipvs-bootstrapp"))
    done = subprocess.run([kubectl, "kustomize", str(patch.parent)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "kipvs-bootstrapp" in done.stderr, done.stderr


def _env(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_after_kube_proxy_keeps_its_node_port_addresses_only(kubectl: str) -> None:
    """README, "Replacing kube-proxy": kube-proxy's IPVS mode serves NodePorts on every host address; so does
    kipvs on a cluster that ran it, or the NodePort services there would stay foreign (never updated)."""
    base, after = manifests(), render(kubectl, AFTER)
    validate(after)
    assert set(after) == set(base)
    for key, doc in after.items():
        if key != APPLIER:
            assert doc == base[key], key
    assert _env(after[APPLIER]) == {**_env(base[APPLIER]), "KIPVS_NODE_ADDRESSES": "interfaces"}
    changed = yaml.safe_load(yaml.safe_dump(after[APPLIER]))
    changed["spec"]["template"]["spec"]["containers"][0]["env"] = base[APPLIER]["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert changed == base[APPLIER]


def _node_terms(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


def _runs_on(label: str | None, selector: dict[str, str] | None = None, terms: Any = None) -> bool:
    """Whether a pod with this nodeSelector / node affinity runs on a node whose kipvs.io/proxy is ``label``
    (None: unlabelled), as the scheduler reads them."""
    if selector is not None and selector.get("kipvs.io/proxy") != label:
        return False
    for term in terms or [{"matchExpressions": []}]:
        ok = True
        for expr in term["matchExpressions"]:
            assert expr["key"] == "kipvs.io/proxy"
            if expr["operator"] == "In":
                ok &= label in expr["values"]
            elif expr["operator"] == "NotIn":
                ok &= label not in expr["values"]
            else:
                raise AssertionError(expr)
        if ok:
            return True
    return False


def test_the_migration_overlay_puts_one_proxy_on_each_node(kubectl: str) -> None:
    """deploy/kube-proxy-migration: per node label, kube-proxy (patched with kube-proxy-patch.yaml), the
    shadow applier and the adopting applier never share a node where two would hold a port (9103 for the
    two appliers, 10256 and the health-check node ports for kube-proxy and kipvs-applier); shadow nodes
    run kube-proxy beside the shadow, unlabelled nodes kube-proxy alone, switched nodes kipvs alone."""
    after, migration = render(kubectl, AFTER), render(kubectl, MIGRATION)
    validate(migration)
    assert set(migration) == set(after) | {SHADOW}
    for key, doc in after.items():
        if key != APPLIER:
            assert doc == migration[key], key
    adopt, shadow = migration[APPLIER], migration[SHADOW]
    assert _env(adopt) == {**_env(after[APPLIER]), "KIPVS_ADOPT": "true"}
    kube_proxy = yaml.safe_load((MIGRATION / "kube-proxy-patch.yaml").read_text())
    kube_proxy_terms = _node_terms(kube_proxy)
    shadow_selector = shadow["spec"]["template"]["spec"]["nodeSelector"]
    running = {label: (_runs_on(label, terms=kube_proxy_terms), _runs_on(label, selector=shadow_selector),
                       _runs_on(label, terms=_node_terms(adopt)))
               for label in (None, "shadow", "none", "kipvs")}
    assert running == {None: (True, False, False), "shadow": (True, True, False), "none": (False, False, False),
                       "kipvs": (False, False, True)}
    # the shadow is the applier, read-only: same identity, bus, settings and node addresses
    assert _env(shadow) == {**{k: v for k, v in _env(adopt).items()
                               if k not in ("KIPVS_ADOPT", "KIPVS_HEALTHZ_BIND_ADDRESS")}, "KIPVS_SHADOW": "true"}
    (a,), (s,) = adopt["spec"]["template"]["spec"]["containers"], shadow["spec"]["template"]["spec"]["containers"]
    assert s["image"] == a["image"] and s["securityContext"] == a["securityContext"] and s["ports"] == a["ports"]
    cache = a["args"].index("--plan-cache")
    assert s["args"] == a["args"][:cache] + a["args"][cache + 2:], "no plan cache: shadow mode programs nothing"
    assert "initContainers" not in shadow["spec"]["template"]["spec"], "no modules or sysctls set"
    for field in ("serviceAccountName", "automountServiceAccountToken", "hostNetwork", "dnsPolicy",
                  "priorityClassName", "tolerations"):
        assert shadow["spec"]["template"]["spec"][field] == adopt["spec"]["template"]["spec"][field], field
    assert shadow["spec"]["selector"]["matchLabels"] != adopt["spec"]["selector"]["matchLabels"], "pods apart"


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
    if doc["kind"] == "Job":
        spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _without_images(doc: dict[str, Any]) -> Any:
    text = yaml.safe_dump(doc).replace("registry.example.com/kipvs:", f"{IMAGE}:")
    return yaml.safe_load(text)
