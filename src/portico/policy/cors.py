"""CORS decisions (the Fetch standard's CORS protocol), pure: an origin and request headers
in, response headers out. The stage (runtime/cors.py) does the rest.

Origins are matched three ways: exact (``https://app.example``, compared case-insensitively
on scheme and host as browsers serialize them lowercase), wildcard subdomains
(``https://*.example.com``: any depth of subdomain, never the bare domain, never a lookalike
such as ``evil-example.com``) and regex (``~...``, matched against the whole origin).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The longest Origin header value considered; longer ones are not an origin a browser sends.
MAX_ORIGIN = 1024


class CorsPolicy:
    __slots__ = (
        "any_header",
        "any_origin",
        "credentials",
        "exact",
        "expose",
        "header_set",
        "max_age",
        "method_list",
        "methods",
        "regexes",
        "wildcards",
    )

    def __init__(
        self,
        origins: Sequence[str],
        methods: Sequence[str],
        headers: Sequence[str],
        credentials: bool,
        max_age: int,
        expose: Sequence[str],
    ) -> None:
        self.any_origin = "*" in origins
        self.exact = frozenset(
            o.lower().encode() for o in origins if o != "*" and not o.startswith("~")
            and "://*." not in o
        )
        wild: list[tuple[bytes, bytes, bytes]] = []
        for o in origins:
            if "://*." in o:
                scheme, _, rest = o.partition("://*.")
                host, colon, port = rest.partition(":")
                wild.append((
                    scheme.lower().encode() + b"://",
                    b"." + host.lower().encode(),
                    (b":" + port.encode()) if colon else b"",
                ))
        self.wildcards = tuple(wild)
        self.regexes = tuple(re.compile(o[1:].encode()) for o in origins if o.startswith("~"))
        self.methods = frozenset(m.encode() for m in methods)
        self.method_list = b", ".join(m.encode() for m in methods)
        self.any_header = "*" in headers
        self.header_set = frozenset(h.lower().encode() for h in headers if h != "*")
        self.credentials = credentials
        self.max_age = b"%d" % max_age
        self.expose = b", ".join(h.encode() for h in expose)

    def allowed(self, origin: bytes) -> bool:
        if len(origin) > MAX_ORIGIN or origin == b"null":
            return False  # "null" is what sandboxed pages and file: URLs send: never trusted
        if self.any_origin:
            return True
        low = origin.lower()
        if low in self.exact:
            return True
        for scheme, suffix, port in self.wildcards:
            if not low.startswith(scheme):
                continue
            hostport = low[len(scheme):]
            host = hostport[: len(hostport) - len(port)] if port else hostport
            if port and not hostport.endswith(port):
                continue
            if not port and b":" in hostport:
                continue
            if host.endswith(suffix) and len(host) > len(suffix) and b"/" not in host:
                return True
        return any(rx.fullmatch(origin) for rx in self.regexes)

    def allow_origin_value(self, origin: bytes) -> bytes:
        # "*" only when any origin is allowed without credentials; otherwise the origin
        # itself, so the browser can tell which one was allowed (and caches by Vary: Origin).
        return b"*" if self.any_origin and not self.credentials else origin

    def preflight(
        self, origin: bytes, method: bytes, request_headers: bytes
    ) -> list[tuple[bytes, bytes]] | None:
        """The headers of a successful preflight answer, or None: refuse it."""
        if not self.allowed(origin):
            return None
        if method not in self.methods:
            return None
        asked = [h.strip().lower() for h in request_headers.split(b",") if h.strip()]
        if not self.any_header and any(h not in self.header_set for h in asked):
            return None
        out = [
            (b"Access-Control-Allow-Origin", self.allow_origin_value(origin)),
            (b"Access-Control-Allow-Methods", self.method_list),
        ]
        if asked:
            # The asked names, echoed: a '*' answer would not cover Authorization, and with
            # credentials '*' is not a wildcard at all.
            out.append((b"Access-Control-Allow-Headers", b", ".join(asked)))
        if self.credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        out.append((b"Access-Control-Max-Age", self.max_age))
        return out

    def actual(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """The headers added to the response of an actual (non-preflight) request."""
        if not self.allowed(origin):
            return []
        out = [(b"Access-Control-Allow-Origin", self.allow_origin_value(origin))]
        if self.credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        if self.expose:
            out.append((b"Access-Control-Expose-Headers", self.expose))
        return out
