"""Authentication stages: basic (htpasswd), JWT and forward auth, built once per config.

Each stage decides from values and answers 401 (or the auth service's answer) with a
``LocalReply``; what needs I/O (a slow password hash, a JWKS fetch, the forward-auth
subrequest) returns ``Hold(start=...)`` and the data plane does the work through the two
small seams below (``Fetcher``, ``Offload``), resuming the request when the answer comes.
The stores (htpasswd files, JWKS caches, verified credentials) are kept across reloads in
``SecurityStores``, so a reload does not forget fetched keys or make every user pay a
bcrypt check again. Without a fetcher or offload (``portico check``), the stages fail
closed: 503 for what needs I/O, inline checks for passwords.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from portico.config.htpasswd import HtpasswdError, parse_htpasswd
from portico.config.security import Auth, Basic, Forward
from portico.policy.credentials import VerifiedCache, check_password, dummy_hash, parse_basic
from portico.runtime.authseam import (
    UNAVAILABLE,
    Fetcher,
    FetchResult,
    Offload,
    first_header,
    plain,
    strip_headers,
)
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import Hold, LocalReply, Resume, Stage

if TYPE_CHECKING:
    from portico.runtime.jwtauth import JwksSource


@dataclass
class SecurityStores:
    fetcher: Fetcher | None = None
    offload: Offload | None = None
    htpasswd: dict[str, HtpasswdFile] = field(default_factory=dict)
    jwks: dict[tuple[str, float, float, float, str | None], JwksSource] = field(
        default_factory=dict
    )


# --- basic ------------------------------------------------------------------------------

# Seconds between two stat() calls on an htpasswd file: changes show within this, and a
# busy route costs one stat a second, not one per request.
HTPASSWD_CHECK = 1.0


class HtpasswdFile:
    """An htpasswd file, re-read when its inode, size or mtime changes. A bad new version
    is not taken: the old users stay, and ``error`` says why (shown by the gateway's log)."""

    __slots__ = (
        "cache", "checking", "dummy", "error", "next_check", "path", "signature", "users",
        "version",
    )

    def __init__(self, path: str) -> None:
        self.path = path
        self.users: dict[bytes, tuple[str, bytes]] = {}
        self.signature: tuple[int, int, int] | None = None
        self.version = 0
        self.next_check = float("-inf")
        self.error: str | None = None
        self.cache = VerifiedCache()
        # Checks under way, by credential digest: requests with the same credentials wait for
        # the one check (a browser opens several connections at once with the same login).
        self.checking: dict[bytes, list[Callable[[bool], None]]] = {}
        self.dummy = dummy_hash()

    def current(self, now: float) -> dict[bytes, tuple[str, bytes]]:
        if now >= self.next_check:
            self.next_check = now + HTPASSWD_CHECK
            self._refresh()
        return self.users

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self.signature:
                return
            with open(self.path, "rb") as f:
                users = parse_htpasswd(f.read())
        except (OSError, HtpasswdError) as e:
            self.error = f"{self.path}: {e} (the previous users stay)"
            return
        self.signature = signature
        self.users = users
        self.version += 1
        self.error = None


class BasicAuth(Stage):
    __slots__ = ("challenge", "file", "offload", "user_header", "user_lname")
    on_request_hook = True

    def __init__(self, config: Basic, file: HtpasswdFile, offload: Offload | None) -> None:
        self.file = file
        self.offload = offload
        realm = config.realm.encode("latin-1", "replace")
        self.challenge = plain(
            401,
            [(b"WWW-Authenticate", b'Basic realm="' + realm + b'", charset="UTF-8"')],
            b"Unauthorized\n",
        )
        self.user_header = config.user_header.encode() if config.user_header else None
        self.user_lname = self.user_header.lower() if self.user_header else b""

    def _accept(self, req: RequestState, user: bytes) -> None:
        if self.user_header is not None:
            head = req.head
            head.headers = [(n, v) for n, v in head.headers if n.lower() != self.user_lname]
            head.headers.append((self.user_header, user))

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        if self.user_header is not None:
            # Whatever happens next, a client's own copy never goes up.
            lname = self.user_lname
            req.head.headers = [(n, v) for n, v in req.head.headers if n.lower() != lname]
        value = first_header(req.head.headers, b"authorization")
        creds = parse_basic(value) if value is not None else None
        if creds is None:
            return self.challenge
        user, password = creds
        file = self.file
        now = req.now
        users = file.current(now)
        cache = file.cache
        digest = cache.digest(user, password)
        version = file.version
        if cache.hit(digest, version, now):
            self._accept(req, user)
            return None
        kind, hashed = users.get(user) or file.dummy
        known = user in users

        def check() -> bool:
            return check_password(kind, hashed, password) and known

        offload = self.offload
        if offload is None:
            ok = check()
            if ok:
                cache.remember(digest, version, now)
                self._accept(req, user)
            return None if ok else self.challenge

        def start(resume: Resume) -> None:
            def answer(ok: bool) -> None:
                if ok:
                    self._accept(req, user)
                    resume(None)
                else:
                    resume(self.challenge)

            waiting = file.checking.get(digest)
            if waiting is not None:
                waiting.append(answer)
                return

            def done(ok: bool) -> None:
                if ok:
                    cache.remember(digest, version, now)
                for waiter in file.checking.pop(digest, ()):
                    waiter(ok)

            file.checking[digest] = [answer]
            if not offload.run(check, done):
                del file.checking[digest]
                resume(UNAVAILABLE)  # too many checks waiting: shed rather than queue forever

        return Hold(start=start)


# --- forward auth -------------------------------------------------------------------------

# Bytes of an auth service's answer kept (its body goes to the client on a refusal).
MAX_AUTH_BODY = 64 * 1024
# Headers of a refusal not passed to the client: framing and connection are the gateway's.
_HOP = frozenset(
    {
        b"connection", b"content-length", b"transfer-encoding", b"keep-alive", b"te",
        b"trailer", b"upgrade", b"proxy-connection", b"date", b"server",
    }
)


class ForwardAuth(Stage):
    __slots__ = (
        "ca_file", "copy_in", "copy_out", "copy_out_names", "fetcher", "host", "timeout", "url",
    )
    on_request_hook = True

    def __init__(self, config: Forward, fetcher: Fetcher | None) -> None:
        self.url = config.url
        self.host = (urlsplit(config.url).netloc or "").encode()
        self.copy_in = frozenset(h.lower().encode() for h in config.request_headers)
        self.copy_out = [h.encode() for h in config.response_headers]
        self.copy_out_names = frozenset(h.lower() for h in self.copy_out)
        self.timeout = config.timeout
        self.ca_file = config.ca_file
        self.fetcher = fetcher

    def subrequest_headers(self, req: RequestState) -> Headers:
        head = req.head
        out: Headers = [(n, v) for n, v in head.headers if n.lower() in self.copy_in]
        out += [
            (b"X-Forwarded-Method", head.method),
            (b"X-Forwarded-Proto", req.scheme),
            (b"X-Forwarded-Host", req.host or b""),
            (b"X-Forwarded-Uri", req.target),
            (b"X-Original-URI", req.target),
            (b"X-Original-Method", head.method),
            (b"X-Forwarded-For", req.client_ip.encode()),
        ]
        return out

    def on_request(self, req: RequestState) -> Hold | LocalReply:
        fetcher = self.fetcher
        if fetcher is None:
            return UNAVAILABLE
        head = req.head
        if self.copy_out_names:
            head.headers = strip_headers(head.headers, self.copy_out_names)
        sub = self.subrequest_headers(req)

        def start(resume: Resume) -> None:
            def done(result: FetchResult | None) -> None:
                if result is None:
                    resume(UNAVAILABLE)  # failing or slow: closed, never open
                elif 200 <= result.status < 300:
                    for name in self.copy_out:
                        lname = name.lower()
                        for n, v in result.headers:
                            if n.lower() == lname:
                                head.headers.append((name, v))
                    resume(None)
                else:
                    kept = [(n, v) for n, v in result.headers if n.lower() not in _HOP]
                    resume(LocalReply(result.status, kept, result.body))

            fetcher.request(
                self.url, head.method, sub, self.timeout, MAX_AUTH_BODY, done, self.ca_file
            )

        return Hold(start=start)


# --- compiling ----------------------------------------------------------------------------


def auth_stages(auth: Auth | None, stores: SecurityStores) -> Sequence[Stage]:
    """The route's authentication stage, or nothing."""
    if auth is None:
        return ()
    if auth.basic is not None:
        path = auth.basic.htpasswd
        file = stores.htpasswd.get(path)
        if file is None:
            file = stores.htpasswd[path] = HtpasswdFile(path)
        file.next_check = float("-inf")  # a reload looks at the file again at once
        return (BasicAuth(auth.basic, file, stores.offload),)
    if auth.jwt is not None:
        # Imported here: PyJWT and cryptography load only when a route checks tokens.
        from portico.policy.tokens import file_keys
        from portico.runtime.jwtauth import JwksSource, JwtAuth

        spec = auth.jwt
        if spec.jwks_url is not None:
            k = (
                spec.jwks_url, spec.jwks_cache, spec.jwks_min_refresh, spec.jwks_timeout,
                spec.jwks_ca_file,
            )
            source = stores.jwks.get(k)
            if source is None:
                source = stores.jwks[k] = JwksSource(*k)
            return (JwtAuth(spec, None, source, stores.fetcher),)
        key_path = spec.secret_file or spec.key_file
        assert key_path is not None
        with open(key_path, "rb") as f:
            keys = file_keys(f.read(), spec.algorithms)
        return (JwtAuth(spec, keys, None, stores.fetcher),)
    assert auth.forward is not None
    return (ForwardAuth(auth.forward, stores.fetcher),)
