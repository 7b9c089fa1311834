"""The traffic-control schema: rate limits, concurrency limits, IP rules, the shared store.

Each of these may be set on a route and at the top level of the config (then it applies to
every route, in addition to the route's own). Keys name what a limit counts by:
``client_ip`` (after trusted-proxy resolution), ``host``, ``path``, ``route``, ``method``,
``header:NAME`` or ``cookie:NAME``; a list of them counts by the combination.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from portico.config.types import _TOKEN, Network, NonNegSeconds, PositiveSeconds, Strict

KEY_KINDS = ("client_ip", "host", "path", "route", "method")
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def _check_key(v: str | list[str]) -> str | list[str]:
    parts = [v] if isinstance(v, str) else v
    if not parts:
        raise ValueError("name at least one key")
    for part in parts:
        kind, sep, name = part.partition(":")
        if not sep and kind in KEY_KINDS:
            continue
        if sep and kind in ("header", "cookie") and name and _TOKEN.match(name):
            continue
        raise ValueError(
            f"unknown key {part!r} (one of: {', '.join(KEY_KINDS)}, header:NAME, cookie:NAME)"
        )
    return v


class RateLimit(Strict):
    """GCRA: ``rate`` requests per ``per``, and up to ``burst`` at once."""

    key: str | list[str] = Field("client_ip", description="what is counted (see above)")
    rate: float = Field(gt=0, description="requests allowed per `per`")
    per: Literal["second", "minute", "hour", "day"] | PositiveSeconds = Field(
        "second", description="the period of `rate`: second, minute, hour, day or seconds"
    )
    burst: int = Field(1, ge=1, description="requests a key may send at once")
    delay: NonNegSeconds = Field(
        0.0,
        description="hold a request over the limit up to this long until it conforms "
        "(nginx delay) instead of refusing it; 0 = refuse at once",
    )
    status: int = Field(429, ge=400, le=599, description="status of a refused request")
    exempt: list[Network] = Field(default_factory=list, description="client networks not limited")
    headers: bool = Field(True, description="send RateLimit-Policy and RateLimit headers")
    store: Literal["local", "redis"] = Field(
        "local", description="local: this gateway (all its workers); redis: every gateway"
    )

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | list[str]) -> str | list[str]:
        return _check_key(v)

    @property
    def period(self) -> float:
        return _PERIODS[self.per] if isinstance(self.per, str) else float(self.per)


class Concurrency(Strict):
    """At most ``max`` requests in flight per key (``limit_conn`` by request, not socket)."""

    key: str | list[str] = Field("client_ip", description="what is counted (see rate_limit)")
    max: int = Field(ge=1, description="requests in flight per key")
    status: int = Field(503, ge=400, le=599, description="status of a refused request")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | list[str]) -> str | list[str]:
        return _check_key(v)


class Shed(Strict):
    """Load shedding for a saturated upstream (see policy.admission)."""

    max_in_flight: int = Field(
        ge=1, description="requests in flight per available endpoint (per worker) that saturate"
    )
    hold: NonNegSeconds = Field(
        1.0, description="longest wait for room while instances are starting"
    )
    low_share: float = Field(
        0.8, gt=0, le=1, description="share of capacity routes of shed_priority < 0 may use"
    )
    retry_after: int = Field(1, ge=1, description="Retry-After of a shed request (seconds)")
    max_p95: PositiveSeconds | None = Field(
        None,
        description="latency objective: while the upstream's p95 response time (last 50"
        " responses, per worker) is above it, max_in_flight is halved",
    )


class Redis(Strict):
    """The store shared by several gateways for ``store = "redis"`` limits."""

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or unix:// URL")
    timeout: PositiveSeconds = Field(
        0.05, description="a decision slower than this follows `on_error`"
    )
    on_error: Literal["open", "closed"] = Field(
        "open", description="Redis down or slow: open = admit, closed = refuse (503)"
    )
    prefix: str = Field("portico:rl:", description="key prefix in Redis")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v


class TrafficTable(Strict):
    """The gateway's own limiter state (shared memory across workers)."""

    max_keys: int = Field(
        1 << 20, ge=64, description="rate-limit keys remembered at most (16 bytes each)"
    )
    max_concurrency_keys: int = Field(
        1 << 16, ge=64, description="concurrency-limit keys counted at most"
    )
    max_connections: int | None = Field(
        None, ge=1, description="open client connections at most (all workers); unset = no cap"
    )
    max_connections_per_ip: int | None = Field(
        None, ge=1, description="open connections per client address; unset = no cap"
    )


def _one_or_many(v: object) -> object:
    if v is None:
        return []
    return [v] if isinstance(v, dict) else v


def _not_empty(v: list[str] | None) -> list[str] | None:
    if v is not None and not v:
        raise ValueError("an empty list would refuse everyone; leave it unset")
    return v


# The four keys a route and the top level share. They are declared in both schemas (not
# inherited) so each schema lists its keys in the order its table reads.
RateLimits = Annotated[list[RateLimit], BeforeValidator(_one_or_many)]
Concurrencies = Annotated[list[Concurrency], BeforeValidator(_one_or_many)]
AllowList = Annotated[list[Network] | None, AfterValidator(_not_empty)]
RATE_LIMIT = "one table or a list of them (e.g. per second and per minute)"
CONCURRENCY = "one table or a list of them"
IP_ALLOW = "only these client networks get through (403 for others)"
IP_DENY = "client networks refused with 403 (wins over allow)"


class TrafficRules(Protocol):
    """What a route and the top level have in common (runtime.traffic reads these)."""

    @property
    def rate_limit(self) -> list[RateLimit]: ...
    @property
    def concurrency(self) -> list[Concurrency]: ...
    @property
    def ip_allow(self) -> list[str] | None: ...
    @property
    def ip_deny(self) -> list[str]: ...


def uses_redis(rules: list[TrafficRules]) -> bool:
    return any(rl.store == "redis" for r in rules for rl in r.rate_limit)
