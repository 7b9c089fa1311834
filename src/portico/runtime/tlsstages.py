"""Stages TLS adds to a route's chain: the HTTPS redirect and Strict-Transport-Security.

``HttpsRedirect`` answers a request that came over plain HTTP with 308 to the same URL on
``https://`` (308 keeps the method and body, unlike 301), except ACME HTTP-01 challenges,
which must be answered over plain HTTP (RFC 8555 8.3). A request from a trusted proxy that
says ``X-Forwarded-Proto: https`` already came over HTTPS (a load balancer terminated it) and
is not redirected, or it would loop. ``Hsts`` adds the header to HTTPS responses only: RFC
6797 7.2 says a host must not send it over plain HTTP.
"""

from __future__ import annotations

from portico.config.model import Config, Route
from portico.config.tls import Hsts as HstsConfig
from portico.config.types import parse_hostport
from portico.runtime.request import Headers, RequestState, Template
from portico.runtime.stages import LocalReply, Stage

ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_HTTPS = b"https"


def _came_over_https(req: RequestState) -> bool:
    if req.scheme == _HTTPS:
        return True
    if req.peer_trusted:
        for name, value in req.head.headers:
            if name.lower() == b"x-forwarded-proto":
                return value.strip().lower() == _HTTPS
    return False


class ChallengeTokens:
    """ACME HTTP-01 answers this process serves: token -> key authorization. One per
    process (``HTTP01``), written by ``control.acme`` directly (one process) or by the worker
    that receives them from the master over the bus; read by ``AcmeHttp01``."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens: dict[bytes, bytes] = {}


HTTP01 = ChallengeTokens()


class AcmeHttp01(Stage):
    """Answers ``/.well-known/acme-challenge/TOKEN`` for a pending ACME order (RFC 8555
    8.3); any other path, or an unknown token, goes on down the chain."""

    __slots__ = ("table",)
    on_request_hook = True

    def __init__(self, table: ChallengeTokens) -> None:
        self.table = table

    def on_request(self, req: RequestState) -> LocalReply | None:
        path = req.path
        if not path.startswith(ACME_CHALLENGE_PREFIX):
            return None
        answer = self.table.tokens.get(path[len(ACME_CHALLENGE_PREFIX) :])
        if answer is None:
            return None
        return LocalReply(200, [(b"Content-Type", b"application/octet-stream")], answer)


class HttpsRedirect(Stage):
    __slots__ = ("location",)
    on_request_hook = True

    def __init__(self, port: int) -> None:
        authority = "{hostname}" if port == 443 else "{hostname}:" + str(port)
        self.location = Template("https://" + authority + "{path}{query}")

    def on_request(self, req: RequestState) -> LocalReply | None:
        if _came_over_https(req) or req.path.startswith(ACME_CHALLENGE_PREFIX):
            return None
        return LocalReply(
            308,
            [(b"Location", self.location.render(req)), (b"Content-Type", b"text/plain")],
            b"",
        )


class Hsts(Stage):
    __slots__ = ("value",)
    on_response_hook = True

    def __init__(self, config: HstsConfig) -> None:
        self.value = config.value().encode("ascii")

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        if _came_over_https(req):
            headers.append((b"Strict-Transport-Security", self.value))


def https_port(config: Config) -> int:
    """Where the redirect sends clients: the first TLS listener's port (443 without one)."""
    for listener in config.tls:
        return parse_hostport(listener.listen[0])[1]
    return 443


def tls_stages(config: Config, route: Route) -> list[Stage]:
    """The TLS stages of one route, in chain order; empty when TLS asks nothing of it."""
    stages: list[Stage] = []
    if any(
        t.auto is not None and t.auto.issuer == "acme" and t.auto.challenge == "http-01"
        for t in config.tls
    ):
        stages.append(AcmeHttp01(HTTP01))
    if config.https_redirect:
        stages.append(HttpsRedirect(https_port(config)))
    hsts = route.hsts if route.hsts is not None else config.hsts
    if hsts is not None:
        stages.append(Hsts(hsts))
    return stages


def stripped_request_headers(config: Config) -> frozenset[bytes] | None:
    """Client-certificate headers Portico sets: a client's own are dropped on every
    listener, so a plain-HTTP client cannot pose as a verified one."""
    names: set[bytes] = set()
    for listener in config.tls:
        auth = listener.client_auth
        if auth is not None:
            for name in (auth.subject_header, auth.fingerprint_header):
                if name:
                    names.add(name.lower().encode("ascii"))
    return frozenset(names) or None

