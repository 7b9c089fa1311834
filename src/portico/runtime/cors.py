"""The CORS stage: answers preflights itself, adds CORS headers to every other response.

It runs right after IP rules and before rate limits and authentication (docs/security.md,
"Stage order"): a preflight carries no credentials by design (Fetch standard), so an
authentication stage that saw it would refuse it and the browser would never send the real
request. A route with CORS owns its CORS headers: the upstream's own ``Access-Control-*``
headers are removed from the responses, so the two cannot disagree.
"""

from __future__ import annotations

from portico.config.security import Cors as CorsConfig
from portico.policy.cors import CorsPolicy
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import LocalReply, Stage

_OWNED = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
    }
)


def _header(headers: Headers, lname: bytes) -> bytes | None:
    for n, v in headers:
        if len(n) == len(lname) and n.lower() == lname:
            return v
    return None


def is_preflight(req: RequestState) -> bool:
    head = req.head
    return (
        head.method == b"OPTIONS"
        and _header(head.headers, b"origin") is not None
        and _header(head.headers, b"access-control-request-method") is not None
    )


def add_vary(headers: Headers, token: bytes) -> None:
    """Add ``token`` to Vary (one header, merged), unless it is already named or ``*``."""
    for i, (n, v) in enumerate(headers):
        if n.lower() == b"vary":
            names = [t.strip().lower() for t in v.split(b",")]
            if token.lower() in names or b"*" in names:
                return
            headers[i] = (n, v + b", " + token if v.strip() else token)
            return
    headers.append((b"Vary", token))


class Cors(Stage):
    __slots__ = ("policy", "refused")
    on_request_hook = True
    on_response_hook = True

    def __init__(self, config: CorsConfig) -> None:
        c = config
        self.policy = CorsPolicy(
            c.origins, c.methods, c.headers, c.credentials, c.max_age, c.expose_headers
        )
        # A refused preflight: no CORS headers at all, so the browser blocks the request.
        self.refused = LocalReply(
            403, [(b"Vary", b"Origin"), (b"Content-Type", b"text/plain; charset=utf-8")],
            b"CORS preflight refused\n",
        )

    def on_request(self, req: RequestState) -> LocalReply | None:
        head = req.head
        if head.method != b"OPTIONS":
            return None
        headers = head.headers
        origin = _header(headers, b"origin")
        method = _header(headers, b"access-control-request-method")
        if origin is None or method is None:
            return None  # a plain OPTIONS request: not a preflight, on to auth like any other
        asked = _header(headers, b"access-control-request-headers") or b""
        allowed = self.policy.preflight(origin, method.strip(), asked)
        if allowed is None:
            return self.refused
        vary = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        return LocalReply(204, [*allowed, (b"Vary", vary)])

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        if req.head.method == b"OPTIONS" and is_preflight(req):
            return  # answered by on_request, with its own headers
        headers[:] = [(n, v) for n, v in headers if n.lower() not in _OWNED]
        add_vary(headers, b"Origin")
        origin = _header(req.head.headers, b"origin")
        if origin is not None:
            headers.extend(self.policy.actual(origin))
