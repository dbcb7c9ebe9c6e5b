"""The simulator's ServiceAccount tokens: TokenRequest and TokenReview as kube-apiserver serves them.

``POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`` (``authentication.k8s.io/v1`` TokenRequest,
the kubelet's way to get a pod's projected token) with a ``boundObjectRef`` to a Pod returns a token bound
to the ServiceAccount, the pod, the pod's node, the audiences and an expiry. ``POST
/apis/authentication.k8s.io/v1/tokenreviews`` answers whether a token is valid for the audiences asked,
and for whom: ``user.username`` ``system:serviceaccount:<ns>:<sa>`` and ``user.extra`` with the pod and
node names (``authentication.kubernetes.io/node-name``, as Kubernetes >= 1.30 sets for bound pod tokens).
A token dies with its pod (a deleted or replaced pod's token is refused) and at its expiry.

The tokens are opaque random strings, not JWTs: only this simulator can review them, which is what a
TokenReview is for. Upstream: kubernetes/pkg/serviceaccount/claims.go, the TokenRequest and TokenReview API.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .store import ApiError, Store

NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"


@dataclass(frozen=True)
class Bound:
    namespace: str
    service_account: str
    pod: str
    pod_uid: str
    node: str
    audiences: tuple[str, ...]
    expires: float  # epoch seconds
    jti: str


class TokenAuthority:
    """Issues and reviews the simulated cluster's bound ServiceAccount tokens."""

    def __init__(self, store: Store, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock
        self.tokens: dict[str, Bound] = {}

    def request(self, namespace: str, service_account: str, body: dict[str, Any]) -> dict[str, Any]:
        """A TokenRequest: the request object with ``status.token`` and ``status.expirationTimestamp``.
        ApiError 400 without a Pod ``boundObjectRef``, 404 when the pod does not exist."""
        spec = body.get("spec") or {}
        ref = spec.get("boundObjectRef") or {}
        if ref.get("kind") != "Pod" or not ref.get("name"):
            raise ApiError(400, "BadRequest", "the simulator issues pod-bound tokens only: spec.boundObjectRef "
                                              "must name a Pod")
        pod = self.store.get("Pod", namespace, ref["name"])
        uid = pod["metadata"].get("uid", "")
        if ref.get("uid") and ref["uid"] != uid:
            raise ApiError(409, "Conflict", f"the UID in the bound object reference ({ref['uid']}) does not match "
                                            f"the pod's ({uid})")
        node = (pod.get("spec") or {}).get("nodeName", "")
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600:
            raise ApiError(422, "Invalid", "spec.expirationSeconds: may not specify a duration less than 10 minutes")
        audiences = tuple(spec.get("audiences") or ("https://kubernetes.default.svc",))
        token = "sim." + secrets.token_urlsafe(32)
        bound = Bound(namespace, service_account, ref["name"], uid, node, audiences, self.clock() + seconds,
                      secrets.token_hex(16))
        self.tokens[token] = bound
        expiry = dt.datetime.fromtimestamp(bound.expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": service_account, "namespace": namespace},
                "spec": {**spec, "expirationSeconds": seconds, "audiences": list(audiences)},
                "status": {"token": token, "expirationTimestamp": expiry}}

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        """A TokenReview: ``status.authenticated``, and ``user``/``audiences`` or ``error``."""
        spec = body.get("spec") or {}
        token = spec.get("token", "")
        wanted = tuple(spec.get("audiences") or ())
        status = self._status(token, wanted)
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                # kube-apiserver echoes the spec, token included (the client's model requires it)
                "metadata": {"creationTimestamp": None}, "spec": {"token": token, "audiences": list(wanted)},
                "status": status}

    def _status(self, token: str, wanted: tuple[str, ...]) -> dict[str, Any]:
        bound = self.tokens.get(token)
        if bound is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        if self.clock() > bound.expires:
            return {"authenticated": False, "error": "invalid bearer token, service account token has expired"}
        audiences = [a for a in bound.audiences if not wanted or a in wanted]
        if not audiences:
            return {"authenticated": False,
                    "error": f"invalid bearer token, token audiences {list(bound.audiences)} is invalid for the "
                             f"target audiences {list(wanted)}"}
        try:
            pod = self.store.get("Pod", bound.namespace, bound.pod)
        except ApiError:
            return {"authenticated": False,
                    "error": f"invalid bearer token, pod \"{bound.pod}\" not found"}
        if pod["metadata"].get("uid", "") != bound.pod_uid:
            return {"authenticated": False,
                    "error": f"invalid bearer token, pod \"{bound.pod}\" has been replaced (its UID changed)"}
        extra = {POD_NAME: [bound.pod], POD_UID: [bound.pod_uid], CREDENTIAL_ID: [f"JTI={bound.jti}"]}
        if bound.node:
            extra[NODE_NAME] = [bound.node]
        return {
            "authenticated": True,
            "user": {"username": f"system:serviceaccount:{bound.namespace}:{bound.service_account}",
                     "uid": f"sa-{bound.namespace}-{bound.service_account}",
                     "groups": ["system:serviceaccounts", f"system:serviceaccounts:{bound.namespace}",
                                "system:authenticated"],
                     "extra": extra},
            "audiences": audiences,
        }
