"""Load balancing over real sockets: sticky cookies (and their survival across reloads),
consistent hashing on a header, weighted round robin, least connections, backup endpoints
and slow start.

The distributions themselves are proven statistically in tests/unit/test_balancers.py; these
checks are light and only show that the wiring (config -> snapshot -> exchange -> real
backends) gives each balancer's behaviour end to end. Backends are the module's gunicorn +
Flask instances a, b, c and raw servers steered while the test runs
(``tests/support/fleet.py``).
"""

from __future__ import annotations

import base64
import itertools

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import GunicornFlask
from tests.support.fleet import (
    app_config,
    backends_of,
    fleet,
    hold_slow_request,
    reload_with,
    request,
    served_by,
    spread,
    wait_for_log,
)
from tests.support.rawhttp import RawResponse
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

COOKIE = "portico_backend"


# --- sticky cookie ----------------------------------------------------------------------------


def sticky_cookie(resp: RawResponse) -> str | None:
    """The value of the sticky cookie ``resp`` sets, or None."""
    for line in resp.header_values("Set-Cookie"):
        name, _, rest = line.partition("=")
        if name == COOKIE:
            value, _, attributes = rest.partition(";")
            assert "Path=/" in attributes and "HttpOnly" in attributes, line
            return value
    return None


def with_cookie(port: int, value: str) -> RawResponse:
    resp = request(port, "GET", "/whoami", headers=[("Cookie", f"other=1; {COOKIE}={value}")])
    assert resp.status == 200, resp.raw[:300]
    return resp


@pytest.mark.parametrize("secret", ["fixed", "random"])
def test_sticky_cookie_sticks_refuses_tampering_and_survives_a_reload(
    flask_backends: list[GunicornFlask],
    raw_backend: RawBackendFactory,
    portico: PorticoFactory,
    secret: str,
) -> None:
    sticky = {"secret": "s3cret-for-tests-0123456789abcdef"} if secret == "fixed" else {}
    proxy = portico(app_config([f.url for f in flask_backends], sticky=sticky))

    # The first answer sets the cookie; three first requests (round robin) give one per backend.
    cookies: dict[str, str] = {}
    for _ in range(3):
        resp = request(proxy.port, "GET", "/whoami")
        value = sticky_cookie(resp)
        assert value is not None, resp.headers
        cookies[served_by(resp)] = value
    assert sorted(cookies) == ["a", "b", "c"]

    def sticks() -> None:
        for name, value in cookies.items():
            for _ in range(4):
                resp = with_cookie(proxy.port, value)
                assert served_by(resp) == name
                assert sticky_cookie(resp) is None, "a valid cookie was set again"

    sticks()

    # A cookie the client altered is ignored: the request is balanced and gets a new cookie.
    address, _, tag = cookies["a"].partition(".")
    b_address = cookies["b"].partition(".")[0]
    flipped = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    forged = [
        f"{address}.{flipped}",  # a's address, a damaged tag
        f"{b_address}.{tag}",  # b's address with a's tag
        base64.urlsafe_b64encode(b"127.0.0.1:1").decode().rstrip("=") + "." + tag,
        "garbage",
    ]
    for value in forged:
        rebalanced = [with_cookie(proxy.port, value) for _ in range(3)]
        # Round robin over three backends: ignoring the cookie spreads these over all three.
        assert sorted(served_by(r) for r in rebalanced) == ["a", "b", "c"], value
        for resp in rebalanced:
            assert sticky_cookie(resp) == cookies[served_by(resp)], value

    # Reload with the backends reordered and a new one added in front: the cookies name
    # addresses, not positions, and the secret (even a random one) is kept.
    newcomer = fleet(raw_backend, "d")[0]
    a, b, c = flask_backends
    reload_with(proxy, backends_of([newcomer.url, c.url, a.url, b.url]))
    assert "d" in spread(proxy.port, 4, "/whoami"), "the reload did not take effect"
    sticks()


# --- keyed and weighted balancers -----------------------------------------------------------


def test_consistent_hash_on_a_header_keeps_keys_in_place_and_moves_few_on_a_change(
    flask_backends: list[GunicornFlask], raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    urls = [f.url for f in flask_backends]
    proxy = portico(app_config(urls, balancer="consistent_hash", hash_key="header:X-User"))
    users = [f"user-{i}" for i in range(40)]

    def owners(rounds: int) -> dict[str, str]:
        seen: dict[str, set[str]] = {user: set() for user in users}
        for _ in range(rounds):  # interleaved rounds, so keys are not served back to back
            for user in users:
                resp = request(proxy.port, "GET", "/whoami", headers=[("X-User", user)])
                seen[user].add(served_by(resp))
        assert all(len(backends) == 1 for backends in seen.values()), seen
        return {user: backends.pop() for user, backends in seen.items()}

    before = owners(rounds=2)
    assert len(set(before.values())) == 3, f"40 keys not spread over 3 backends: {before}"
    # Without the key, requests are balanced round robin.
    assert spread(proxy.port, 6, "/whoami") == {"a": 2, "b": 2, "c": 2}

    # A fourth backend takes about a quarter of the keys, and only keys it now owns move:
    # hash(key) % N would have moved about three quarters of them.
    newcomer = fleet(raw_backend, "d")[0]
    reload_with(proxy, backends_of([*urls, newcomer.url]))
    after = owners(rounds=1)
    moved = [user for user in users if after[user] != before[user]]
    assert all(after[user] == "d" for user in moved), {u: (before[u], after[u]) for u in moved}
    assert 1 <= len(moved) <= 20, f"{len(moved)} of 40 keys moved"


def test_weighted_round_robin_matches_the_weights_without_bursts(
    flask_backends: list[GunicornFlask], portico: PorticoFactory
) -> None:
    a, b, c = flask_backends
    weighted = [{"url": a.url, "weight": 3}, {"url": b.url, "weight": 2}, c.url]
    proxy = portico(app_config(weighted, balancer="weighted_round_robin"))
    order = [served_by(request(proxy.port, "GET", "/whoami")) for _ in range(60)]
    assert {name: order.count(name) for name in "abc"} == {"a": 30, "b": 20, "c": 10}
    longest_run = max(len(list(run)) for _, run in itertools.groupby(order))
    assert longest_run <= 2, f"smooth WRR should not send bursts: {order}"


def test_least_connections_steers_away_from_a_busy_backend(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b")
    proxy = portico(app_config([s.url for s in backends], balancer="least_connections"))
    slow, busy, [idle] = hold_slow_request(proxy.port, backends)
    with slow:
        # Round robin would send every other one of these to the busy backend.
        assert spread(proxy.port, 10, "/fast") == {idle.name: 10}
        busy.board.release.set()
        assert served_by(slow.recv_response()) == busy.name
    assert spread(proxy.port, 10, "/fast") == {"a": 5, "b": 5}


# --- backups and slow start ----------------------------------------------------------------------


FAST_CHECKS = {"interval": 0.1, "timeout": 0.5, "jitter": 0.0, "rise": 1, "fall": 1}


def test_backup_takes_traffic_only_when_every_primary_is_down(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    p1, p2, backup = fleet(raw_backend, "p1", "p2", "backup")
    backends = [p1.url, p2.url, {"url": backup.url, "backup": True}]
    proxy = portico(app_config(backends, health=FAST_CHECKS))
    assert spread(proxy.port, 10) == {"p1": 5, "p2": 5}

    p1.board.health = 500
    wait_for_log(proxy, f"app {p1.label} DOWN")
    assert spread(proxy.port, 10) == {"p2": 10}

    p2.board.health = 500
    wait_for_log(proxy, f"app {p2.label} DOWN")
    assert spread(proxy.port, 10) == {"backup": 10}

    p1.board.health = 200
    wait_for_log(proxy, f"app {p1.label} UP")
    assert spread(proxy.port, 10) == {"p1": 10}
    assert backup.board.served() == 10


def test_slow_start_gives_a_backend_that_just_came_up_a_reduced_share(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    window = 2.0
    steady, rejoining = fleet(raw_backend, "steady", "rejoining")
    rejoining.board.health = 500
    proxy = portico(
        app_config(
            [steady.url, rejoining.url],
            balancer="weighted_round_robin",
            slow_start=window,
            health=FAST_CHECKS,
        )
    )
    wait_for_log(proxy, f"app {rejoining.label} DOWN")
    rejoining.board.health = 200
    wait_for_log(proxy, f"app {rejoining.label} UP")
    # Within a fraction of the window its weight is about 0.1-0.3 of steady's: far below the
    # half it gets at full weight.
    early = spread(proxy.port, 40)
    assert 1 <= early["rejoining"] <= 12, early
    # Once the window has passed it is back to an equal share.
    wait_until(
        lambda: spread(proxy.port, 10) == {"steady": 5, "rejoining": 5},
        timeout=window + 5,
        interval=0.1,
        message="an equal share after the slow-start window",
    )
