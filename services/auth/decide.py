"""Who a verified ServiceAccount token is, and what it may do on the bus: the auth service's pure core.

Input: the server's authorization request (its claims, already verified) and the Kubernetes TokenReview
status of the token the client presented. Output: the node whose applier it is, or the reason it is
refused. Kubernetes puts a bound pod token's node in ``user.extra["authentication.kubernetes.io/node-name"]``
(Kubernetes >= 1.30, ``ServiceAccountTokenPodNodeInfo``); the TokenReview itself (signature, expiry, the
pod still existing) is the API server's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class ApplierPolicy:
    """Which ServiceAccount appliers run as, and the audience their projected token is for."""

    namespace: str = "kipvs-system"
    service_account: str = "kipvs-applier"
    audience: str = "kipvs-nats"

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass(frozen=True)
class Verdict:
    node: str = ""
    reason: str = ""  # why it is refused; empty when node is set


def token_of(request: dict[str, Any]) -> str:
    """The token the client sent in CONNECT (``auth_token``); empty when it sent none."""
    return str(((request.get("nats") or {}).get("connect_opts") or {}).get("auth_token") or "")


def judge(review_status: dict[str, Any], policy: ApplierPolicy) -> Verdict:
    """Accept a token the API server authenticated, for the audience, as the applier ServiceAccount, from a
    pod on a known node; anything else is refused with the reason."""
    if not review_status.get("authenticated"):
        error = review_status.get("error") or "not authenticated"
        return Verdict(reason=f"the Kubernetes API rejected the token: {error}")
    audiences = review_status.get("audiences") or []
    if audiences and policy.audience not in audiences:
        return Verdict(reason=f"the token is for {audiences}, not for {policy.audience!r}")
    user = review_status.get("user") or {}
    if user.get("username") != policy.username:
        return Verdict(reason=f"{user.get('username') or 'an unnamed user'} is not the applier ServiceAccount "
                              f"({policy.username})")
    nodes = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or []
    if len(nodes) != 1 or not nodes[0]:
        return Verdict(reason="the token names no node (a pod-bound projected token from Kubernetes >= 1.30 is "
                              "needed: it carries authentication.kubernetes.io/node-name)")
    return Verdict(node=str(nodes[0]))
