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


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
    if doc["kind"] == "Job":
        spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _without_images(doc: dict[str, Any]) -> Any:
    text = yaml.safe_dump(doc).replace("registry.example.com/kipvs:", f"{IMAGE}:")
    return yaml.safe_load(text)
