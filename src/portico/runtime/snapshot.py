"""The compiled snapshot: everything the data plane reads per request, built once from config.

``compile_config`` turns the validated ``Config`` into plain objects with bytes ready for the
wire, so the hot path does no parsing, no lookups by name and no string formatting. A reload
compiles a whole new snapshot and swaps it in with one assignment; endpoints of the previous
snapshot are carried over by address so their live state survives.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from portico.config.model import Config, HealthCheck, Upstream
from portico.policy.admission import LatencyWindow, ShedRule
from portico.policy.balancers import BALANCERS, Balancer, LeastLatency, select_candidates
from portico.policy.hashing import ConsistentHash, StickyCookie
from portico.policy.health import OutlierDetector
from portico.policy.retry import RetryBudget, RetryPolicy
from portico.runtime.compile import compile_routes
from portico.runtime.endpoint import Endpoint
from portico.runtime.routes import Router
from portico.runtime.tlsstages import stripped_request_headers
from portico.runtime.tlstarget import https_host, tls_target
from portico.runtime.traffic import TrafficStores

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Response times kept per upstream for a p95 autoscaler: enough for a stable percentile at a
# few hundred requests per second, bounded so memory does not follow traffic.
LATENCY_SAMPLES = 2048


@dataclass(slots=True)
class Service:
    """A compiled upstream: its endpoints, its policies and the settings the proxy reads."""

    name: str
    endpoints: list[Endpoint]
    balancer: Balancer
    host_override: bytes | None
    connect_timeout: float
    response_header_timeout: float
    body_idle_timeout: float
    pool_max_idle: int
    pool_idle_timeout: float
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget: RetryBudget = field(default_factory=RetryBudget)
    health: HealthCheck | None = None
    outlier: OutlierDetector | None = None
    sticky: StickyCookie | None = None
    sticky_cookie: bytes = b""
    sticky_max_age: int | None = None
    hash_key: str = "client_ip"  # what keyed balancers hash: see dataplane.affinity
    slow_start: float = 0.0
    max_requests: int | None = None
    measures_latency: bool = False
    keyed: bool = False  # the balancer hashes a per-request key
    active_retries: int = 0  # per worker; read by the retry budget
    # Apps (instances Portico runs): endpoints come and go with the supervisor.
    has_app: bool = False
    # Discovered upstreams: endpoints come and go with the Docker watcher.
    discovered: bool = False
    cold_start_timeout: float = 30.0
    demand: Callable[[], None] | None = None  # asks the supervisor for an instance (min = 0)
    waiters: list[Callable[[], None]] = field(default_factory=list)  # requests held for one
    unavailable: str | None = None  # why no instance serves (crash loop), told in 503s
    latencies: deque[float] | None = None  # recent response times, for a p95 autoscaler
    starting: int = 0  # instances starting (written by the supervisor), for load shedding
    shed: ShedRule | None = None
    shed_window: LatencyWindow | None = None  # recent response times, for shed.max_p95
    # Per worker, drained into the metrics at each report (dataplane.metrics).
    breaker_skips: int = 0  # picks that passed over an endpoint at its max_requests cap
    ejections: dict[str, int] = field(default_factory=dict)  # endpoint label -> ejections

    def candidates(self, now: float, exclude: Sequence[Endpoint] = ()) -> Sequence[Endpoint]:
        """Endpoints a request may go to now: available ones (backups only when no primary
        is), minus ``exclude`` (already tried) and those at their circuit-breaker cap."""
        candidates = select_candidates(self.endpoints, now, exclude, self.slow_start)
        cap = self.max_requests
        if cap is not None:
            kept = [ep for ep in candidates if ep.in_flight < cap]
            if len(kept) < len(candidates):
                self.breaker_skips += 1
            candidates = kept
        return candidates

    def pick(
        self, now: float, key: str | None = None, exclude: Sequence[Endpoint] = ()
    ) -> Endpoint | None:
        return self.balancer.pick(self.candidates(now, exclude), key)

    def declare_unavailable(self, why: str | None) -> None:
        """Say why no instance serves (None: one does again). Requests held for an instance
        are woken when one is declared: none is coming, they get 503 with the reason now."""
        self.unavailable = why
        if why is not None and self.waiters:
            waiters, self.waiters = self.waiters, []
            for wake in waiters:
                wake()

    def active_requests(self) -> int:
        return sum(ep.in_flight for ep in self.endpoints)


@dataclass(slots=True)
class ForwardingPolicy:
    x_forwarded: bool
    forwarded: bool
    via: bytes | None  # the Via value to add, e.g. b"1.1 portico"
    trusted: list[IPNetwork] = field(default_factory=list)
    # Request headers dropped from every client (client-certificate headers Portico sets).
    strip: frozenset[bytes] | None = None

    def trusts(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)


@dataclass(slots=True)
class Snapshot:
    router: Router
    services: dict[str, Service]
    forwarding: ForwardingPolicy
    traffic: TrafficStores | None = None  # limiter state, kept across reloads


def _compile_service(
    name: str,
    up: Upstream,
    previous: dict[tuple[str, int], Endpoint],
    previous_service: Service | None,
) -> Service:
    endpoints: list[Endpoint] = []
    if previous_service is not None and (
        (up.app is not None and previous_service.has_app)
        or ((up.discover or up.kubernetes) is not None and previous_service.discovered)
    ):
        endpoints = previous_service.endpoints  # the control plane's, not the config's
    for backend in up.backends:
        host, port = backend.address
        ep = previous.get((host, port))
        if ep is None:
            ep = Endpoint(host, port, backend.weight, backup=backend.backup)
        else:
            ep.weight = backend.weight
            ep.backup = backend.backup
        ep.tls = tls_target(up, backend)
        endpoints.append(ep)
    outlier: OutlierDetector | None = None
    od = up.outlier
    if od.consecutive_failures > 0:
        labels = [ep.label for ep in endpoints]
        if previous_service is not None and previous_service.outlier is not None:
            outlier = previous_service.outlier
            outlier.set_members(labels)
        else:
            outlier = OutlierDetector(
                labels,
                consecutive_failures=od.consecutive_failures,
                base_time=od.base_ejection,
                max_time=max(od.max_ejection, od.base_ejection),
                max_ejection_percent=od.max_ejection_percent,
            )
    sticky = None
    if up.sticky is not None:
        if up.sticky.secret is None:
            raise ValueError(f"upstreams.{name}.sticky.secret must be filled in before compiling")
        sticky = StickyCookie(up.sticky.secret.encode(), scope=name)
    balancer = BALANCERS[up.balancer]()
    rt = up.retry
    return Service(
        name=name,
        endpoints=endpoints,
        balancer=balancer,
        host_override=up.host.encode("idna") if up.host else https_host(up),
        connect_timeout=up.timeouts.connect,
        response_header_timeout=up.timeouts.response_header,
        body_idle_timeout=up.timeouts.body_idle,
        pool_max_idle=up.pool.max_idle,
        pool_idle_timeout=up.pool.idle_timeout,
        retry=RetryPolicy(
            attempts=rt.attempts,
            retry_on=frozenset(rt.on_status),
            per_try_timeout=rt.per_try_timeout,
        ),
        budget=RetryBudget(ratio=rt.budget_percent / 100.0, min_concurrent=rt.budget_min),
        health=up.health,
        outlier=outlier,
        sticky=sticky,
        sticky_cookie=up.sticky.cookie.encode() if up.sticky else b"",
        sticky_max_age=int(up.sticky.max_age) if up.sticky and up.sticky.max_age else None,
        hash_key=up.hash_key,
        slow_start=up.slow_start,
        max_requests=up.max_requests,
        measures_latency=isinstance(balancer, LeastLatency),
        keyed=isinstance(balancer, ConsistentHash),
        has_app=up.app is not None,
        discovered=(up.discover or up.kubernetes) is not None,
        cold_start_timeout=up.app.cold_start_timeout if up.app else 30.0,
        demand=previous_service.demand if previous_service and up.app else None,
        shed=(
            ShedRule(
                up.shed.max_in_flight,
                up.shed.hold,
                up.shed.low_share,
                up.shed.retry_after,
                up.shed.max_p95,
            )
            if up.shed is not None
            else None
        ),
        shed_window=(
            (previous_service.shed_window if previous_service is not None else None)
            or LatencyWindow()
            if up.shed is not None and up.shed.max_p95 is not None
            else None
        ),
        starting=previous_service.starting if previous_service is not None else 0,
        latencies=(
            deque(maxlen=LATENCY_SAMPLES)
            if up.app and up.app.autoscale and up.app.autoscale.metric == "p95_latency"
            else None
        ),
    )


def compile_config(
    config: Config, previous: Snapshot | None = None, traffic: TrafficStores | None = None
) -> Snapshot:
    """Build a snapshot. Pure: raises only on programming errors (config is validated).

    ``traffic`` is where rate-limit state lives (the gateway's shared memory with workers);
    unset, the previous snapshot's is kept, or private tables are made when first needed."""
    old: dict[tuple[str, int], Endpoint] = {}
    old_services: dict[str, Service] = {}
    if previous is not None:
        old_services = previous.services
        for svc in previous.services.values():
            for ep in svc.endpoints:
                old[ep.address] = ep
    services = {
        name: _compile_service(name, up, old, old_services.get(name))
        for name, up in config.upstreams.items()
    }
    fw = config.forwarding
    forwarding = ForwardingPolicy(
        x_forwarded=fw.x_forwarded,
        forwarded=fw.forwarded,
        via=b"1.1 " + fw.via_name.encode("ascii") if fw.via else None,
        trusted=[ipaddress.ip_network(n, strict=False) for n in fw.trusted_proxies],
        strip=stripped_request_headers(config),
    )
    if traffic is None:
        traffic = previous.traffic if previous is not None else None
    if traffic is None:
        traffic = TrafficStores(config.traffic)
    router = compile_routes(config, services, traffic)
    return Snapshot(router=router, services=services, forwarding=forwarding, traffic=traffic)
