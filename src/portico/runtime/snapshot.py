"""The compiled snapshot: everything the data plane reads per request, built once from config.

``compile_config`` turns the validated ``Config`` into plain objects with bytes ready for the
wire, so the hot path does no parsing, no lookups by name and no string formatting. A reload
compiles a whole new snapshot and swaps it in with one assignment; endpoints of the previous
snapshot are carried over by address so their live state survives.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from portico.codec.headers import split_host
from portico.config.model import Config, Upstream
from portico.policy.balancers import BALANCERS, Balancer
from portico.runtime.endpoint import Endpoint

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class Service:
    """A compiled upstream: its endpoints, balancer and the settings the proxy reads."""

    name: str
    endpoints: list[Endpoint]
    balancer: Balancer
    host_override: bytes | None
    connect_timeout: float
    response_header_timeout: float
    body_idle_timeout: float
    pool_max_idle: int
    pool_idle_timeout: float

    def available(self) -> Sequence[Endpoint]:
        """Endpoints a balancer may choose from right now."""
        eps = self.endpoints
        for ep in eps:
            if not ep.up:
                return [e for e in eps if e.up]
        return eps

    def pick(self, key: str | None = None) -> Endpoint | None:
        return self.balancer.pick(self.available(), key)


@dataclass(slots=True)
class CompiledRoute:
    host: bytes | None
    path: bytes
    service: Service


@dataclass(slots=True)
class RouteTable:
    """Routes ordered most specific first: a Host match beats none, longer paths beat shorter."""

    routes: list[CompiledRoute]
    only: Service | None = None  # set when one catch-all route covers everything

    def match(self, host: bytes | None, target: bytes) -> Service | None:
        if self.only is not None:
            return self.only
        bare = split_host(host).lower() if host else None
        for route in self.routes:
            if route.host is not None and route.host != bare:
                continue
            if target.startswith(route.path):
                return route.service
        return None


@dataclass(slots=True)
class ForwardingPolicy:
    x_forwarded: bool
    forwarded: bool
    via: bytes | None  # the Via value to add, e.g. b"1.1 portico"
    trusted: list[IPNetwork] = field(default_factory=list)

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
    routes: RouteTable
    services: dict[str, Service]
    forwarding: ForwardingPolicy


def _compile_service(name: str, up: Upstream, previous: dict[tuple[str, int], Endpoint]) -> Service:
    endpoints: list[Endpoint] = []
    for backend in up.backends:
        host, port = backend.address
        ep = previous.get((host, port))
        if ep is None:
            ep = Endpoint(host, port, backend.weight)
        else:
            ep.weight = backend.weight
        endpoints.append(ep)
    return Service(
        name=name,
        endpoints=endpoints,
        balancer=BALANCERS[up.balancer](),
        host_override=up.host.encode("idna") if up.host else None,
        connect_timeout=up.timeouts.connect,
        response_header_timeout=up.timeouts.response_header,
        body_idle_timeout=up.timeouts.body_idle,
        pool_max_idle=up.pool.max_idle,
        pool_idle_timeout=up.pool.idle_timeout,
    )


def compile_config(config: Config, previous: Snapshot | None = None) -> Snapshot:
    """Build a snapshot. Pure: raises only on programming errors (config is validated)."""
    old: dict[tuple[str, int], Endpoint] = {}
    if previous is not None:
        for svc in previous.services.values():
            for ep in svc.endpoints:
                old[ep.address] = ep
    services = {name: _compile_service(name, up, old) for name, up in config.upstreams.items()}
    compiled = [
        CompiledRoute(
            host=r.host.lower().encode("idna") if r.host else None,
            path=r.path.encode("utf-8"),
            service=services[r.upstream],
        )
        for r in config.effective_routes()
    ]
    compiled.sort(key=lambda r: (r.host is None, -len(r.path)))
    only = None
    if len(compiled) == 1 and compiled[0].host is None and compiled[0].path == b"/":
        only = compiled[0].service
    fw = config.forwarding
    forwarding = ForwardingPolicy(
        x_forwarded=fw.x_forwarded,
        forwarded=fw.forwarded,
        via=b"1.1 " + fw.via_name.encode("ascii") if fw.via else None,
        trusted=[ipaddress.ip_network(n, strict=False) for n in fw.trusted_proxies],
    )
    return Snapshot(routes=RouteTable(compiled, only), services=services, forwarding=forwarding)
