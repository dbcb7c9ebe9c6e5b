"""The simulator's discovery endpoints, as kube-apiserver serves them without aggregation (what kubectl falls
back to when the answer is plain JSON, not an APIGroupDiscoveryList): staging/src/k8s.io/apiserver/pkg/
endpoints/discovery (legacy.go, root.go, version.go). kubectl needs them before any request for a resource.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .store import RESOURCES, ApiError, Resource

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
_SHORT_NAMES = {"Service": ["svc"], "Pod": ["po"], "Node": ["no"], "FelixConfiguration": ["felixconfig"]}
# What the simulator serves besides the stored kinds: the token request and review kipvs auth uses.
_SUBRESOURCES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("", "v1"): [{"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                  "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}],
    ("authentication.k8s.io", "v1"): [{"name": "tokenreviews", "singularName": "tokenreview",
                                       "namespaced": False, "kind": "TokenReview", "verbs": ["create"]}],
}


def _discovered(resource: Resource) -> dict[str, Any]:
    """An APIResource (meta/v1) for a stored kind."""
    return {"name": resource.plural, "singularName": resource.kind.lower(), "namespaced": resource.namespaced,
            "kind": resource.kind, "verbs": _VERBS, "shortNames": _SHORT_NAMES.get(resource.kind, [])}


async def version(_: web.Request) -> web.Response:
    """``GET /version``: a version.Info."""
    return web.json_response({"major": "1", "minor": "34", "gitVersion": "v1.34.0-kipvs-simulator"})


async def core_versions(request: web.Request) -> web.Response:
    """``GET /api``: an APIVersions."""
    return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}]})


async def groups(_: web.Request) -> web.Response:
    """``GET /apis``: an APIGroupList of the stored kinds' groups and authentication.k8s.io."""
    served = sorted({(r.group, r.version) for r in RESOURCES if r.group} | {("authentication.k8s.io", "v1")})
    return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": group, "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
         "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version}}
        for group, version in served]})


async def resources(request: web.Request) -> web.Response:
    """``GET /api/{version}``, ``/apis/{group}/{version}``: an APIResourceList; 404 for a group version
    nothing is served in."""
    group, version = request.match_info.get("group", ""), request.match_info["version"]
    served = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
    extra = _SUBRESOURCES.get((group, version), [])
    if not served and not extra:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({request.path})")
    return web.json_response({"kind": "APIResourceList", "apiVersion": "v1",
                              "groupVersion": f"{group}/{version}" if group else version,
                              "resources": [_discovered(r) for r in served] + extra})
