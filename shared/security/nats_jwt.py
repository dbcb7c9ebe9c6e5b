"""NATS JWTs (nats-io/jwt v2), the few kipvs needs: decode and verify the server's authorization request,
encode the authorization response and the user JWT it carries. No Python NATS-JWT library exists.

Format (nats-io/jwt v2 ``claims.go``, ``header.go``): ``base64url(header) "." base64url(claims) "."
base64url(signature)``, without padding; the header is ``{"typ":"JWT","alg":"ed25519-nkey"}``; the
signature is Ed25519 by the issuer's NKEY over ``header "." claims``; ``iss`` is the issuer's public NKEY,
``iat`` seconds since the epoch, ``jti`` the unpadded base32 of SHA-512/256 over the JSON of the standard
claims with ``jti`` empty. Claim types and prefixes follow ``authorization_claims.go`` and
``user_claims.go``: a request is issued by a server key (``N...``), a response and a user JWT by an
account key (``A...``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Any

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
VERSION = 2
AUTH_REQUEST_AUDIENCE = "nats-authorization-request"  # nats-server's AuthRequestSubject
_PREFIX = {"N": nkeys.PREFIX_BYTE_SERVER, "A": nkeys.PREFIX_BYTE_ACCOUNT, "U": nkeys.PREFIX_BYTE_USER}


class JwtError(Exception):
    """Not a NATS JWT, not signed by its issuer, or not of the expected kind; the message says which."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_bytes(public: str, kind: str) -> bytes:
    """The raw Ed25519 key in a public NKEY of ``kind`` (N, A or U); JwtError when it is not one."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise JwtError(f"{public[:8]}... is not an NKEY") from None
    if len(raw) != 35 or raw[0] != _PREFIX[kind]:
        raise JwtError(f"{public[:8]}... is not a public {kind} NKEY")
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise JwtError(f"{public[:8]}... has a bad checksum")
    return raw[1:-2]


def _jti(claims: dict[str, Any]) -> str:
    # ClaimsData's fields, in nats-io/jwt's order, as Go's encoding/json writes them (omitempty).
    base = {k: claims[k] for k in ("aud", "exp", "iat", "iss", "name", "nbf", "sub") if claims.get(k)}
    data = json.dumps(base, separators=(",", ":")).encode()
    return base64.b32encode(hashlib.new("sha512_256", data).digest()).rstrip(b"=").decode()


def encode(claims: dict[str, Any], signer: nkeys.KeyPair, now: float | None = None) -> str:
    """Sign ``claims`` (``sub``, ``nats`` ...) as ``signer``: sets ``iss``, ``iat`` and ``jti``."""
    body = dict(claims)
    body["iss"] = signer.public_key.decode()
    body["iat"] = int(now if now is not None else time.time())
    body.pop("jti", None)
    body["jti"] = _jti(body)
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode(token: str, issuer_kind: str, now: float | None = None) -> dict[str, Any]:
    """The claims of a JWT signed by its ``iss``, which must be a public NKEY of ``issuer_kind``; JwtError
    when it is malformed, its signature does not verify, or it has expired."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (three base64url parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise JwtError("not a JWT (bad base64url or JSON)") from None
    if header.get("alg") != HEADER["alg"]:
        raise JwtError(f"JWT algorithm {header.get('alg')!r}, expected {HEADER['alg']!r}")
    issuer = claims.get("iss", "")
    key = Ed25519PublicKey.from_public_bytes(public_key_bytes(str(issuer), issuer_kind))
    try:
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature:
        raise JwtError("JWT signature does not verify against its issuer") from None
    exp = claims.get("exp")
    if exp and (now if now is not None else time.time()) > exp:
        raise JwtError("JWT has expired")
    return claims


def user_claims(user_nkey: str, account: str, name: str, permissions: dict[str, Any], expires: int) -> dict[str, Any]:
    """A user JWT's claims (nats-io/jwt v2 ``UserClaims``): ``aud`` places the user in ``account`` (server
    configuration mode), ``permissions`` are ``pub``/``sub``/``resp`` as in ``Permissions.jwt_claims``;
    no limits on subscriptions or payload (-1, as nats-io/jwt's ``NoLimit``)."""
    return {
        "sub": user_nkey, "aud": account, "name": name, "exp": int(expires),
        "nats": {**permissions, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": VERSION},
    }


def response_claims(user_nkey: str, server_id: str, user_jwt: str = "", error: str = "") -> dict[str, Any]:
    """An authorization response (``AuthorizationResponseClaims``): for the user key the server chose,
    addressed to that server; exactly one of ``user_jwt`` and ``error``."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": VERSION}
    if user_jwt:
        nats["jwt"] = user_jwt
    else:
        nats["error"] = error or "not authorized"
    return {"sub": user_nkey, "aud": server_id, "nats": nats}
