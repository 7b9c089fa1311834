"""JWT checks (RFC 7519 with RFC 6750's error codes), pure apart from PyJWT reading the
wall clock for ``exp``/``nbf``/``iat``.

A token is refused before any parsing when it is longer than the route allows, and parsing
is PyJWT's: base64url and JSON of a bounded string, then one signature check with the key
its ``kid`` names. The algorithm comes from the route's list, never from the token alone: a
token whose ``alg`` is not in the list is refused, and a key is only ever used with its own
family (so an RSA public key can never serve as an HMAC secret).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from portico.config.security import HMAC_ALGORITHMS, Jwt

INVALID_REQUEST = b"invalid_request"
INVALID_TOKEN = b"invalid_token"
INSUFFICIENT_SCOPE = b"insufficient_scope"


class TokenError(Exception):
    """Why a token is refused: the RFC 6750 error code, a description and the status."""

    def __init__(self, code: bytes, description: str, status: int = 401) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status


def bearer(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == b"cookie":
            for part in v.split(b";"):
                k, eq, val = part.strip().partition(b"=")
                if eq and k == name:
                    return val.strip(b'"') or None
    return None


class KeySet:
    """The keys a route accepts: kid -> key, and the key used when a token names none."""

    __slots__ = ("by_kid", "only")

    def __init__(self, by_kid: Mapping[str, Any], only: Any = None) -> None:
        self.by_kid = dict(by_kid)
        self.only = only if only is not None else (
            next(iter(self.by_kid.values())) if len(self.by_kid) == 1 else None
        )

    def find(self, kid: str | None) -> Any:
        if kid is None:
            return self.only
        return self.by_kid.get(kid)


def jwks_keys(data: bytes) -> KeySet:
    """A KeySet from JWKS JSON; keys of unusable types are skipped (PyJWKSet does)."""
    try:
        doc = json.loads(data)
        keyset = PyJWKSet.from_dict(doc)
    except (ValueError, jwt.PyJWTError) as e:
        raise ValueError(f"not a usable JWKS: {e}") from None
    by_kid = {k.key_id: k for k in keyset.keys if k.key_id is not None}
    only = keyset.keys[0] if len(keyset.keys) == 1 else None
    return KeySet(by_kid, only)


def file_keys(data: bytes, algorithms: Sequence[str]) -> KeySet:
    """A KeySet from a key file: an HMAC secret, a PEM public key, or JWKS JSON."""
    if all(a in HMAC_ALGORITHMS for a in algorithms):
        return KeySet({}, data.strip())
    if data.lstrip().startswith(b"{"):
        return jwks_keys(data)
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return KeySet({}, load_pem_public_key(data))
    except ValueError as e:
        raise ValueError(f"not a PEM public key or a JWKS: {e}") from None


def unverified_header(token: bytes) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError(INVALID_TOKEN, "malformed token") from None


def verify(token: bytes, key: Any, header: Mapping[str, Any], spec: Jwt) -> dict[str, Any]:
    """The token's claims, or TokenError."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in spec.algorithms:
        raise TokenError(INVALID_TOKEN, "algorithm not accepted")
    if (
        isinstance(key, PyJWK)
        and key.algorithm_name != alg
        and not _same_family(key.algorithm_name, alg)
    ):
        raise TokenError(INVALID_TOKEN, "key does not match the algorithm")
    options: Any = {"require": list(spec.required_claims)}
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=spec.audience,
            issuer=spec.issuer,
            leeway=spec.leeway,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(INVALID_TOKEN, "token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError(INVALID_TOKEN, "token not valid yet") from None
    except jwt.InvalidAudienceError:
        raise TokenError(INVALID_TOKEN, "wrong audience") from None
    except jwt.InvalidIssuerError:
        raise TokenError(INVALID_TOKEN, "wrong issuer") from None
    except jwt.MissingRequiredClaimError as e:
        raise TokenError(INVALID_TOKEN, f"missing claim {e.claim}") from None
    except jwt.InvalidSignatureError:
        raise TokenError(INVALID_TOKEN, "bad signature") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError(INVALID_TOKEN, "invalid token") from None
    for name, want in spec.claims.items():
        got = claims.get(name)
        ok = want in got if isinstance(got, list) else (got is not None and str(got) == want)
        if not ok:
            raise TokenError(INSUFFICIENT_SCOPE, f"claim {name} not allowed", 403)
    return claims


def lifetime(claims: Mapping[str, Any], leeway: float, wall_now: float) -> float | None:
    """Seconds the token stays acceptable (its exp plus leeway), None without an exp."""
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    return float(exp) + leeway - wall_now


def remaining(claims: Mapping[str, Any], leeway: float) -> float | None:
    """``lifetime`` now, by the same wall clock PyJWT judged ``exp`` with a moment ago."""
    return lifetime(claims, leeway, time.time())


def _same_family(key_alg: str, alg: str) -> bool:
    # A JWK's "alg" is optional; PyJWK then guesses one from its kty/crv (RS256 for RSA, ES256
    # for P-256): any algorithm of the same key type is fine.
    return key_alg[:2] == alg[:2] or {key_alg[:2], alg[:2]} <= {"RS", "PS"}


def claim_header(value: Any) -> bytes | None:
    """A claim as a header value; None when it cannot be one safely."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    data = text.encode("utf-8")
    if any(b < 0x20 or b == 0x7F for b in data):
        return None  # no CR/LF (or other controls) into a header: the claim is not sent
    return data
