"""Membership of an upstream: endpoints join when ready, drain, and leave. Written once here
and used by every source of endpoints: the supervisor (apps), Docker discovery and, in a
worker, the master's endpoint lists arriving over the bus.

``Service.endpoints`` is copy-on-write: a change builds a new list and assigns it, so a
request iterating the old list (a pick, a retry) never sees it change under it. Endpoint
objects are kept by address, so in-flight counters and health survive every change.
"""

from __future__ import annotations

from portico.runtime.endpoint import Endpoint
from portico.runtime.snapshot import Service

# (host, port, draining): one endpoint as the master publishes it.
EndpointRow = tuple[str, int, bool]


def join(service: Service, endpoint: Endpoint, now: float) -> None:
    """A ready endpoint takes traffic from the next pick; slow start ramps from ``now``.
    Requests held for an instance (cold start) are woken to pick it."""
    endpoint.healthy_since = now
    # One endpoint per address: a newcomer at a known address (a restarted discovery
    # re-admitting a container) takes the old one's place.
    address = endpoint.address
    service.endpoints = [*(e for e in service.endpoints if e.address != address), endpoint]
    wake_waiters(service)


def drain(endpoint: Endpoint) -> None:
    """No new requests; those in flight finish. The caller waits, then calls ``leave``."""
    endpoint.draining = True


def leave(service: Service, endpoint: Endpoint) -> None:
    service.endpoints = [e for e in service.endpoints if e is not endpoint]


def wake_waiters(service: Service) -> None:
    """Let requests held for an instance pick again (one may be ready, or none will be)."""
    waiters, service.waiters = service.waiters, []
    for wake in waiters:
        wake()


def rows(service: Service) -> list[EndpointRow]:
    return [(ep.host, ep.port, ep.draining) for ep in service.endpoints]


def sync(service: Service, wanted: list[EndpointRow], now: float) -> None:
    """Make ``service``'s endpoints equal ``wanted`` (the master's), keeping Endpoint objects
    by address: new ones join, missing ones leave, the draining flag follows."""
    known = {ep.address: ep for ep in service.endpoints}
    endpoints: list[Endpoint] = []
    for host, port, draining in wanted:
        ep = known.get((host, port))
        if ep is None:
            ep = Endpoint(host, port)
            ep.healthy_since = now
        ep.draining = draining
        endpoints.append(ep)
    service.endpoints = endpoints
    if any(ep.available for ep in endpoints):
        wake_waiters(service)


def steer(
    service: Service, label: str, draining: bool | None, weight: int | None
) -> Endpoint | None:
    """An operator's change to one endpoint (admin API): drain or undrain it, set its weight.
    ``None`` leaves a value as it is. Returns the endpoint, or None when it is not there."""
    for ep in service.endpoints:
        if ep.label == label:
            if draining is not None:
                ep.draining = draining
            if weight is not None:
                ep.weight = weight
            if draining is False:
                wake_waiters(service)
            return ep
    return None
