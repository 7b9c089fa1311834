"""Membership: endpoints join, drain and leave copy-on-write; the bus's sync keeps objects by
address so their counters survive."""

from __future__ import annotations

from portico.config.model import Config
from portico.runtime import membership
from portico.runtime.endpoint import Endpoint
from portico.runtime.snapshot import Service, compile_config


def app_service() -> Service:
    config = Config.model_validate(
        {"upstreams": {"app": {"app": {"command": ["true"], "min": 0}}}}
    )
    return compile_config(config).services["app"]


def test_join_adds_copy_on_write_and_wakes_held_requests() -> None:
    service = app_service()
    before = service.endpoints
    woken: list[int] = []
    service.waiters = [lambda: woken.append(1), lambda: woken.append(2)]
    ep = Endpoint("127.0.0.1", 9001)
    membership.join(service, ep, now=5.0)
    assert service.endpoints == [ep] and before == []  # a new list: pickers keep theirs
    assert ep.healthy_since == 5.0  # slow start ramps from joining
    assert woken == [1, 2] and service.waiters == []


def test_drain_then_leave() -> None:
    service = app_service()
    a, b = Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)
    membership.join(service, a, 0.0)
    membership.join(service, b, 0.0)
    membership.drain(a)
    assert a.draining and not a.available and b.available
    listed = service.endpoints
    membership.leave(service, a)
    assert service.endpoints == [b] and listed == [a, b]


def test_sync_keeps_endpoints_by_address_and_follows_draining() -> None:
    service = app_service()
    a = Endpoint("127.0.0.1", 9001)
    membership.join(service, a, 0.0)
    a.in_flight = 3
    woken: list[int] = []
    service.waiters = [lambda: woken.append(1)]
    membership.sync(service, [("127.0.0.1", 9001, True), ("127.0.0.1", 9002, False)], 7.0)
    kept, new = service.endpoints
    assert kept is a and kept.in_flight == 3 and kept.draining
    assert new.address == ("127.0.0.1", 9002) and new.healthy_since == 7.0
    assert woken == [1]  # one is available: held requests may go
    assert membership.rows(service) == [("127.0.0.1", 9001, True), ("127.0.0.1", 9002, False)]
    service.waiters = [lambda: woken.append(2)]
    membership.sync(service, [("127.0.0.1", 9001, True)], 8.0)
    assert woken == [1] and len(service.waiters) == 1  # nothing available: keep holding


def test_one_endpoint_per_address_a_newcomer_takes_the_place() -> None:
    service = app_service()
    old, other = Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)
    membership.join(service, old, 0.0)
    membership.join(service, other, 0.0)
    new = Endpoint("127.0.0.1", 9001)
    membership.join(service, new, 1.0)
    assert service.endpoints == [other, new]
    membership.leave(service, old)  # leaving by identity: the newcomer stays
    assert service.endpoints == [other, new]
