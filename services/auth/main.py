"""``kipvs auth``: the NATS auth callout that gives each node's applier its own identity.

nats-server (``authorization { auth_callout { ... } }``) sends every client that is not one of the static
role users here, as a signed authorization-request JWT on ``$SYS.REQ.USER.AUTH``. An applier connects with
its pod's projected ServiceAccount token (audience ``kipvs-nats``); this service

1. verifies the request's signature (a server key) and audience;
2. asks the Kubernetes API whether the token is valid (TokenReview), for the applier ServiceAccount;
3. reads the node from the review (``authentication.kubernetes.io/node-name``);
4. answers with a user JWT, signed by the callout issuer key, holding that node's permissions only
   (``shared.security.nats_permissions.applier``), expiring no later than the token (and ``--user-jwt-ttl``).

Anything else is refused, with the reason in the answer (the server logs it) and in this service's log.
Tokens are never logged. Upstream: docs.nats.io "Auth Callout", nats-server ``server/auth_callout.go``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import nkeys
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from shared.contract import topology
from shared.security import nats_credentials, nats_jwt
from shared.security import nats_permissions as perms
from shared.service import config, runtime
from shared.service.config import StartupError, describe
from shared.service.kube_client import api_client

from .decide import ApplierPolicy, judge, token_of

log = logging.getLogger("kipvs.auth")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"


class AuthConfig(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    kubeconfig: Annotated[str, describe("kubeconfig file; empty: in-cluster config, else ~/.kube/config")] = ""
    issuer_nkey_file: Annotated[str, describe(
        "the callout issuer's account NKEY seed (signs the user JWTs); empty: the embedded server's")] = ""
    applier_namespace: Annotated[str, describe("namespace of the appliers' ServiceAccount")] = "kipvs-system"
    applier_service_account: Annotated[str, describe("the appliers' ServiceAccount")] = "kipvs-applier"
    token_audience: Annotated[str, describe("audience the appliers' projected tokens are for")] = "kipvs-nats"
    user_jwt_ttl: Annotated[float, describe(
        "longest life of an applier's identity, seconds (never past its token's expiry); at its end the server "
        "closes the applier's connection and the applier connects again with its token read again (values "
        "below a minute are for tests: each end costs a reconnect and a restart of the applier's consumer)"),
        msgspec.Meta(ge=2), config.SECONDS] = 3600.0


def _token_expiry(token: str) -> float | None:
    """A Kubernetes token's ``exp`` when it is a JWT (the TokenReview has verified it); None when opaque."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        exp = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))).get("exp")
    except (ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


# (token, audience) -> the TokenReview's status as JSON; raises ApiException / OSError when it cannot ask
Review = Callable[[str, str], Awaitable[dict[str, Any]]]


def token_reviewer(api: client.ApiClient) -> Review:
    """TokenReview through the Kubernetes API (RBAC: ``create`` on ``tokenreviews``)."""
    reviews = client.AuthenticationV1Api(api)

    async def review(token: str, audience: str) -> dict[str, Any]:
        answer = await reviews.create_token_review(client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[audience])))
        return api.sanitize_for_serialization(answer.status) or {}
    return review


class Callout:
    """Answers authorization requests; one per service."""

    def __init__(self, issuer: nkeys.KeyPair, review: Review, policy: ApplierPolicy, ttl: float) -> None:
        self.issuer = issuer
        self.review = review
        self.policy = policy
        self.ttl = ttl
        self.authorized = 0
        self.refused = 0

    async def answer(self, data: bytes) -> bytes:
        """The signed response to one request; b"" when the request itself is not a valid server request
        (the server then refuses the client: nothing can be addressed to it)."""
        try:
            request = nats_jwt.decode(data.decode(errors="replace"), "N")
        except nats_jwt.JwtError as exc:
            log.error("ignored an authorization request that is not a server's: %s", exc)
            return b""
        nats = request.get("nats") or {}
        user_nkey = str(nats.get("user_nkey", ""))
        server_id = str((nats.get("server_id") or {}).get("id", ""))
        client_info = nats.get("client_info") or {}
        who = f"{client_info.get('name') or 'a client'} from {client_info.get('host', '?')}"
        if request.get("aud") != nats_jwt.AUTH_REQUEST_AUDIENCE or server_id != request.get("iss"):
            log.error("ignored an authorization request with audience %r from %s", request.get("aud"), server_id)
            return b""
        user_jwt, reason = await self._decide(request, user_nkey)
        if user_jwt:
            self.authorized += 1
        else:
            self.refused += 1
            log.warning("refused %s: %s", who, reason)
        return nats_jwt.encode(nats_jwt.response_claims(user_nkey, server_id, user_jwt, reason), self.issuer).encode()

    async def _decide(self, request: dict[str, Any], user_nkey: str) -> tuple[str, str]:
        token = token_of(request)
        if not token:
            return "", ("no credentials: static roles use their NKEY, an applier its ServiceAccount token "
                        "(--nats-token-file)")
        try:
            status = await self.review(token, self.policy.audience)
        except (TimeoutError, ApiException, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            return "", f"cannot verify the token now (TokenReview failed: {reason}); retry"
        verdict = judge(status, self.policy)
        if not verdict.node:
            return "", verdict.reason
        node = verdict.node
        try:
            topology.token(node)
        except ValueError as exc:
            return "", f"node name from the token: {exc}"
        expires = time.time() + self.ttl
        token_expiry = _token_expiry(token)
        if token_expiry is not None:
            expires = min(expires, token_expiry)
        pod = ((status.get("user") or {}).get("extra") or {}).get("authentication.kubernetes.io/pod-name", ["?"])[0]
        claims = nats_jwt.user_claims(user_nkey, perms.ACCOUNT, perms.applier_durable(node),
                                      perms.applier(node).jwt_claims(), int(expires))
        log.info("authorized the applier of node %s (pod %s) until %s", node, pod,
                 time.strftime("%H:%M:%SZ", time.gmtime(expires)))
        return nats_jwt.encode(claims, self.issuer), ""


def issuer_key(cfg: AuthConfig) -> nkeys.KeyPair:
    path = Path(cfg.issuer_nkey_file) if cfg.issuer_nkey_file else \
        runtime.state_dir(cfg) / nats_credentials.AUTH_DIR / nats_credentials.ISSUER
    try:
        seed = nats_credentials.read_seed(path)
    except nats_credentials.CredentialsError as exc:
        raise StartupError(f"{exc} (--issuer-nkey-file)") from None
    if not seed.startswith(b"SA"):
        raise StartupError(f"{path} is not an account NKEY seed (it starts with 'SA'): the callout issuer is one")
    return nkeys.from_seed(seed)


async def serve(ctx: runtime.ServiceContext) -> None:
    cfg = ctx.config
    assert isinstance(cfg, AuthConfig)
    api = await api_client(cfg.kubeconfig)
    policy = ApplierPolicy(cfg.applier_namespace, cfg.applier_service_account, cfg.token_audience)
    callout = Callout(issuer_key(cfg), token_reviewer(api), policy, cfg.user_jwt_ttl)
    decisions = ctx.metrics.counter("kipvs_auth_decisions_total", "authorization requests answered, by result",
                                    labels={"result": ("authorized", "refused")})

    async def handle(msg: Any) -> None:
        before = callout.authorized
        try:
            answer = await callout.answer(msg.data)
        except Exception:
            log.exception("failed to answer an authorization request")
            return
        decisions.labels("authorized" if callout.authorized > before else "refused").inc()
        if answer:
            await msg.respond(answer)

    running: set[asyncio.Task] = set()

    async def on_request(msg: Any) -> None:
        if not msg.reply or msg.reply.startswith("$JS."):
            # a stream's message pushed here by a consumer a node made with this deliver_subject (nats-server
            # does not check the creator's rights on it), not the server's request: nothing to answer, and no
            # task and no error line per message of that stream
            return
        # one task per request: a slow TokenReview must not hold up the other nodes' connections
        task = asyncio.create_task(handle(msg))
        running.add(task)
        task.add_done_callback(running.discard)

    # one queue group: with several replicas each request is answered once
    sub = await ctx.nc.subscribe(AUTH_SUBJECT, queue="kipvs-auth", cb=on_request)
    log.info("answering NATS authorization requests for the appliers of ServiceAccount %s (audience %s)",
             policy.username, policy.audience)
    ctx.set_ready()
    try:
        await ctx.stop.wait()
    finally:
        await sub.unsubscribe()
        await api.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, AuthConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(AuthConfig, vars(args))
    issuer_key(cfg)  # a wrong key is a user's mistake: say so before waiting on NATS
    asyncio.run(runtime.run_service("auth", cfg, serve))
    return 0
