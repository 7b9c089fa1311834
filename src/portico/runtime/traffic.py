"""Traffic-control stages: IP rules, rate limits and concurrency limits, compiled per route.

They run first in a route's chain (after the request ID), in the order safety needs: IP
rules (cheapest, and a denied client should not even spend a rate-limit token), then rate
limits, then concurrency limits (which hold a slot until the request finishes). The top-level
rules of the config come before the route's own in each stage.

Decisions are made by ``policy.ratelimit`` against a ``LimitTable`` (this gateway's state,
shared by its workers) or, for ``store = "redis"``, by a ``RemoteLimiter`` the gateway
provides: the stage then returns a ``Hold`` and the request waits for Redis's answer
without blocking any other request.
"""

from __future__ import annotations

import ipaddress
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from portico.config.traffic import Concurrency, RateLimit, TrafficRules, TrafficTable
from portico.config.traffic import Redis as RedisConfig
from portico.policy.admission import HOLD, SHED, LatencyWindow, ShedRule, admit
from portico.policy.ratelimit import (
    DELAY,
    REJECT,
    Limit,
    remaining,
    reset_after,
    retry_after,
)
from portico.runtime.auth import SecurityStores
from portico.runtime.limittable import LimitTable, key_hash, table_bytes
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import Hold, LocalReply, Stage

if TYPE_CHECKING:
    from portico.runtime.stages import Resume

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[IPNetwork, ...]
KeyFn = Callable[[RequestState], bytes | None]
Verdict = tuple[int, float, float]  # (ALLOW|DELAY|REJECT, tat, wait)


class RemoteLimiter(Protocol):
    """A store shared by several gateways (dataplane.redislimit). ``check`` answers through
    ``done`` with one verdict per key, or None when the store failed or was too slow; all
    keys are decided at once, and none is charged when one refuses."""

    def check(
        self,
        keys: Sequence[bytes],
        limits: Sequence[Limit],
        done: Callable[[list[Verdict] | None], None],
    ) -> None: ...


def _header(name: str) -> KeyFn:
    lname = name.lower().encode("latin-1")
    n = len(lname)

    def get(req: RequestState) -> bytes | None:
        for hname, value in req.head.headers:
            if len(hname) == n and hname.lower() == lname:
                return value
        return None

    return get


def _cookie(name: str) -> KeyFn:
    want = name.encode("latin-1")

    def get(req: RequestState) -> bytes | None:
        for hname, value in req.head.headers:
            if len(hname) == 6 and hname.lower() == b"cookie":
                for part in value.split(b";"):
                    k, eq, v = part.strip().partition(b"=")
                    if eq and k == want:
                        return v
        return None

    return get


def _key_part(spec: str) -> KeyFn:
    kind, _, name = spec.partition(":")
    if kind == "client_ip":
        return lambda r: r.client_ip.encode("ascii", "replace")
    if kind == "host":
        return lambda r: r.hostname.lower()
    if kind == "path":
        return lambda r: r.path
    if kind == "route":
        return lambda r: r.route.name.encode() if r.route is not None else b""
    if kind == "method":
        return lambda r: r.head.method
    if kind == "header":
        return _header(name)
    if kind == "cookie":
        return _cookie(name)
    raise ValueError(f"unknown key kind {spec!r}")  # the schema refuses these first


def compile_key(spec: str | list[str]) -> KeyFn:
    """A request's key, or None when a part is missing (the limit then does not apply,
    as in nginx, where an empty key is not counted)."""
    parts = [_key_part(p) for p in ([spec] if isinstance(spec, str) else spec)]
    if len(parts) == 1:
        return parts[0]

    def joined(req: RequestState) -> bytes | None:
        out = []
        for part in parts:
            value = part(req)
            if value is None:
                return None
            out.append(value)
        return b"\0".join(out)

    return joined


def _networks(items: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in items)


def _in(ip: str, nets: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False  # a Unix socket peer is in no network
    return any(addr in net for net in nets)


def _plain(status: int, headers: Headers, text: bytes, refusal: str) -> LocalReply:
    return LocalReply(
        status, [(b"Content-Type", b"text/plain; charset=utf-8"), *headers], text, refusal
    )


# --- IP rules ------------------------------------------------------------------------------


class IpRules(Stage):
    """``ip_deny`` then ``ip_allow``, for each layer (top level, then route): 403 on a miss."""

    __slots__ = ("layers", "reply")
    on_request_hook = True

    def __init__(self, layers: Sequence[tuple[Networks | None, Networks]]) -> None:
        self.layers = tuple(layers)
        self.reply = _plain(403, [], b"Forbidden\n", "ip_rule")

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        try:
            addr = ipaddress.ip_address(req.client_ip)
        except ValueError:
            addr = None
        for allow, deny in self.layers:
            if addr is None:
                if allow is not None:
                    return self.reply
                continue
            for net in deny:
                if addr in net:
                    return self.reply
            if allow is not None and not any(addr in net for net in allow):
                return self.reply
        return None


# --- rate limits ---------------------------------------------------------------------------


# RateLimit header values kept per rule: (remaining, reset) pairs repeat, at most burst x
# a few reset values each; bounded for huge bursts.
STATE_CACHE = 4096


def _sf_string(text: str) -> bytes:
    return b'"' + text.replace("\\", "").replace('"', "").encode("ascii", "replace") + b'"'


class RateRule:
    """One configured rate limit, compiled: its key, its GCRA parameters, its replies."""

    __slots__ = (
        "cache",
        "exempt",
        "headers",
        "key",
        "label",
        "limit",
        "policy",
        "prefix",
        "status",
    )

    def __init__(self, config: RateLimit, scope: str, index: int) -> None:
        self.limit = Limit(config.rate, config.period, config.burst, config.delay)
        self.key = compile_key(config.key)
        # The state's identity: the same limit in the next config keeps its counts, a changed
        # one starts afresh; a top-level limit is one budget across all routes.
        ident = f"{scope}|{index}|{config.key}|{config.rate:g}/{config.period:g}|{config.burst}"
        self.prefix = ident.encode() + b"\0"
        self.exempt = _networks(config.exempt)
        self.status = config.status
        self.headers = config.headers
        self.label = _sf_string(f"{scope}.{index}" if scope != "*" else f"global.{index}")
        window = config.period
        self.policy = self.label + b";q=%d;w=%d" % (int(config.rate), max(1, round(window)))
        self.cache: dict[tuple[int, int], Headers] = {}

    def key_of(self, req: RequestState) -> bytes | None:
        if self.exempt and _in(req.client_ip, self.exempt):
            return None
        k = self.key(req)
        return None if k is None else self.prefix + k

    def state(self, left: int, tat: float, now: float) -> bytes:
        """The ``RateLimit`` value; the few distinct ones are formatted once and kept."""
        return self.pair(left, tat, now)[1][1]

    def pair(self, left: int, tat: float, now: float) -> Headers:
        """Both headers for a request this rule alone allowed, from the cache when it can."""
        key = (left, reset_after(tat, now))
        value = self.cache.get(key)
        if value is None:
            state = self.label + b";r=%d;t=%d" % key
            value = [(b"RateLimit-Policy", self.policy), (b"RateLimit", state)]
            if len(self.cache) < STATE_CACHE:
                self.cache[key] = value
        return value


class _RateStage(Stage):
    """Shared by the local and the remote rate-limit stages: verdicts in, a reply out."""

    __slots__ = ("policy", "rules")
    on_request_hook = True
    on_response_hook = True  # adds the RateLimit headers when the request left some

    def __init__(self, rules: Sequence[RateRule]) -> None:
        self.rules = tuple(rules)
        self.policy = b", ".join(r.policy for r in rules if r.headers)

    def outcome(
        self, req: RequestState, rules: Sequence[RateRule], verdicts: Sequence[Verdict], now: float
    ) -> LocalReply | Hold | None:
        delay = 0.0
        state: bytes | None = None
        least = None
        for rule, (verdict, tat, wait) in zip(rules, verdicts, strict=True):
            if verdict == REJECT:
                after = retry_after(wait)
                headers: Headers = [(b"Retry-After", b"%d" % after)]
                if rule.headers:
                    headers.append((b"RateLimit-Policy", self.policy))
                    headers.append((b"RateLimit", rule.label + b";r=0;t=%d" % after))
                return _plain(rule.status, headers, b"Too Many Requests\n", "rate_limit")
            if verdict == DELAY and wait > delay:
                delay = wait
            if rule.headers:
                left = remaining(tat, now, rule.limit.interval, rule.limit.tolerance)
                if least is None or left < least:
                    least = left
                    state = rule.state(left, tat, now)
        if state is not None:
            req.limit_headers = [(b"RateLimit-Policy", self.policy), (b"RateLimit", state)]
        return Hold(delay) if delay > 0 else None

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        extra = req.limit_headers
        if extra is not None:
            headers.extend(extra)


class LocalRateLimit(_RateStage):
    """Rate limits kept in this gateway's table (exact across its workers)."""

    __slots__ = ("single", "table")

    def __init__(self, rules: Sequence[RateRule], table: LimitTable) -> None:
        super().__init__(rules)
        self.table = table
        self.single = rules[0] if len(rules) == 1 else None

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        now = req.now
        table = self.table
        if self.single is not None:
            # One limit (the common case): no lists, no refunds.
            rule = self.single
            key = rule.key_of(req)
            if key is None:
                return None
            verdict, tat, wait = table.rate(key_hash(key), rule.limit, now)
            if verdict == REJECT:
                return self.outcome(req, self.rules, ((verdict, tat, wait),), now)
            if rule.headers:
                lim = rule.limit
                req.limit_headers = rule.pair(
                    remaining(tat, now, lim.interval, lim.tolerance), tat, now
                )
            return Hold(wait) if verdict == DELAY else None
        used: list[RateRule] = []
        hashes: list[int] = []
        verdicts: list[Verdict] = []
        for rule in self.rules:
            key = rule.key_of(req)
            if key is None:
                continue
            h = key_hash(key)
            v = table.rate(h, rule.limit, now)
            if v[0] == REJECT:
                # Earlier limits charged this request: give their share back.
                for earlier, eh, ev in zip(used, hashes, verdicts, strict=True):
                    if ev[0] != REJECT:
                        table.refund(eh, earlier.limit.interval)
                used, verdicts = [rule], [v]
                break
            used.append(rule)
            hashes.append(h)
            verdicts.append(v)
        if not used:
            return None
        return self.outcome(req, used, verdicts, now)


class RemoteRateLimit(_RateStage):
    """Rate limits kept in Redis: one round trip decides every limit of the request; the
    request waits (``Hold``) while others go on."""

    __slots__ = ("fail_open", "fail_reply", "remote")

    def __init__(
        self, rules: Sequence[RateRule], remote: RemoteLimiter | None, fail_open: bool
    ) -> None:
        super().__init__(rules)
        self.remote = remote
        self.fail_open = fail_open
        self.fail_reply = _plain(
            503, [(b"Retry-After", b"1")], b"Service Unavailable\n", "rate_limit_unavailable"
        )

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        rules: list[RateRule] = []
        keys: list[bytes] = []
        for rule in self.rules:
            key = rule.key_of(req)
            if key is not None:
                rules.append(rule)
                keys.append(key)
        if not rules:
            return None
        remote = self.remote
        if remote is None:
            return None if self.fail_open else self.fail_reply

        def start(resume: Resume) -> None:
            def done(verdicts: list[Verdict] | None) -> None:
                if verdicts is None:
                    resume(None if self.fail_open else self.fail_reply)
                else:
                    # Redis's clock decided: TATs come back relative to its "now", hence 0.
                    resume(self.outcome(req, rules, verdicts, 0.0))

            remote.check(keys, [r.limit for r in rules], done)

        return Hold(start=start)


# --- concurrency limits --------------------------------------------------------------------


class ConcurrencyRule:
    __slots__ = ("key", "most", "prefix", "reply")

    def __init__(self, config: Concurrency, scope: str, index: int) -> None:
        self.key = compile_key(config.key)
        self.most = config.max
        self.prefix = f"{scope}|{index}|{config.key}|c".encode() + b"\0"
        self.reply = _plain(
            config.status, [(b"Retry-After", b"1")], b"Too many requests in flight\n", "concurrency"
        )


class ConcurrencyLimit(Stage):
    """At most ``max`` requests in flight per key; the slot is given back by ``finish``."""

    __slots__ = ("rules", "table")
    on_request_hook = True

    def __init__(self, rules: Sequence[ConcurrencyRule], table: LimitTable) -> None:
        self.rules = tuple(rules)
        self.table = table

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        table = self.table
        held: list[int] = []
        for rule in self.rules:
            key = rule.key(req)
            if key is None:
                continue
            h = key_hash(rule.prefix + key)
            if not table.acquire(h, rule.most):
                for g in held:
                    table.release(g)
                return rule.reply
            held.append(h)
        if held:

            def release() -> None:
                for g in held:
                    table.release(g)

            if req.finishers is None:
                req.finishers = [release]
            else:
                req.finishers.append(release)
        return None


# --- load shedding --------------------------------------------------------------------------

# Seconds between two looks at a saturated upstream by a held request: short against the
# hold (about a second), long enough that a thousand held requests cost little.
SHED_POLL = 0.02


class EndpointLike(Protocol):
    in_flight: int

    @property
    def available(self) -> bool: ...


class Fleet(Protocol):
    """What shedding reads of a runtime.snapshot.Service."""

    endpoints: list[Any]
    starting: int
    shed: ShedRule | None
    shed_window: LatencyWindow | None


class Shed(Stage):
    """Admit, hold or shed by ``policy.admission`` for each upstream of the route."""

    __slots__ = ("fleets", "priority", "replies")
    on_request_hook = True

    def __init__(self, fleets: Sequence[Fleet], priority: int) -> None:
        self.fleets = tuple(fleets)
        self.priority = priority
        self.replies = {
            id(f): _plain(
                503,
                [(b"Retry-After", b"%d" % f.shed.retry_after)],
                b"Service Unavailable: overloaded\n",
                "shed",
            )
            for f in fleets
            if f.shed is not None
        }

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        waited = req.now - req.started_at
        for fleet in self.fleets:
            rule = fleet.shed
            if rule is None:
                continue
            in_flight = 0
            available = 0
            for ep in fleet.endpoints:
                in_flight += ep.in_flight
                available += ep.available
            window = fleet.shed_window
            p95 = window.p95() if window is not None else None
            verdict = admit(
                rule, in_flight, available, fleet.starting, self.priority, waited, p95
            )
            if verdict == HOLD:
                return Hold(SHED_POLL, again=True)
            if verdict == SHED:
                return self.replies[id(fleet)]
        return None


# --- compiling -----------------------------------------------------------------------------


def _private(size: int) -> memoryview:
    # Anonymous memory: pages cost RSS only once a key lands in them.
    return memoryview(mmap.mmap(-1, size))


@dataclass
class TrafficStores:
    """Where limiter state lives; made once per process and kept across reloads. The
    gateway passes shared-memory tables when it runs several workers, and a factory for
    the Redis limiter; otherwise private tables are made on first use."""

    table_config: TrafficTable = field(default_factory=TrafficTable)
    rates: LimitTable | None = None
    counts: LimitTable | None = None
    remote_factory: Callable[[RedisConfig], RemoteLimiter | None] | None = None
    remotes: dict[RedisConfig, RemoteLimiter | None] = field(default_factory=dict)
    # Authentication's I/O seams and caches (runtime/auth.py), kept across reloads too.
    security: SecurityStores = field(default_factory=SecurityStores)

    def rate_table(self) -> LimitTable:
        if self.rates is None:
            self.rates = LimitTable(_private(table_bytes(self.table_config.max_keys)))
        return self.rates

    def count_table(self) -> LimitTable:
        if self.counts is None:
            size = table_bytes(self.table_config.max_concurrency_keys)
            self.counts = LimitTable(_private(size))
        return self.counts

    def remote(self, config: RedisConfig) -> RemoteLimiter | None:
        if config not in self.remotes and self.remote_factory is not None:
            self.remotes[config] = self.remote_factory(config)
        return self.remotes.get(config)


def traffic_stages(
    top: TrafficRules,
    route: TrafficRules,
    scope: str,
    stores: TrafficStores,
    redis: RedisConfig | None,
    fleets: Sequence[Fleet] = (),
    shed_priority: int = 0,
) -> list[Stage]:
    """The traffic stages of one route, in order; empty when nothing is configured."""
    stages: list[Stage] = []
    layers = []
    for rules in (top, route):
        if rules.ip_allow is not None or rules.ip_deny:
            allow = _networks(rules.ip_allow) if rules.ip_allow is not None else None
            layers.append((allow, _networks(rules.ip_deny)))
    if layers:
        stages.append(IpRules(layers))
    local: list[RateRule] = []
    remote: list[RateRule] = []
    for rules, sc in ((top, "*"), (route, scope)):
        for i, rl in enumerate(rules.rate_limit):
            (remote if rl.store == "redis" else local).append(RateRule(rl, sc, i))
    if local:
        stages.append(LocalRateLimit(local, stores.rate_table()))
    if remote and redis is not None:
        stages.append(
            RemoteRateLimit(remote, stores.remote(redis), fail_open=redis.on_error == "open")
        )
    conc = [
        ConcurrencyRule(c, sc, i)
        for rules, sc in ((top, "*"), (route, scope))
        for i, c in enumerate(rules.concurrency)
    ]
    if conc:
        stages.append(ConcurrencyLimit(conc, stores.count_table()))
    shedding = [f for f in fleets if f.shed is not None]
    if shedding:
        stages.append(Shed(shedding, shed_priority))
    return stages


# --- connection limits ---------------------------------------------------------------------

_TOTAL = key_hash(b"connections|total")


class ConnectionLimits:
    """Open client connections: at most ``total`` in all and ``per_ip`` per peer address,
    counted in the gateway's table (so across workers). The peer is the TCP peer: a
    connection is counted before any request could name a forwarded client."""

    __slots__ = ("per_ip", "refused", "table", "total")

    def __init__(self, table: LimitTable, total: int | None, per_ip: int | None) -> None:
        self.table = table
        self.total = total
        self.per_ip = per_ip
        self.refused = 0

    def open(self, ip: str) -> tuple[int, ...] | None:
        """The counted keys to give back on close, or None: refuse this connection."""
        table = self.table
        keys: list[int] = []
        if self.total is not None:
            if not table.acquire(_TOTAL, self.total):
                self.refused += 1
                return None
            keys.append(_TOTAL)
        if self.per_ip is not None:
            k = key_hash(b"connections|ip|" + ip.encode("ascii", "replace"))
            if not table.acquire(k, self.per_ip):
                for g in keys:
                    table.release(g)
                self.refused += 1
                return None
            keys.append(k)
        return tuple(keys)

    def close(self, keys: tuple[int, ...]) -> None:
        for k in keys:
            self.table.release(k)


def connection_limits(config: TrafficTable, stores: TrafficStores) -> ConnectionLimits | None:
    if config.max_connections is None and config.max_connections_per_ip is None:
        return None
    return ConnectionLimits(
        stores.count_table(), config.max_connections, config.max_connections_per_ip
    )
