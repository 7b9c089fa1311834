"""The JWT stage (RFC 7519 tokens, RFC 6750 challenges) and the JWKS key cache behind it.

Kept apart from runtime/auth.py so that PyJWT and cryptography are imported only when a route
checks tokens. The decisions are policy/tokens.py's; this module adds the key cache and the
hold while a JWKS fetch is under way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from portico.config.security import Jwt
from portico.policy.tokens import (
    INVALID_TOKEN,
    KeySet,
    TokenError,
    bearer,
    claim_header,
    cookie_value,
    jwks_keys,
    remaining,
    unverified_header,
    verify,
)
from portico.runtime.authseam import (
    UNAVAILABLE,
    Fetcher,
    FetchResult,
    first_header,
    plain,
    strip_headers,
)
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import Hold, LocalReply, Resume, Stage

# Bytes of a JWKS document read at most: real ones are a few KiB.
MAX_JWKS = 256 * 1024
# A verified token is remembered (by its SHA-256) this many seconds at most, and never past
# its exp plus leeway nor past a change of the key set: a repeated token then costs a hash
# instead of PyJWT's parse and a signature check (148 us for RS256 here). Envoy's jwt_authn
# keeps the same kind of cache.
VERIFIED_TTL = 60.0
# Verified tokens kept at most (about 100 bytes each); emptied when full.
VERIFIED_MAX = 8192
# Requests waiting for one JWKS fetch at most; more get 503 at once.
MAX_WAITERS = 1024


class JwksSource:
    """Keys from a JWKS URL: fetched when first needed, again after ``ttl`` (the old keys
    serve meanwhile), and when a token names an unknown kid, at most once per
    ``min_refresh`` (a flood of made-up kids costs one fetch per interval, not one each).
    One fetch at a time; requests that need it wait on it together."""

    __slots__ = (
        "ca_file", "fetching", "generation", "keys", "last_attempt", "min_refresh", "next_fetch",
        "timeout", "ttl", "url", "waiters",
    )

    def __init__(
        self, url: str, ttl: float, min_refresh: float, timeout: float, ca_file: str | None
    ) -> None:
        self.url = url
        self.ca_file = ca_file
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.keys: KeySet | None = None
        self.generation = 0
        self.next_fetch = float("-inf")
        self.last_attempt = float("-inf")
        self.fetching = False
        self.waiters: list[Callable[[], None]] = []

    def may_refresh(self, now: float) -> bool:
        return now - self.last_attempt >= self.min_refresh

    def refresh(self, fetcher: Fetcher | None, now: float, then: Callable[[], None]) -> bool:
        """Fetch (or join the fetch under way); ``then`` runs when it ends. False: too many
        waiting, or no fetcher."""
        if fetcher is None or len(self.waiters) >= MAX_WAITERS:
            return False
        self.waiters.append(then)
        if self.fetching:
            return True
        self.fetching = True
        self.last_attempt = now

        def done(result: FetchResult | None) -> None:
            self.fetching = False
            if result is not None and result.status == 200:
                try:
                    self.keys = jwks_keys(result.body)
                    self.next_fetch = now + self.ttl
                    self.generation += 1  # tokens verified with the old set: check again
                except ValueError:
                    pass  # the old keys stay
            waiters, self.waiters = self.waiters, []
            for w in waiters:
                w()

        fetcher.request(
            self.url, b"GET", [(b"Accept", b"application/json")], self.timeout, MAX_JWKS, done,
            self.ca_file,
        )
        return True


class JwtAuth(Stage):
    __slots__ = (
        "cookie", "fetcher", "forward", "forward_names", "header", "is_authorization", "keys",
        "max_len", "missing", "realm", "source", "spec", "verified",
    )
    on_request_hook = True

    def __init__(
        self, spec: Jwt, keys: KeySet | None, source: JwksSource | None, fetcher: Fetcher | None
    ) -> None:
        self.spec = spec
        self.keys = keys
        self.source = source
        self.fetcher = fetcher
        # sha256(token) -> (good until, key generation, headers to add): see VERIFIED_TTL.
        self.verified: dict[bytes, tuple[float, int, Headers]] = {}
        self.header = spec.header.lower().encode()
        self.is_authorization = self.header == b"authorization"
        self.cookie = spec.cookie.encode() if spec.cookie else None
        self.max_len = int(spec.max_token_bytes)
        self.forward = [(h.encode(), c) for h, c in spec.forward_claims.items()]
        self.forward_names = frozenset(h.lower().encode() for h in spec.forward_claims)
        self.realm = b'realm="' + spec.realm.encode("latin-1", "replace") + b'"' if spec.realm \
            else b""
        # RFC 6750 3.1: no credentials at all -> a challenge without an error code.
        self.missing = plain(
            401, [(b"WWW-Authenticate", b"Bearer" + (b" " + self.realm if self.realm else b""))],
            b"Unauthorized\n",
        )

    def refuse(self, e: TokenError) -> LocalReply:
        parts = [self.realm] if self.realm else []
        parts.append(b'error="' + e.code + b'"')
        parts.append(b'error_description="' + e.description.encode("ascii", "replace") + b'"')
        reason = b"Forbidden\n" if e.status == 403 else b"Unauthorized\n"
        return plain(e.status, [(b"WWW-Authenticate", b"Bearer " + b", ".join(parts))], reason)

    def token(self, req: RequestState) -> bytes | None:
        headers = req.head.headers
        value = first_header(headers, self.header)
        if value is not None:
            return bearer(value) if self.is_authorization else (bearer(value) or value.strip())
        if self.cookie is not None:
            return cookie_value(headers, self.cookie)
        return None

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        head = req.head
        if self.forward_names:
            head.headers = strip_headers(head.headers, self.forward_names)
        token = self.token(req)
        if token is None:
            return self.missing
        if len(token) > self.max_len:
            return self.refuse(TokenError(INVALID_TOKEN, "token too large"))
        digest = hashlib.sha256(token).digest()
        hit = self.verified.get(digest)
        if hit is not None:
            source = self.source
            if hit[0] > req.now and hit[1] == (source.generation if source else 0):
                head.headers.extend(hit[2])
                return None
            del self.verified[digest]
        try:
            header = unverified_header(token)
        except TokenError as e:
            return self.refuse(e)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return self.refuse(TokenError(INVALID_TOKEN, "malformed token"))
        source = self.source
        if source is None:
            return self.finish(req, token, header, self.keys.find(kid) if self.keys else None)
        now = req.now
        key = source.keys.find(kid) if source.keys is not None else None
        if key is not None:
            if now >= source.next_fetch and not source.fetching and source.may_refresh(now):
                source.refresh(self.fetcher, now, lambda: None)  # refreshed in the background
            return self.finish(req, token, header, key)
        if not source.fetching and not source.may_refresh(now):
            # Fetched (or tried) too recently to ask again: no keys at all means the JWKS
            # endpoint is failing (503, like any unreachable dependency), else the kid is bad.
            if source.keys is None:
                return UNAVAILABLE
            return self.refuse(TokenError(INVALID_TOKEN, "unknown key"))

        def start(resume: Resume) -> None:
            def then() -> None:
                keys = source.keys
                if keys is None:
                    resume(UNAVAILABLE)  # never had keys: the JWKS endpoint is the problem
                else:
                    resume(self.finish(req, token, header, keys.find(kid)))

            if not source.refresh(self.fetcher, now, then):
                resume(UNAVAILABLE)

        return Hold(start=start)

    def finish(
        self, req: RequestState, token: bytes, header: dict[str, Any], key: Any
    ) -> LocalReply | None:
        if key is None:
            return self.refuse(TokenError(INVALID_TOKEN, "unknown key"))
        try:
            claims = verify(token, key, header, self.spec)
        except TokenError as e:
            return self.refuse(e)
        added: Headers = []
        for name, claim in self.forward:
            if claim in claims:
                value = claim_header(claims[claim])
                if value is not None:
                    added.append((name, value))
        req.head.headers.extend(added)
        left = remaining(claims, self.spec.leeway)
        ttl = VERIFIED_TTL if left is None else min(VERIFIED_TTL, left)
        if ttl > 0:
            if len(self.verified) >= VERIFIED_MAX:
                self.verified.clear()
            source = self.source
            generation = source.generation if source else 0
            self.verified[hashlib.sha256(token).digest()] = (req.now + ttl, generation, added)
        return None


