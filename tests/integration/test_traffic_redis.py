"""Rate limits shared through a real redis-server: exact across gateways, and what happens
when Redis dies or stops answering."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_traffic import BURST, OK, RATE, SECONDS, check_exact
from tests.support.fleet import request
from tests.support.paced import paced
from tests.support.redis import RedisServer, unavailable
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def shared(url: str, limit: dict[str, Any], **redis: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 0.5},
        "redis": {"url": url, **redis},
        "upstreams": {"app": {"backends": ["http://127.0.0.1:9"]}},
        "routes": [
            {"path": "/", "respond": OK, "rate_limit": {"store": "redis", **limit}},
            {"path": "/warm", "respond": OK},
        ],
    }


def test_two_gateways_on_one_redis_enforce_one_limit(
    portico: Any, redis_server: RedisServer
) -> None:
    # A generous timeout: on this busy machine a slow answer must not count as a failure
    # (that is tested below), it would admit requests and blur the count.
    config = shared(redis_server.url, {"rate": RATE, "burst": BURST}, timeout=2.0)
    a, b = portico(config), portico(config)
    result = paced([a.port, b.port], 2 * RATE, SECONDS, connections=16, warmup="/warm")
    check_exact(result)


def statuses(port: int, n: int) -> list[int]:
    return [request(port, timeout=10).status for _ in range(n)]


def test_redis_killed_fails_open_logs_once_and_recovers(
    portico: Any, redis_server: RedisServer
) -> None:
    config = shared(redis_server.url, {"rate": 1, "per": "hour", "burst": 2}, timeout=0.5)
    proxy = portico(config)
    assert statuses(proxy.port, 3) == [200, 200, 429]
    redis_server.kill()
    # Open: every request is admitted while Redis is gone, and the episode is logged once.
    assert statuses(proxy.port, 5) == [200] * 5
    time.sleep(1.2)  # past the retry pause: the next request probes Redis again (and fails)
    assert statuses(proxy.port, 2) == [200, 200]
    log = proxy.output()
    assert log.count("failed (") == 1, log
    redis_server.start()  # same port, empty: the key starts afresh
    wait_until(lambda: request(proxy.port).status == 429, 10, message="limits enforced again")
    assert "is back" in proxy.output()


def test_redis_killed_fails_closed(portico: Any, redis_server: RedisServer) -> None:
    config = shared(
        redis_server.url, {"rate": 1, "per": "hour", "burst": 5}, timeout=0.5, on_error="closed"
    )
    proxy = portico(config)
    assert statuses(proxy.port, 2) == [200, 200]
    redis_server.kill()
    assert statuses(proxy.port, 3) == [503, 503, 503]
    redis_server.start()
    wait_until(lambda: request(proxy.port).status == 200, 10, message="Redis used again")


def test_paused_redis_does_not_stall_requests(portico: Any, redis_server: RedisServer) -> None:
    timeout = 0.3
    config = shared(redis_server.url, {"rate": 1, "per": "hour", "burst": 1}, timeout=timeout)
    proxy = portico(config)
    assert statuses(proxy.port, 2) == [200, 429]
    redis_server.pause()
    try:
        took = []
        for _ in range(4):
            began = time.monotonic()
            assert request(proxy.port, timeout=10).status == 200  # open: admitted
            took.append(time.monotonic() - began)
        # None waits much beyond the timeout (the first waits for it, later ones skip Redis).
        assert max(took) < timeout + 1.0, took
    finally:
        redis_server.resume()
    wait_until(lambda: request(proxy.port).status == 429, 10, message="limits enforced again")
