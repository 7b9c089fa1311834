"""The one configuration schema. Files, CLI flags and tests all validate through ``Config``.

Every model forbids unknown keys so a typo is an error with its key path, never a silent
default. Durations are seconds (float); sizes accept integers or strings such as ``"10MiB"``.
Value types live in ``config.types``; apps, autoscaling and discovery in ``config.apps``.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from portico.config.admin import Admin
from portico.config.apps import App, Autoscale, Discover, DockerRun
from portico.config.kube import KubeEndpoints, Kubernetes
from portico.config.routes import RequestId, Route
from portico.config.tls import BackendTls, Hsts, TlsListener, hsts_flag
from portico.config.traffic import (
    CONCURRENCY,
    IP_ALLOW,
    IP_DENY,
    RATE_LIMIT,
    AllowList,
    Concurrencies,
    RateLimits,
    Redis,
    Shed,
    TrafficTable,
)
from portico.config.types import (
    _TOKEN,
    ListenAddress,
    Network,
    NonNegSeconds,
    PositiveSeconds,
    Size,
    Strict,
)

__all__ = ["App", "Autoscale", "Discover", "DockerRun", "RequestId", "Route"]


class Limits(Strict):
    """Request size limits. Each one answers with its own status code."""

    max_request_line: int = Field(8192, gt=0, description="longest request target in bytes (414)")
    max_header_bytes: int = Field(
        32768, gt=0, description="largest request head, request line included (431)"
    )
    max_headers: int = Field(100, gt=0, description="most header fields in one request (431)")
    max_body_bytes: Size | None = Field(
        None, description="largest request body (413); unset means unlimited"
    )
    underscores_in_headers: bool = Field(
        False,
        description="pass header names with '_' on (dropped by default, as nginx does);"
        " one that reads as a forwarding header Portico sets is dropped anyway",
    )


class ClientTimeouts(Strict):
    header: PositiveSeconds = Field(10.0, description="time to receive a whole request head (408)")
    body_idle: PositiveSeconds = Field(
        30.0, description="longest pause inside a request body (408)"
    )
    body_min_rate: NonNegSeconds = Field(
        256.0, description="minimum request-body bytes/s once body_grace has passed; 0 disables"
    )
    body_grace: NonNegSeconds = Field(5.0, description="seconds before body_min_rate applies")
    keepalive: PositiveSeconds = Field(75.0, description="idle time allowed between requests")
    send: PositiveSeconds = Field(60.0, description="longest time a client may stall our writes")


class Server(Strict):
    listen: list[ListenAddress] = Field(default_factory=lambda: ["127.0.0.1:8080"])
    workers: int = Field(1, ge=1, le=256)
    backlog: int = Field(
        65535,
        gt=0,
        description="listen queue; the kernel caps it at net.core.somaxconn (4096 by default)",
    )
    pid_file: str | None = Field(
        None, description="file to write the main process id to (for `portico restart`)"
    )
    shutdown_grace: NonNegSeconds = Field(
        30.0, description="time in-flight requests get to finish on SIGTERM/Ctrl-C"
    )
    limits: Limits = Field(default_factory=Limits)
    timeouts: ClientTimeouts = Field(default_factory=ClientTimeouts)

    @field_validator("listen", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    # An empty list is refused by Config (it is fine when [[tls]] listeners are given).


class Forwarding(Strict):
    """How the proxy tells the backend who the client is."""

    x_forwarded: bool = Field(True, description="set X-Forwarded-For/-Proto/-Host and X-Real-IP")
    forwarded: bool = Field(False, description="set the RFC 7239 Forwarded header")
    via: bool = Field(False, description="add a Via header on requests and responses")
    via_name: str = Field("portico", description="name this proxy gives itself in Via headers")
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="networks whose forwarding headers are kept and appended to",
    )

    @field_validator("via_name")
    @classmethod
    def _http_token(cls, v: str) -> str:
        # It is written into a header as-is, so it must be an RFC 9110 token.
        if not _TOKEN.match(v):
            raise ValueError(f"{v!r} is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)")
        return v


class AccessLog(Strict):
    format: Literal["off", "common", "combined", "json"] = "off"
    path: str = Field("-", description="file to append to; '-' is standard output")


class Backend(Strict):
    url: str
    weight: int = Field(1, ge=1, le=1000)
    backup: bool = Field(False, description="takes traffic only when no primary is available")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not a URL (expected http://host:port)")  # or https://
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("not a URL: bad port") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a backend URL names a server only (no path, query or fragment)")
        return v

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or (443 if self.is_https else 80)

    @property
    def is_https(self) -> bool:
        return self.url.startswith("https:")


class UpstreamTimeouts(Strict):
    connect: PositiveSeconds = Field(5.0, description="TCP connect to a backend (504)")
    response_header: PositiveSeconds = Field(
        60.0, description="from request sent to complete response head (504)"
    )
    body_idle: PositiveSeconds = Field(
        60.0, description="longest pause inside a response body before the transfer is aborted"
    )


class Pool(Strict):
    max_idle: int = Field(64, ge=0, description="idle keep-alive connections kept per endpoint")
    idle_timeout: PositiveSeconds = Field(
        10.0, description="close an idle upstream connection after this long"
    )


class HealthCheck(Strict):
    """Active health checks: Portico asks each endpoint itself, on a timer."""

    path: str = Field("/health", description="request target of the check")
    method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    expect_status: str = Field("200-399", description="passing statuses, e.g. '200,204,300-399'")
    expect_body: str | None = Field(None, description="substring the body must contain")
    interval: PositiveSeconds = Field(5.0, description="time between checks of a healthy endpoint")
    unhealthy_interval: PositiveSeconds | None = Field(
        None, description="time between checks of an unhealthy endpoint; unset = interval"
    )
    jitter: float = Field(0.1, ge=0, le=1, description="random share added to each interval")
    timeout: PositiveSeconds = Field(2.0, description="a check slower than this fails")
    rise: int = Field(2, ge=1, description="consecutive passes that bring an endpoint UP")
    fall: int = Field(3, ge=1, description="consecutive failures that take an endpoint DOWN")
    host: str | None = Field(None, description="Host header of the check; unset = host:port")

    @field_validator("path")
    @classmethod
    def _origin_form(cls, v: str) -> str:
        if not v.startswith("/") or any(c in v for c in " \r\n"):
            raise ValueError("must be a path starting with '/' without spaces")
        return v

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, v: str) -> str:
        from portico.policy.health import parse_statuses

        parse_statuses(v)
        return v


class Outlier(Strict):
    """Passive health: eject endpoints that keep failing real requests."""

    consecutive_failures: int = Field(
        5, ge=0, description="failures in a row (connect error or 5xx) that eject; 0 = off"
    )
    base_ejection: PositiveSeconds = Field(
        30.0, description="first ejection time; the n-th ejection lasts n times as long"
    )
    max_ejection: PositiveSeconds = Field(300.0, description="cap on one ejection")
    max_ejection_percent: float = Field(
        50.0, ge=0, le=100, description="never eject more than this share of the upstream"
    )


class Retry(Strict):
    attempts: int = Field(3, ge=1, le=10, description="tries in all, the first included")
    on_status: list[int] = Field(
        default_factory=lambda: [502, 503, 504], description="statuses that are retried"
    )
    per_try_timeout: PositiveSeconds | None = Field(
        None, description="time to a response head per try; unset = timeouts.response_header"
    )
    budget_percent: float = Field(
        20.0, ge=0, le=100, description="retries may be at most this share of active requests"
    )
    budget_min: int = Field(
        3, ge=0, description="retries always allowed at once, whatever the share"
    )

    @field_validator("on_status")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for status in v:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return v


class Sticky(Strict):
    cookie: str = Field("portico_backend", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    max_age: PositiveSeconds | None = Field(None, description="cookie lifetime; unset = session")
    secret: str | None = Field(
        None,
        description="signing key; unset = random per start (cookies then do not survive restarts)",
    )


class Upstream(Strict):
    backends: list[Backend] = Field(default_factory=list)
    app: App | None = Field(None, description="instances Portico runs, instead of backends")
    discover: Discover | None = Field(
        None, description="endpoints found in Docker by labels, instead of backends"
    )
    kubernetes: KubeEndpoints | None = Field(
        None, description="endpoints from a Kubernetes Service's EndpointSlices, instead"
    )
    balancer: str = "round_robin"
    hash_key: str = Field(
        "client_ip",
        description="consistent_hash key: client_ip, path, uri, header:NAME or cookie:NAME",
    )
    host: str | None = Field(
        None, description="Host header sent upstream; unset passes the client's through"
    )
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    pool: Pool = Field(default_factory=Pool)
    health: HealthCheck | None = Field(None, description="active checks; unset = none")
    outlier: Outlier = Field(default_factory=Outlier)
    retry: Retry = Field(default_factory=Retry)
    sticky: Sticky | None = Field(None, description="sticky sessions by signed cookie")
    slow_start: NonNegSeconds = Field(
        0.0, description="seconds over which a newly healthy endpoint ramps to its full share"
    )
    shed: Shed | None = Field(
        None, description="load shedding when saturated; unset = requests queue at the app"
    )
    max_requests: int | None = Field(
        None, ge=1, description="circuit breaker: concurrent requests per endpoint (per worker)"
    )
    tls: BackendTls | None = Field(
        None, description="TLS to https:// backends (verify, CA, SNI name, client cert)"
    )

    @model_validator(mode="after")
    def _backends_or_app(self) -> Upstream:
        given = [k for k in ("backends", "app", "discover", "kubernetes") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of backends, app or discover, not {' and '.join(given)}")
        return self

    @field_validator("hash_key")
    @classmethod
    def _hash_key(cls, v: str) -> str:
        kind, _, name = v.partition(":")
        if v in ("client_ip", "path", "uri") or (kind in ("header", "cookie") and name):
            return v
        raise ValueError("must be client_ip, path, uri, header:NAME or cookie:NAME")

    @field_validator("backends", mode="before")
    @classmethod
    def _strings_are_urls(cls, v: object) -> object:
        if isinstance(v, list):
            return [{"url": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("balancer")
    @classmethod
    def _known_balancer(cls, v: str) -> str:
        from portico.policy.balancers import BALANCERS

        if v not in BALANCERS:
            raise ValueError(f"unknown balancer {v!r} (one of: {', '.join(sorted(BALANCERS))})")
        return v


class Config(Strict):
    server: Server = Field(default_factory=Server)
    forwarding: Forwarding = Field(default_factory=Forwarding)
    access_log: AccessLog = Field(default_factory=AccessLog)
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    request_id: RequestId | None = Field(
        None, description="X-Request-ID handling; unset = off (no ID is generated)"
    )
    # Traffic control for every route, before each route's own (config.traffic).
    rate_limit: RateLimits = Field(default_factory=list, description=RATE_LIMIT)
    concurrency: Concurrencies = Field(default_factory=list, description=CONCURRENCY)
    ip_allow: AllowList = Field(None, description=IP_ALLOW)
    ip_deny: list[Network] = Field(default_factory=list, description=IP_DENY)
    redis: Redis | None = Field(None, description="the store of store = \"redis\" limits")
    traffic: TrafficTable = Field(default_factory=TrafficTable)
    # TLS (config.tls): HTTPS listeners, the HTTPS redirect and HSTS for every route.
    tls: list[TlsListener] = Field(default_factory=list, description="HTTPS listeners")
    https_redirect: bool = Field(
        False,
        description="answer every plain-HTTP request with 308 to https:// (ACME challenges"
        " under /.well-known/acme-challenge/ excepted)",
    )
    hsts: Hsts | None = Field(None, description="Strict-Transport-Security on HTTPS responses")

    @field_validator("hsts", mode="before")
    @classmethod
    def _hsts_flag(cls, v: object) -> object:
        return hsts_flag(v)
    kubernetes: Kubernetes = Field(
        default_factory=Kubernetes, description="reaching the cluster, leader election"
    )
    admin: Admin | None = Field(None, description="admin listener: API, dashboard, metrics")

    @field_validator("request_id", mode="before")
    @classmethod
    def _request_id_flag(cls, v: object) -> object:
        # `request_id = true` is the short form of `[request_id]` with defaults.
        if v is True:
            return {}
        if v is False:
            return None
        return v

    @model_validator(mode="after")
    def _routes_name_upstreams(self) -> Config:
        # Cross-key checks name their own key paths, one "path: reason" per line, so that
        # portico.config.load can report each where it belongs. All of them are collected
        # rather than stopping at the first, so one `portico check` run shows every one.
        problems: list[str] = []
        if not self.server.listen and not self.tls:
            problems.append("server.listen: at least one listen address is needed")
        if not self.upstreams:
            problems.append("upstreams: at least one upstream is needed")
        for i, route in enumerate(self.routes):
            keys = (["upstream"] if route.upstream else []) + [
                f"split[{j}].upstream" for j in range(len(route.split or ()))
            ]
            if route.mirror is not None:
                keys.append("mirror.upstream")
            if route.static is not None and route.static.fallback_upstream:
                keys.append("static.fallback_upstream")
            for key, name in zip(keys, route.upstream_names(), strict=True):
                if self.upstreams and name not in self.upstreams:
                    known = ", ".join(sorted(self.upstreams))
                    problems.append(
                        f"routes[{i}].{key}: no upstream named {name!r} (have: {known})"
                    )
        if self.redis is None:
            if any(rl.store == "redis" for rl in self.rate_limit):
                problems.append("rate_limit: store = \"redis\" needs a [redis] section")
            for i, route in enumerate(self.routes):
                if any(rl.store == "redis" for rl in route.rate_limit):
                    problems.append(
                        f"routes[{i}].rate_limit: store = \"redis\" needs a [redis] section"
                    )
        if not self.routes and len(self.upstreams) > 1:
            problems.append("routes: several upstreams need routes saying which gets what")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def effective_routes(self) -> list[Route]:
        """The configured routes, or a catch-all to the only upstream."""
        if self.routes:
            return list(self.routes)
        (name,) = self.upstreams
        return [Route(upstream=name)]
