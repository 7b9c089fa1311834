"""The security schema of a route: ``auth`` (basic, JWT or forward auth) and ``cors``.

Everything that can be judged from the file alone is judged here, so ``portico check`` and a
reload refuse it with the key path: an htpasswd file with a hash kind Portico will not
accept, a JWT algorithm list naming ``none``, a JWKS URL over plain HTTP to a remote host, a
CORS policy that allows every origin with credentials. See docs/security.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from portico.config.htpasswd import HtpasswdError, parse_htpasswd
from portico.config.types import _TOKEN, PositiveSeconds, Size, Strict

# Algorithms a JWT may be signed with. ``none`` is never one of them (refused by name, see
# Jwt._algorithms); the HMAC family needs a secret, the others a public key.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name (an HTTP token)")
    return name


# Headers the auth stages may not write upstream: framing, connection management and the
# forwarding headers belong to the codec and the forwarding section (an auth service that
# could set Transfer-Encoding or Content-Length on the upstream request could smuggle).
_RESERVED = frozenset(
    {
        "connection", "content-length", "transfer-encoding", "te", "trailer", "upgrade",
        "keep-alive", "proxy-connection", "host", "expect", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "via",
    }
)


def _upstream_header(name: str) -> str:
    _header_name(name)
    if name.lower() in _RESERVED:
        raise ValueError(f"{name}: managed by Portico (framing, connection or forwarding)")
    return name


def _readable_file(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"{path!r}: must be an absolute path")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path!r} is not readable")
    return path


def _installed(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the {module} package is not installed (pip install 'portico[auth]')")


def loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Basic(Strict):
    """HTTP basic authentication against an htpasswd file of bcrypt or argon2 hashes."""

    htpasswd: str = Field(description="absolute path of the file; re-read when it changes")
    realm: str = Field("Restricted", description="named in WWW-Authenticate")
    user_header: str | None = Field(
        None, description="header that carries the authenticated user upstream (client copies "
        "are removed)"
    )

    @field_validator("htpasswd")
    @classmethod
    def _entries(cls, v: str) -> str:
        _readable_file(v)
        try:
            with open(v, "rb") as f:
                users = parse_htpasswd(f.read())
        except HtpasswdError as e:
            raise ValueError(f"{v}: {e}") from None
        for kind, module in (("bcrypt", "bcrypt"), ("argon2", "argon2")):
            if any(k == kind for k, _ in users.values()):
                _installed(module)
        return v

    @field_validator("realm")
    @classmethod
    def _realm(cls, v: str) -> str:
        if any(c in v for c in '"\\\r\n\0'):
            raise ValueError("a realm may not contain quotes, backslashes or line breaks")
        return v

    @field_validator("user_header")
    @classmethod
    def _user_header(cls, v: str | None) -> str | None:
        return None if v is None else _upstream_header(v)


class Jwt(Strict):
    """Bearer tokens (RFC 6750) checked at the gateway with PyJWT."""

    algorithms: list[str] = Field(description="accepted alg values, e.g. [\"RS256\"]")
    secret_file: str | None = Field(None, description="HS*: file holding the shared secret")
    key_file: str | None = Field(None, description="a PEM public key or a JWKS (JSON) file")
    jwks_url: str | None = Field(None, description="JWKS endpoint; https unless on loopback")
    jwks_cache: PositiveSeconds = Field(
        300.0, description="seconds a fetched JWKS is used before it is fetched again"
    )
    jwks_min_refresh: PositiveSeconds = Field(
        10.0, description="at most one fetch per this many seconds for an unknown kid"
    )
    jwks_timeout: PositiveSeconds = Field(5.0, description="a JWKS fetch gives up after")
    jwks_ca_file: str | None = Field(
        None, description="PEM CA bundle the JWKS server's certificate is checked against "
        "(default: the system's)"
    )
    issuer: str | list[str] | None = Field(None, description="iss must be (one of) this")
    audience: str | list[str] | None = Field(None, description="aud must contain (one of) this")
    required_claims: list[str] = Field(
        default_factory=list, description="claims that must be present (exp, sub, ...)"
    )
    claims: dict[str, str] = Field(
        default_factory=dict, description="claim -> value it must equal (or a list contain)"
    )
    leeway: float = Field(0.0, ge=0, le=600, description="clock skew allowed on exp/nbf/iat")
    header: str = Field("Authorization", description="header with `Bearer <token>`")
    cookie: str | None = Field(None, description="cookie the token is read from otherwise")
    forward_claims: dict[str, str] = Field(
        default_factory=dict, description="header -> claim sent upstream (client copies removed)"
    )
    max_token_bytes: Size = Field(
        8192,  # type: ignore[assignment]
        description="longer tokens are refused before any parsing",
    )
    realm: str | None = Field(None, description="named in WWW-Authenticate")

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        _installed("jwt")
        _installed("cryptography")
        if not v:
            raise ValueError("name at least one algorithm")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError(
                    "'none' is refused: an unsigned token would prove nothing (CVE-2015-9235)"
                )
            if alg not in HMAC_ALGORITHMS | KEY_ALGORITHMS:
                known = ", ".join(sorted(HMAC_ALGORITHMS | KEY_ALGORITHMS))
                raise ValueError(f"{alg!r} is not supported (one of: {known})")
        return v

    @field_validator("secret_file", "key_file", "jwks_ca_file")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        return None if v is None else _readable_file(v)

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL")
        if u.scheme == "http" and not loopback_host(u.hostname):
            raise ValueError(
                f"{v!r}: keys fetched over plain http could be swapped on the way; "
                "use https (http is allowed on loopback only)"
            )
        return v

    @field_validator("header", "cookie")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else _header_name(v)

    @field_validator("forward_claims")
    @classmethod
    def _forward(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            _upstream_header(name)
        return v

    @model_validator(mode="after")
    def _keys(self) -> Jwt:
        sources = [k for k in ("secret_file", "key_file", "jwks_url") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of secret_file, key_file or jwks_url"
                + (f", not {' and '.join(sources)}" if sources else "")
            )
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and self.secret_file is None:
            raise ValueError(f"algorithms: {hmac[0]} needs secret_file")
        if self.secret_file is not None and len(hmac) != len(self.algorithms):
            # One secret for HMAC and a public key for others would let a public key be
            # used as an HMAC secret (the algorithm-confusion attack): one family only.
            raise ValueError("algorithms: with secret_file, only HS256/HS384/HS512")
        path = self.secret_file or self.key_file
        if path is not None:
            with open(path, "rb") as f:
                data = f.read()
            key = "secret_file" if self.secret_file else "key_file"
            if (why := _key_problem(data, self.secret_file is not None)) is not None:
                raise ValueError(f"{key}: {path}: {why}")
        return self


# An HMAC secret shorter than its hash output is refused (RFC 7518 3.2 asks for at least
# that many bytes; PyJWT warns about shorter ones).
MIN_SECRET = 32


def _key_problem(data: bytes, secret: bool) -> str | None:
    """Why a key file cannot serve, or None."""
    if secret:
        if len(data.strip()) < MIN_SECRET:
            return f"an HMAC secret needs at least {MIN_SECRET} bytes (RFC 7518 3.2)"
        return None
    if data.lstrip().startswith(b"{"):
        import json

        from jwt import PyJWKSet, PyJWTError

        try:
            if not PyJWKSet.from_dict(json.loads(data)).keys:
                return "the JWKS has no usable key"
        except (ValueError, PyJWTError) as e:
            return f"not a usable JWKS: {e}"
        return None
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        return f"not a PEM public key or a JWKS ({e})"
    return None


class Forward(Strict):
    """A subrequest to an auth service decides (nginx auth_request, Traefik forwardAuth)."""

    url: str = Field(description="the auth service; asked with the original method")
    request_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Cookie"],
        description="client headers copied to the subrequest",
    )
    response_headers: list[str] = Field(
        default_factory=list,
        description="auth response headers copied to the upstream request on 2xx",
    )
    timeout: PositiveSeconds = Field(5.0, description="no answer in time: 503 (fails closed)")
    ca_file: str | None = Field(
        None, description="PEM CA bundle for an https url (default: the system's)"
    )

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: str | None) -> str | None:
        return None if v is None else _readable_file(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL")
        if u.query or u.fragment:
            raise ValueError(f"{v!r}: no query or fragment (the original URI is sent in headers)")
        return v

    @field_validator("request_headers")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            _header_name(name)
        return v

    @field_validator("response_headers")
    @classmethod
    def _upstream_names(cls, v: list[str]) -> list[str]:
        for name in v:
            _upstream_header(name)
        return v


class Auth(Strict):
    """One kind of authentication per route."""

    basic: Basic | None = None
    jwt: Jwt | None = None
    forward: Forward | None = None

    @model_validator(mode="after")
    def _one(self) -> Auth:
        kinds = [k for k in ("basic", "jwt", "forward") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of basic, jwt or forward"
                + (f", not {' and '.join(kinds)}" if kinds else "")
            )
        return self


_WILDCARD = re.compile(r"^(https?)://\*\.([A-Za-z0-9.-]+)(:\d+)?$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d+)?$|^https?://\[[0-9A-Fa-f:.]+\](:\d+)?$")


class Cors(Strict):
    """Cross-origin resource sharing, answered by the gateway (see docs/security.md)."""

    origins: list[str] = Field(
        description="exact (https://app.example), wildcard (https://*.example.com), "
        "regex (~^https://.*$) or '*'"
    )
    methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        description="methods a preflight may ask for",
    )
    headers: list[str] = Field(
        default_factory=lambda: ["Accept", "Content-Type", "Authorization"],
        description="request headers a preflight may ask for; '*' = any",
    )
    credentials: bool = Field(False, description="allow cookies and Authorization")
    max_age: int = Field(600, ge=0, le=86400, description="seconds a browser keeps a preflight")
    expose_headers: list[str] = Field(
        default_factory=list, description="response headers the page may read"
    )

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one origin")
        for o in v:
            if o == "*":
                continue
            if o.startswith("~"):
                try:
                    re.compile(o[1:])
                except re.error as e:
                    raise ValueError(f"invalid regex {o[1:]!r}: {e}") from None
                continue
            if not (_WILDCARD.match(o) or _ORIGIN.match(o)):
                raise ValueError(
                    f"{o!r} is not an origin (scheme://host[:port], no path), "
                    "a *.wildcard, a ~regex or '*'"
                )
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if not _TOKEN.match(m):
                raise ValueError(f"{m!r} is not a method (an HTTP token)")
        return [m.upper() for m in v]

    @field_validator("headers", "expose_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if name != "*":
                _header_name(name)
        return v

    @model_validator(mode="after")
    def _star_and_credentials(self) -> Cors:
        if self.credentials and "*" in self.origins:
            raise ValueError(
                "origins: '*' with credentials = true is refused: browsers reject it, and "
                "answering every origin with credentials would let any site act as the user"
            )
        return self


AuthKind = Literal["basic", "jwt", "forward"]
